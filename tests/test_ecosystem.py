"""First run and the ecosystem: data downloaded by default (from a server on 127.0.0.1 the test starts), CIFAR-100,
timm: and torchvision: models, pretrained weights, experiment trackers. No test reaches the network."""
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from kdfast import cache, distill, evaluate, lab, train
from kdfast.augment import CIFAR100_MEAN, CIFAR100_STD
from kdfast.cache import BuildConfig, LogitCache
from kdfast.config import DistillConfig, EvaluateConfig, LabConfig, TrainConfig
from kdfast.data import DataError, load_dataset
from kdfast.models import create_model

from .conftest import common, write_image_folder
from .test_runs import one_line_error


# ---------------------------------------------------------------- a file server on 127.0.0.1

@pytest.fixture
def server(tmp_path):
    """Serves the files of tmp_path/served at http://127.0.0.1:PORT/; yields (folder, base url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tiny_torchvision_archive(dataset: str, classes: int, per_class: int) -> tuple[bytes, dict]:
    """A .tar.gz in torchvision's CIFAR-10 / CIFAR-100 layout, and the MD5 of each file in it."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    images = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    names = [f"class{c:03d}" for c in range(classes)]
    key = "labels" if dataset == "cifar10" else "fine_labels"
    if dataset == "cifar10":
        folder = "cifar-10-batches-py"
        files = {f"data_batch_{k}": {"data": images, key: labels.tolist()} for k in range(1, 6)}
        files["test_batch"] = {"data": images[:classes], key: labels[:classes].tolist()}
        files["batches.meta"] = {"label_names": names}
    else:
        folder = "cifar-100-python"
        files = {"train": {"data": images, key: labels.tolist()}, "test": {"data": images[:classes], key: labels[:classes].tolist()},
                 "meta": {"fine_label_names": names}}
    blobs = {name: pickle.dumps(content) for name, content in files.items()}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out.getvalue(), {name: md5(blob) for name, blob in blobs.items()}


