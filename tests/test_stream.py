"""The streamed tier in real processes: memory well below the decoded size, SIGKILL mid-epoch then --resume."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

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
