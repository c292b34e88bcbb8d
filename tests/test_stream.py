"""The streamed tier in real processes: memory well below the decoded size, SIGKILL mid-epoch then --resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdfast.data import load_dataset

from .conftest import CLASSES, make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_large_folder(root: str, n_train: int, n_test: int, side: int) -> str:
    """Smooth class images upscaled to side x side JPEGs: small files, a large decoded size."""
    from PIL import Image

    for split, n, seed in (("train", n_train, 0), ("val", n_test, 1)):
        images, labels = make_images(n, seed)
        for k, (img, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).resize((side, side), Image.BICUBIC).save(os.path.join(folder, f"{k:04d}.jpg"), quality=85)
    return root


def train_args(data, cache_dir, out_dir, *extra, epochs=1):
    return ["-m", "kdfast.train", "--model", "resnet8", "--name", "run", "--data", data, "--cache-dir", cache_dir,
            "--out-dir", out_dir, "--epochs", str(epochs), "--batch-size", "12", "--eval-batch-size", "12",
            "--precision", "fp32", "--no-progress", "--augment.view", "rrc", "--augment.crop-size", "32", *extra]


def peak_rss(args, tmp_path):
    """The largest resident set of the training process or any of its workers, in bytes, and its stdout."""
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", measure, sys.executable, *args], capture_output=True, text=True,
                         timeout=600, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split("MAXRSS")[-1]), out.stdout


def test_a_dataset_larger_than_the_budget_streams_with_a_small_peak_rss(tmp_path):
    n_train, n_test, side = 120, 30, 1024  # 3 classes: 450 images, 1.4 GB decoded at 1024 px, about 30 MB as JPEG
    data = write_large_folder(str(tmp_path / "big"), n_train, n_test, side)
    decoded = 3 * (n_train + n_test) * 3 * side * side
    common = ("--store-size", str(side), "--data-workers", "1")
    streamed, said = peak_rss(train_args(data, str(tmp_path / "c"), str(tmp_path / "s"), *common, "--data-budget-gb",
                                         "0.25"), tmp_path)
    assert "exceeds the budget of 256 MB" in said and "streamed" in said
    meta = json.load(open(tmp_path / "s" / "run.json"))
    assert meta["data"]["tier"] == "stream" and meta["data"]["store_size"] == side
    held, _ = peak_rss(train_args(data, str(tmp_path / "c"), str(tmp_path / "d"), *common, "--data-tier", "device"),
                       tmp_path)
    # held on the device, the run's peak is the interpreter and torch (about 0.9 GB here) plus the decoded images;
    # streamed, its largest process (trainer or worker) holds the interpreter, torch and a few batches: less than a
    # quarter of the decoded size above that baseline
    print(f"peak RSS: streamed {streamed / 2**20:,.0f} MB, held on the device {held / 2**20:,.0f} MB, "
          f"decoded {decoded / 2**20:,.0f} MB")
    assert streamed - (held - decoded) < decoded / 4


def weights(path):
    return torch.load(path, weights_only=True)


def test_sigkill_mid_epoch_in_the_streamed_tier_then_resume_gives_the_same_weights(tmp_path):
    data = write_large_folder(str(tmp_path / "d"), 24, 6, 64)  # 72 train images: 6 steps of 12 per epoch
    cache, extra = str(tmp_path / "c"), ("--data-tier", "stream", "--data-workers", "1", "--checkpoint-every", "1")
    proc = subprocess.Popen([sys.executable, *train_args(data, cache, str(tmp_path / "b"), *extra, epochs=3)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    state = tmp_path / "b" / ".state" / "run" / "state.json"
    t0 = time.time()
    while True:  # kill -9 once a state saved mid-epoch 2 exists
        try:
            progress = json.load(open(state))["progress"]
            if (progress["epoch"], progress["step"]) >= (1, 2):
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "run.pth").exists()
    resumed = subprocess.run([sys.executable, *train_args(data, cache, str(tmp_path / "b"), *extra, "--resume", epochs=3)],
                             capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    whole = subprocess.run([sys.executable, *train_args(data, cache, str(tmp_path / "a"), *extra, epochs=3)],
                           capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = weights(tmp_path / "a" / "run.pth"), weights(tmp_path / "b" / "run.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_each_decode_their_share_of_the_streamed_tier(tmp_path):
    """torchrun + gloo, streamed: each process decodes only its half of every global batch; together every sample
    once per epoch, as one process alone."""
    data = write_large_folder(str(tmp_path / "d"), 8, 2, 48)  # 24 train images: 2 steps of 12 per epoch
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    args = train_args(data, str(tmp_path / "c"), str(tmp_path / "o"), "--data-tier", "stream", "--data-workers", "1",
                      epochs=2)[2:]  # without "-m kdfast.train"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "kdfast.train", *args], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    meta = json.load(open(tmp_path / "o" / "run.json"))
    assert (meta["num_processes"], meta["distributed_type"], meta["data"]["tier"]) == (2, "MULTI_CPU", "stream")
    assert meta["data"]["decoded_per_process"] == [24, 24]  # 6 of each step's 12, 2 steps, 2 epochs
    assert meta["test_samples"] == 6


# ---------------------------------------------------------------- the workers are part of the run

def fault_run(data, cache, out, fault: str, step: int, *extra):
    """A 3-epoch streamed run (6 steps an epoch) under tests.stop_at with a fault before global step `step`, in its own
    process group (as a Slurm job step is)."""
    args = train_args(data, cache, out, "--data-tier", "stream", "--data-workers", "1", *extra, epochs=3)[2:]
    return subprocess.run([sys.executable, "-m", "tests.stop_at", str(step), "kdfast.train", *args],
                          capture_output=True, text=True, timeout=600, env={**ENV, "KDFAST_TEST_FAULT": fault},
                          cwd=ROOT, start_new_session=True)


@pytest.fixture(scope="module")
def streamed_reference(tmp_path_factory):
    """The data, its cache, and the weights of an uninterrupted 3-epoch streamed run."""
    root = tmp_path_factory.mktemp("streamed")
    data, cache = write_large_folder(str(root / "d"), 24, 6, 64), str(root / "c")  # 72 images: 6 steps of 12
    whole = subprocess.run([sys.executable, *train_args(data, cache, str(root / "a"), "--data-tier", "stream",
                                                        "--data-workers", "1", epochs=3)],
                           capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return data, cache, weights(root / "a" / "run.pth")


def resumed_weights(data, cache, out):
    resumed = subprocess.run([sys.executable, *train_args(data, cache, out, "--data-tier", "stream", "--data-workers",
                                                          "1", "--resume", epochs=3)],
                             capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return weights(os.path.join(out, "run.pth"))


def saved_progress(out):
    with open(os.path.join(out, ".state", "run", "state.json")) as f:
        return json.load(f)["progress"]


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_process_group_mid_epoch_saves_that_step_and_resumes_equal(streamed_reference, tmp_path):
    """Slurm's preemption: SIGTERM to the trainer and its data workers at once. The workers ignore it; the trainer
    finishes the step, saves it and exits 143 with its resume line, as the device tier does."""
    data, cache, reference = streamed_reference
    out = str(tmp_path / "b")
    stopped = fault_run(data, cache, out, "group", 8)  # before global step 8: step 3 of epoch 2 is the last done
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM: stopped after step 3 of epoch 2; the state is saved in" in stopped.stderr
    assert "Traceback" not in stopped.stderr and "--resume" in stopped.stderr
    assert (saved_progress(out)["epoch"], saved_progress(out)["step"]) == (1, 3)
    assert_same(resumed_weights(data, cache, out), reference)


def test_sigterm_to_the_group_while_the_workers_prepare_batches_saves_a_whole_step(streamed_reference, tmp_path):
    """The same signal sent while the trainer waits for a batch or computes a step (here by a worker): whichever step
    it arrives in is finished and saved, nothing raised in a worker."""
    data, cache, reference = streamed_reference
    out = str(tmp_path / "b")
    stopped = fault_run(data, cache, out, "group-from-worker", 3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    progress = saved_progress(out)
    where = f"step {progress['step']} of epoch 1" if progress["step"] else f"epoch {progress['epoch']}"
    assert f"SIGTERM: stopped after {where}; the state is saved in" in stopped.stderr, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert_same(resumed_weights(data, cache, out), reference)


def test_a_data_worker_killed_mid_epoch_saves_the_last_whole_step_and_resumes_equal(streamed_reference, tmp_path):
    """The OOM killer's SIGKILL to a worker: found while the trainer waits for the next batch (between two steps),
    the steps done are saved, the line names the worker and the signal; exit 128 + 9."""
    data, cache, reference = streamed_reference
    out = str(tmp_path / "b")
    killed = fault_run(data, cache, out, "worker", 6)  # at the start of epoch 2: its prefetched batches, then none
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert "a data worker (pid" in killed.stderr and "was killed by signal SIGKILL" in killed.stderr
    assert "the state is saved in" in killed.stderr and "Traceback" not in killed.stderr
    progress = saved_progress(out)
    assert progress["epoch"] == 1 and 0 <= progress["step"] < 6  # saved mid-epoch 2, at a whole step
    assert_same(resumed_weights(data, cache, out), reference)


def test_a_damaged_image_is_named_before_the_first_step_in_the_streamed_tier(tmp_path):
    data = write_large_folder(str(tmp_path / "d"), 8, 2, 48)
    bad = os.path.join(data, "train", "dog", "0009.jpg")
    with open(bad, "rb") as f:
        blob = f.read()
    with open(bad, "wb") as f:
        f.write(blob[:len(blob) // 2])  # cut: the header reads, the pixels do not
    out = subprocess.run([sys.executable, *train_args(data, str(tmp_path / "c"), str(tmp_path / "o"), "--data-tier",
                                                      "stream", "--data-workers", "1")],
                         capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"kdfast: error: {data}:train/dog/0009.jpg: not a readable image" in out.stderr
    assert "Traceback" not in out.stderr and "epoch 1/" not in out.stdout  # before any training
    assert not [f for f in os.listdir(tmp_path / "c" / "datasets") if f.endswith(".arrow") or ".tmp" in f]


# ---------------------------------------------------------------- the prepared files, written like every kdfast file

def test_two_runs_preparing_one_dataset_at_once_write_it_once(tmp_path, monkeypatch):
    """The second waits on the lock (said), then reads the file the first wrote: one writer, whole files for both."""
    import threading

    from kdfast.data import stream
    from kdfast import data as data_mod

    folder = write_large_folder(str(tmp_path / "d"), 8, 2, 48)
    writing, release, writes = threading.Event(), threading.Event(), []
    write = stream.write_encoded

    def slow_write(*args, **kwargs):
        writes.append(args[1])
        writing.set()
        release.wait(60)
        return write(*args, **kwargs)

    monkeypatch.setattr(data_mod, "write_encoded", slow_write)
    results, said = {}, []
    first = threading.Thread(target=lambda: results.setdefault("a", data_mod.load_dataset(
        folder, str(tmp_path / "c"), tier="stream", log=said.append)))
    first.start()
    assert writing.wait(60)
    second = threading.Thread(target=lambda: results.setdefault("b", data_mod.load_dataset(
        folder, str(tmp_path / "c"), tier="stream", log=said.append)))
    second.start()
    t0 = time.time()
    while not any("waiting for it" in s for s in said):
        assert time.time() - t0 < 60, said
        time.sleep(0.01)
    release.set()
    first.join(60)
    second.join(60)
    assert writes == ["train", "test"]  # written once, by the first
    assert results["a"].fingerprint == results["b"].fingerprint and len(results["b"].train) == 24
    assert not [f for f in os.listdir(tmp_path / "c" / "datasets") if ".tmp" in f or f.endswith(".lock")]


def test_a_damaged_arrow_file_is_written_again_or_named_with_the_users_file(tmp_path):
    from kdfast.data import TrainLoader, load_dataset
    from kdfast.data.types import DataError
    from kdfast.augment import AugmentSpec

    folder = write_large_folder(str(tmp_path / "d"), 8, 2, 48)
    cache = str(tmp_path / "c")
    ds = load_dataset(folder, cache, tier="stream")
    train_file = ds.train.store.path
    with open(train_file, "r+b") as f:  # cut short, as by a full disk or a killed copy
        f.truncate(os.path.getsize(train_file) // 2)
    said = []
    again = load_dataset(folder, cache, tier="stream", log=said.append)
    assert any(s.startswith(train_file) and "damaged" in s and "writing it again" in s for s in said), said
    assert again.fingerprint == ds.fingerprint
    row = 5
    with open(train_file, "r+b") as f:  # an image's bytes overwritten in place: the file's structure intact
        blob = f.read()
        image = again.train.store.read(row)
        at = blob.index(image)
        f.seek(at + 200)
        f.write(bytes(len(image) - 400))
    loader = TrainLoader(again.train, 12, seed=0, spec=AugmentSpec(view="rrc", crop_size=32), device="cpu", workers=1)
    name = again.train.store.cell(row, "name")
    with pytest.raises(DataError, match=rf"^{name}: its copy in {train_file} \(row {row}\) cannot be decoded .*the "
                                        "copy is damaged. Delete it"):
        for _ in loader.epoch(0, 0):
            pass


def test_any_folder_name_the_device_tier_takes_streams(tmp_path):
    """Names that pyarrow or a file system would not take as they are (not UTF-8, 250 bytes) make a portable cache
    file name."""
    for name in (b"caf\xe9-data", b"d" * 250):
        folder = write_large_folder(os.path.join(os.fsencode(tmp_path), name).decode("utf-8", "surrogateescape"),
                                    4, 1, 40)
        ds = load_dataset(folder, str(tmp_path / "c"), tier="stream")
        device = load_dataset(folder, str(tmp_path / "c"), tier="device")
        assert ds.fingerprint == device.fingerprint


def test_what_a_killed_preparation_left_is_removed_by_the_next_one(tmp_path):
    from kdfast.data.store import cache_path
    from kdfast.data.sources import source_key

    folder = write_large_folder(str(tmp_path / "d"), 4, 1, 40)
    decoded = cache_path(str(tmp_path / "c"), folder, source_key(folder, "folder", "cifar10"), 0)
    left = decoded[:-len(".safetensors")] + "-train.arrow.tmp4242"  # a writer killed with -9 leaves its temporary
    os.makedirs(os.path.dirname(left))
    with open(left, "wb") as f:
        f.write(bytes(1000))
    other = decoded[:-len(".safetensors")] + "-s48-train.arrow.tmp4343"  # another product's: not ours to remove
    open(other, "wb").close()
    said = []
    load_dataset(folder, str(tmp_path / "c"), tier="stream", log=said.append)
    assert f"{left}: left by a preparation that was killed; removed" in said
    assert not os.path.exists(left) and os.path.exists(other)


def test_two_processes_preparing_one_dataset_wait_for_one_writer(tmp_path):
    """Two real runs started while the test holds the preparation's lock: both wait (and say so); once it is let go,
    one of them writes each Arrow file, the other waits again and trains on what was written."""
    from kdfast.data.sources import source_key
    from kdfast.data.store import cache_path
    from kdfast.files import FileLock

    data, cache = write_large_folder(str(tmp_path / "d"), 8, 2, 48), str(tmp_path / "c")
    decoded = cache_path(cache, data, source_key(data, "folder", "cifar10"), 37)  # rrc at 32 px: stored at 37
    lock = FileLock(decoded.rsplit(".", 1)[0] + ".lock", "the test's hold").acquire(lambda *a: None)
    writes, logs = str(tmp_path / "writes"), [str(tmp_path / f"{name}.log") for name in ("a", "b")]
    runs = []
    for name, log in zip(("a", "b"), logs):
        with open(log, "w") as out:
            runs.append(subprocess.Popen([sys.executable, "-m", "tests.stop_at", "-1", "kdfast.train",
                                          *train_args(data, cache, str(tmp_path / name), "--data-tier", "stream",
                                                      "--data-workers", "1")[2:]],
                                         stdout=out, stderr=subprocess.STDOUT, text=True,
                                         env={**ENV, "KDFAST_TEST_WRITES": writes}, cwd=ROOT))
    t0 = time.time()
    try:
        while not all("waiting for it" in open(log).read() for log in logs):
            assert time.time() - t0 < 300 and all(r.poll() is None for r in runs), [open(g).read() for g in logs]
            time.sleep(0.05)
    finally:
        lock.release()
    for r, log in zip(runs, logs):
        assert r.wait(600) == 0, open(log).read()[-3000:]
    arrows = [line.split()[1] for line in open(writes) if line.split()[1].endswith(".arrow")]
    assert len(arrows) == 2 and len(set(arrows)) == 2  # each split's file put in place once, by one of them
    metas = [json.load(open(tmp_path / name / "run.json")) for name in ("a", "b")]
    assert metas[0]["data"]["fingerprint"] == metas[1]["data"]["fingerprint"]