def point_torchvision_at(monkeypatch, dataset: str, url: str, archive: bytes, sums: dict):
    """torchvision's dataset class fetches `url` and checks the MD5 sums of the tiny archive instead of the real ones."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    monkeypatch.setattr(cls, "url", url)
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    if dataset == "cifar10":
        monkeypatch.setattr(cls, "train_list", [[f"data_batch_{k}", sums[f"data_batch_{k}"]] for k in range(1, 6)])
        monkeypatch.setattr(cls, "test_list", [["test_batch", sums["test_batch"]]])
        monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": sums["batches.meta"]})
    else:
        monkeypatch.setattr(cls, "train_list", [["train", sums["train"]]])
        monkeypatch.setattr(cls, "test_list", [["test", sums["test"]]])
        monkeypatch.setattr(cls, "meta", {"filename": "meta", "key": "fine_label_names", "md5": sums["meta"]})


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_the_default_data_folder_is_downloaded_when_missing(tmp_path, server, monkeypatch, dataset, classes):
    folder, base = server
    archive, sums = tiny_torchvision_archive(dataset, classes, per_class=2)
    (folder / "tiny.tar.gz").write_bytes(archive)
    point_torchvision_at(monkeypatch, dataset, f"{base}/tiny.tar.gz", archive, sums)
    monkeypatch.delenv("KDFAST_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    said = []
    ds = load_dataset(None, "cache", log=said.append, dataset=dataset)  # no --data, no KDFAST_DATA: ./data
    assert any("downloading" in s for s in said), said
    assert os.path.isdir(tmp_path / "data" / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"))
    assert len(ds.classes) == classes and len(ds.train) == 2 * classes * (5 if dataset == "cifar10" else 1)
    assert ds.train.labels.max().item() == classes - 1
    (folder / "tiny.tar.gz").unlink()  # the second run needs no server: the files (and the decoded cache) are here
    again = load_dataset(None, "cache", log=said.append, dataset=dataset)
    assert again.fingerprint == ds.fingerprint


def test_an_explicit_missing_folder_is_not_downloaded_into(tmp_path, monkeypatch):
    monkeypatch.delenv("KDFAST_DATA", raising=False)
    with pytest.raises(DataError, match=r"no such file or folder.*--download"):
        load_dataset(str(tmp_path / "typo"), str(tmp_path / "cache"))
    assert not (tmp_path / "typo").exists()


def test_without_network_the_default_data_says_the_fix_in_one_line(tmp_path, monkeypatch, capsys):
    import socket
    import torchvision.datasets as tvd

    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(tvd.CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    monkeypatch.delenv("KDFAST_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, train.main, ["--epochs", "1", "--no-progress"])
    assert "downloading CIFAR-10 failed" in err and "--data" in err and "KDFAST_DATA" in err, err


# ---------------------------------------------------------------- CIFAR-100-shaped data, end to end

def write_many_classes(root: str, classes: int = 100, n_train: int = 3, n_test: int = 2) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c:03d}"))
            colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256])
            for i in range(n):
                img = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, f"c{c:03d}", f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def hundred(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    return {"data": write_many_classes(str(root / "data")), "cache_dir": str(root / "cache")}


def test_hundred_classes_train_cache_dense_and_topk_distill(hundred, tmp_path):
    common = dict(dataset="cifar100", data=hundred["data"], cache_dir=hundred["cache_dir"], out_dir=str(tmp_path),
                  batch_size=50, eval_batch_size=100, precision="fp32", progress=False)
    teacher = train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, **common))
    assert len(teacher["classes"]) == 100
    assert tuple(teacher["config"]["augment"]["mean"]) == CIFAR100_MEAN  # the dataset's normalization
    assert tuple(teacher["config"]["augment"]["std"]) == CIFAR100_STD
    for topk in (0, 5):
        h5 = str(tmp_path / f"t{topk}.h5")
        cache.build(BuildConfig(teacher=str(tmp_path / "teacher.pth"), out=h5, slots=1, dataset="cifar100",
                                data=hundred["data"], cache_dir=hundred["cache_dir"], topk=topk, precision="fp32",
                                progress=False))
        meta = distill.run(DistillConfig(model="resnet8", name=f"kd{topk}", epochs=1, teacher_cache=h5, **common))
        assert len(meta["classes"]) == 100 and 0 <= meta["test_accuracy"] <= 1
    # a student that does not give the dataset takes the cache's, and its normalization; an explicit one is kept even
    # where it is the default (here it is refused: its normalization is not the cache's); other views are refused
    meta = distill.run(DistillConfig(model="resnet8", name="taken", epochs=1, teacher_cache=str(tmp_path / "t0.h5"),
                                     **{k: v for k, v in common.items() if k != "dataset"}))
    assert tuple(meta["config"]["augment"]["mean"]) == CIFAR100_MEAN and meta["config"]["dataset"] == "cifar100"
    with pytest.raises(Exception, match="(?s)does not match.*augment"):
        distill.run(DistillConfig(model="resnet8", name="given", epochs=1, teacher_cache=str(tmp_path / "t0.h5"),
                                  **{**common, "dataset": "cifar10"}))
    from kdfast.augment import AugmentSpec

    with pytest.raises(Exception, match="(?s)does not match.*augment"):
        distill.run(DistillConfig(model="resnet8", name="wrong", epochs=1, teacher_cache=str(tmp_path / "t0.h5"),
                                  **{**common, "augment": AugmentSpec(padding=2)}))


def test_hundred_classes_lab_end_to_end(hundred, tmp_path):  # small teachers: the pairs' plumbing is what is tested
    report = lab.run(LabConfig(preset="smoke", dataset="cifar100", data=hundred["data"], cache_dir=hundred["cache_dir"],
                               out_dir=str(tmp_path / "m"), report=str(tmp_path / "report.json"), train_per_class=0,
                               test_per_class=0, cnn_teacher_epochs=1, cnn_student_epochs=1, vit_teacher_epochs=1,
                               vit_student_epochs=1, cnn_batch_size=100, vit_batch_size=100, eval_batch_size=100,
                               precision="fp32", progress=False, cnn_teacher="resnet8", vit_teacher="timm:test_vit"))
    for pair in ("cnn", "vit"):
        assert report[pair]["details"]["teacher"]["train_size"] == 300
        for name in ("teacher", "student_no_kd", "student_with_kd"):
            with open(tmp_path / "m" / f"{pair}_{name}.json") as f:
                meta = json.load(f)
            assert len(meta["classes"]) == 100 and meta["config"]["dataset"] == "cifar100"


# ---------------------------------------------------------------- library models

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return {"data": write_image_folder(str(root / "tiny")), "cache_dir": str(root / "cache")}


@pytest.mark.parametrize("model", ["torchvision:mobilenet_v3_small", "timm:test_vit", "timm:test_resnet@48",
                                   "vit_tiny_224"])
def test_library_models_train_reload_and_teach_from_a_cache(small, tmp_path, model):
    common = dict(data=small["data"], cache_dir=small["cache_dir"], out_dir=str(tmp_path), batch_size=6,
                  eval_batch_size=5, precision="fp32", progress=False)
    meta = train.run(TrainConfig(model=model, name="lib", epochs=1, **common))
    assert meta["model"] == model  # the full name: evaluate and the cache rebuild the same model
    again = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "lib.pth")))
    assert again["accuracy"] == meta["test_accuracy"]
    h5 = str(tmp_path / "lib.h5")
    cache.build(BuildConfig(teacher=str(tmp_path / "lib.pth"), out=h5, slots=1, data=small["data"],
                            cache_dir=small["cache_dir"], precision="fp32", progress=False))
    student = distill.run(DistillConfig(model="resnet8", name="student", epochs=1, teacher_cache=h5, **common))
    assert student["kd"]["teacher_model"] == model


def test_kdfast_models_says_how_to_name_library_models(capsys):
    from kdfast import cli

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet8" in out and "vit_tiny_224" in out and "timm:NAME" in out and "torchvision:NAME" in out


def test_a_mistyped_library_model_gets_the_library_close_matches(small, tmp_path, capsys):
    err = one_line_error(capsys, train.main, ["--model", "timm:resnet5O", "--data", small["data"], "--out-dir",
                                              str(tmp_path), "--no-progress"])
    assert "timm:resnet50" in err
    err = one_line_error(capsys, train.main, ["--model", "mobilenet_v3_small", "--data", small["data"], "--no-progress"])
    assert "torchvision:mobilenet_v3_small" in err


# ---------------------------------------------------------------- pretrained weights

def test_pretrained_torchvision_weights_are_downloaded_once_with_their_hash(server, tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights

    from kdfast.models import create_model

    folder, base = server
    reference = create_model("torchvision:resnet18", num_classes=1000).state_dict()
    buf = io.BytesIO()
    torch.save(reference, buf)
    blob = buf.getvalue()
    name = f"resnet18-{hashlib.sha256(blob).hexdigest()[:8]}.pth"  # torch hub checks this prefix
    (folder / name).write_bytes(blob)
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", f"{base}/{name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for model_name in ("resnet18", "torchvision:resnet18"):  # the registered CIFAR-stem one and the library one
        model = create_model(model_name, num_classes=10, pretrained=True)
        assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], reference["layer3.0.conv1.weight"])
        assert model.fc.out_features == 10
    (folder / name).unlink()  # now from the local cache
    model = create_model("torchvision:resnet18", num_classes=10, pretrained=True)
    assert torch.equal(model.state_dict()["layer1.0.bn1.running_var"], reference["layer1.0.bn1.running_var"])


def test_pretrained_timm_weights_offline_and_not_cached_say_so(tmp_path, monkeypatch, capsys, small):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"), raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    err = one_line_error(capsys, train.main, ["--model", "timm:test_vit", "--pretrained", "--data", small["data"],
                                              "--cache-dir", small["cache_dir"], "--out-dir", str(tmp_path),
                                              "--no-progress"])
    assert "--pretrained: could not get the weights of timm:test_vit" in err and "without --pretrained" in err
    # each command names its own flag for the library's weights: the one the user passed
    common = ["--data", small["data"], "--cache-dir", small["cache_dir"], "--no-progress"]
    err = one_line_error(capsys, distill.main, ["--teacher", "timm:test_vit", "--teacher-pretrained", "--model",
                                                "resnet8", "--out-dir", str(tmp_path), *common])
    assert err.startswith("kdfast: error: --teacher-pretrained: could not get") and "without --teacher-pretrained" in err
    err = one_line_error(capsys, lab.main, ["--preset", "smoke", "--pairs", "cnn", "--cnn-teacher", "timm:test_vit",
                                            "--cnn-teacher-pretrained", "--out-dir", str(tmp_path / "lab"), "--report",
                                            str(tmp_path / "lab" / "r.json"), "--cnn-batch-size", "6", *common])
    assert "--cnn-teacher-pretrained: could not get" in err and "without --cnn-teacher-pretrained" in err


def test_a_damaged_file_in_the_hub_caches_is_named_with_the_command_that_removes_it(tmp_path, monkeypatch):
    """A download cut short stays in torch's or the Hugging Face cache: the error names that file, not "neither in the
    local cache nor downloadable"."""
    import huggingface_hub.constants as hub
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    os.makedirs(cached.parent)
    cached.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=rf"torchvision:resnet18 .*are in the local cache, but {cached} cannot be read"
                                         rf".*damaged.*Remove it \(rm -f {cached}\)"):
        create_model("torchvision:resnet18", num_classes=10, pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"), raising=False)
    repo = tmp_path / "hf" / "models--timm--test_vit.r160_in1k"
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text("0" * 40)
    os.makedirs(repo / "blobs")
    (repo / "blobs" / "abc").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    os.makedirs(repo / "snapshots" / ("0" * 40))
    link = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    os.symlink(os.path.join("..", "..", "blobs", "abc"), link)
    with pytest.raises(ValueError, match=rf"timm:test_vit are in the local cache, but {link} cannot be read.*"
                                         rf"rm -f {repo / 'blobs' / 'abc'} {link}"):
        create_model("timm:test_vit", num_classes=10, pretrained=True)


# ---------------------------------------------------------------- experiment trackers

def test_tensorboard_gets_every_epoch_of_the_metrics_file(small, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    meta = train.run(TrainConfig(model="resnet8", name="tb", epochs=2, data=small["data"], cache_dir=small["cache_dir"],
                                 out_dir=str(tmp_path), batch_size=6, eval_batch_size=5, precision="fp32",
                                 progress=False, log_with="tensorboard"))
    with open(tmp_path / "tb.metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    logdir = tmp_path / "logs" / "tb"
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.rglob("*")), list(logdir.rglob("*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "img_per_s"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert meta["test_accuracy"] == records[-1]["test_accuracy"]


def test_a_timm_teacher_from_a_plain_state_dict_builds_a_cache_and_teaches(tiny_data, tmp_path):
    outside = create_model("timm:test_resnet", num_classes=3)
    torch.save({"state_dict": {"module." + k: v for k, v in outside.state_dict().items()}}, tmp_path / "sd.pth")
    h5 = cache.build(BuildConfig(teacher="timm:test_resnet", teacher_weights=str(tmp_path / "sd.pth"),
                                 out=str(tmp_path / "t.h5"), slots=1, data=tiny_data["data"], cache_dir=tiny_data["cache_dir"],
                                 precision="fp32", progress=False))
    assert LogitCache(h5).attrs["teacher_model"] == "timm:test_resnet"
    student = distill.run(DistillConfig(model="resnet8", name="s", epochs=1, teacher_cache=h5, **common(tiny_data, tmp_path)))
    assert student["kd"]["mode"] == "cached"
    # kdfast import: the same weights as a checkpoint, taught from online
    from kdfast import import_weights

    meta = import_weights.run(import_weights.ImportConfig(weights=str(tmp_path / "sd.pth"), model="timm:test_resnet",
                                                           data=tiny_data["data"], out_dir=str(tmp_path / "m")))
    assert meta["classes"] == ["cat", "dog", "frog"]
    online = distill.run(DistillConfig(model="resnet8", name="o", epochs=1, teacher=str(tmp_path / "m" / "sd.pth"),
                                       **common(tiny_data, tmp_path)))
    assert online["kd"]["teacher_model"] == "timm:test_resnet"


def test_a_pretrained_torchvision_teacher_served_from_localhost_builds_a_cache_and_teaches(server, tiny_data, tmp_path,  # noqa: F811
                                                                                           monkeypatch):
    from torchvision.models import MobileNet_V3_Small_Weights

    folder, base = server
    buf = io.BytesIO()
    torch.save(create_model("torchvision:mobilenet_v3_small", num_classes=1000).state_dict(), buf)
    name = f"mobilenet_v3_small-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"  # torch hub checks the prefix
    (folder / name).write_bytes(buf.getvalue())
    monkeypatch.setattr(MobileNet_V3_Small_Weights.IMAGENET1K_V1.value, "url", f"{base}/{name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    h5 = cache.build(BuildConfig(teacher="torchvision:mobilenet_v3_small", teacher_pretrained=True,
                                 out=str(tmp_path / "t.h5"), slots=1, data=tiny_data["data"], cache_dir=tiny_data["cache_dir"],
                                 precision="fp32", progress=False))
    student = distill.run(DistillConfig(model="resnet8", name="s", epochs=1, teacher_cache=h5, **common(tiny_data, tmp_path)))
    assert student["kd"]["teacher_model"] == "torchvision:mobilenet_v3_small"


def test_a_teacher_given_by_name_alone_or_without_its_json_says_what_to_do(tiny_data, tmp_path, capsys):
    err = one_line_error(capsys, distill.main, ["--teacher", "timm:resnet18", "--data", tiny_data["data"], "--cache-dir",
                                                tiny_data["cache_dir"], "--out-dir", str(tmp_path), "--no-progress"])
    assert "a model name, not a checkpoint" in err and "--teacher-weights" in err
    torch.save(create_model("resnet8", num_classes=3).state_dict(), tmp_path / "plain.pth")
    err = one_line_error(capsys, distill.main, ["--teacher", str(tmp_path / "plain.pth"), "--data", tiny_data["data"],
                                                "--cache-dir", tiny_data["cache_dir"], "--out-dir", str(tmp_path),
                                                "--no-progress"])
    assert "kdfast import" in err
