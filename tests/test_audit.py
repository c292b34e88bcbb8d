"""kdfast.audit: what a training step would make a GPU wait for, counted on this CPU. Every path of a step (the
views of each tier and recipe, KD from a cache, DKD, EMA, accumulation, bf16, a ViT) must run its steady-state steps
without one: no .item(), no nonzero or boolean mask, no copy of host data from pageable memory."""
import pytest
import torch
import tyro

from kdfast import distill, train
from kdfast.audit import SyncAudit
from kdfast.config import DistillConfig, TrainConfig
from kdfast.engine.stepaudit import auditing
from kdfast.transfer import upload

from .conftest import write_image_folder

STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("audit") / "tiny"), n_train=24)


def audited(entry, config_cls, args) -> SyncAudit:
    with auditing(STEPS) as audits:
        entry.run(tyro.cli(config_cls, args=args))
    return audits[0]


def common(data, out, cache_dir, batch: int = 16) -> list[str]:
    return ["--data", data, "--cache-dir", cache_dir, "--epochs", "1", "--batch-size", str(batch), "--precision", "fp32",
            "--no-progress", "--data-workers", "0", "--out-dir", str(out)]


PATHS = {
    "default": ["--model", "resnet8"],
    "ema": ["--model", "resnet8", "--ema", "0.9"],
    "bf16 accumulate": ["--model", "resnet8", "--precision", "bf16", "--grad-accum", "2"],
    "cct (policy, mixing, erasing)": ["--model", "resnet8", "--aug-recipe", "cct"],
    "rrc trivialaugment": ["--model", "resnet8", "--augment.view", "rrc", "--augment.crop-size", "24",
                           "--augment.policy", "trivialaugment"],
    "stream cct": ["--model", "resnet8", "--data-tier", "stream", "--aug-recipe", "cct"],
    "stream rrc": ["--model", "resnet8", "--data-tier", "stream", "--augment.view", "rrc", "--augment.crop-size",
                   "24"],
    "vit": ["--model", "timm:test_vit"],
}


def assert_no_sync(audit: SyncAudit):
    steady = audit.steps[2:]
    assert len(steady) == STEPS - 1 and all(s["launches"] > 0 for s in steady)
    assert all(s["sync"] == 0 for s in steady), audit.report()


@pytest.mark.parametrize("path", PATHS)
def test_a_training_step_never_waits_on_the_device(path, folder, tmp_path):
    audit = audited(train, TrainConfig, PATHS[path] + common(folder, tmp_path, str(tmp_path / "cache")))
    assert_no_sync(audit)


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_a_kd_step_from_the_cache_never_waits_on_the_device(method, small_cache, tmp_path):
    data = str(__import__("pathlib").Path(small_cache["h5"]).parent / "tiny")
    audit = audited(distill, DistillConfig, ["--teacher-cache", small_cache["h5"], "--model", "resnet8", "--method",
                                              method, *common(data, tmp_path, small_cache["cache_dir"], batch=4)])
    assert_no_sync(audit)


def test_the_audit_finds_what_makes_a_gpu_wait():
    """Each kind of sync is found and named with its line; fresh tensors take the place of what they meet."""
    weight = torch.randn(4, 3)
    host = torch.arange(4)
    with SyncAudit() as audit:
        audit.mark(weight)
        with audit.step():
            (weight.sum() * 2).item()  # a value read
            weight[weight > 0]  # a boolean mask
            weight[host]  # a host tensor indexing a device one
            weight + torch.tensor([1.0, 2.0, 3.0])  # Python data
            host.to(torch.device("cpu"))  # pageable copy to "the device"
            weight.cpu()  # a copy back
        with audit.step():
            sent, = upload(host, device="cpu")
            weight[sent] * torch.arange(3) + torch.zeros(3)  # fresh tensors meeting device ones: device tensors
            host.clamp(min=0)[:2].tolist()  # host work stays host work
    assert audit.steps[1]["sync"] == 6, audit.report()
    assert audit.steps[2]["sync"] == 0 and audit.steps[2]["uploads"] == 1 and audit.steps[2]["launches"] >= 3
    assert "test_audit" not in audit.report()  # sites are kdfast's lines only ("?" outside kdfast)
