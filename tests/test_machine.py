from pathlib import Path

import pytest
import torch

from kdfast.machine import decide_precision, launcher_precision, resolve_precision

AMX = {"avx512f", "amx_bf16", "amx_tile"}
AVX512 = {"avx512f", "avx512bw"}


@pytest.mark.parametrize("requested,flags,expected", [
    ("auto", AMX, "bf16"), ("auto", AVX512, "fp32"), ("auto", {"avx512_bf16"}, "bf16"),
    ("fp32", AMX, "fp32"), ("bf16", AVX512, "bf16"), ("fp16", AMX, "fp32"),
])
def test_cpu_precision(requested, flags, expected):
    used, reason = resolve_precision(requested, "cpu", flags)
    assert used == expected and reason


def test_emulated_bf16_is_called_out():
    assert "emulated" in resolve_precision("bf16", "cpu", AVX512)[1]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("fp8", "cpu", AMX)


def test_accelerate_launch_precision_wins_over_auto_and_says_so(tmp_path):
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    config = tmp_path / "accelerate.yaml"  # what `accelerate config` writes, read by Accelerate's own loader
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n")
    assert launcher_precision(env, ["accelerate", "launch", "--config_file", str(config)])[0] == "fp32"
    assert launcher_precision(env, ["accelerate", "launch", "--mixed_precision", "no", "-m", "kdfast.train"]) == \
        ("fp32", "accelerate launch --mixed_precision no")
    assert launcher_precision({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["accelerate", "launch"])[0] == "bf16"
    assert launcher_precision(env, ["accelerate", "launch", "--config_file", "/nonexistent.yaml"]) is None  # not said
    assert launcher_precision({}, ["python"]) is None


LAUNCH_CONFIGS = sorted((Path(__file__).parent.parent / "launch").glob("*.yaml"))


@pytest.mark.parametrize("config", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_shipped_launch_configs_keep_kdfasts_precision(config, monkeypatch, tmp_path):
    """`accelerate launch --config_file launch/X.yaml` exports ACCELERATE_MIXED_PRECISION=no; the real decision then
    gives bf16 on a GPU that has it and the CPU's own precision on a CPU, not the fp32 an explicit "no" means."""
    assert LAUNCH_CONFIGS, "no launch configs found"
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    command = ["accelerate", "launch", "--config_file", str(config), "-m", "kdfast.lab"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert decide_precision("auto", "cuda", env, command)[0] == "bf16"
    assert decide_precision("auto", "cpu", env, command, AMX)[0] == "bf16"
    assert decide_precision("auto", "cpu", env, command, AVX512)[0] == "fp32"
    said = tmp_path / config.name  # the same file with the line the shipped ones used to have: fp32
    said.write_text(config.read_text() + 'mixed_precision: "no"\n')
    assert decide_precision("auto", "cuda", env, ["accelerate", "launch", "--config_file", str(said)])[0] == "fp32"
