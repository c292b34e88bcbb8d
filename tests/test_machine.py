import pytest

from kdfast.machine import resolve_precision

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
