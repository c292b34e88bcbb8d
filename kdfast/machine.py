"""What hardware we run on, and which precision is really fast there."""
from __future__ import annotations

import os
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """The machine facts every benchmark and report carries."""
    flags = cpu_flags()
    info = {
        "cpu": cpu_model(),
        "cpu_flags_of_note": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "native_bf16_cpu": cpu_has_native_bf16(flags),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(requested: str, device_type: str, flags: set[str] | None = None) -> tuple[str, str]:
    """Return (precision actually used, reason) for a requested precision on a device type.

    auto: bf16 on GPUs that have it, fp16 (with loss scaling) on older GPUs; on CPUs bf16
    only where it is native (AMX or AVX512-BF16), since emulated bf16 is 2-3x slower than fp32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if device_type == "cuda":
        if requested == "auto":
            if torch.cuda.is_bf16_supported():
                return "bf16", "auto: this GPU supports bf16"
            return "fp16", "auto: this GPU lacks bf16; fp16 with loss scaling"
        return requested, "requested"
    if device_type == "cpu":
        native = cpu_has_native_bf16(flags)
        if requested == "auto":
            if native:
                return "bf16", "auto: CPU has native bf16 (AMX/AVX512-BF16)"
            return "fp32", "auto: CPU has no native bf16 (no AMX/AVX512-BF16); bf16 would be emulated and slower"
        if requested == "fp16":
            return "fp32", "fp16 autocast is not supported on CPU by Accelerate; running fp32"
        return requested, "requested" + ("" if native or requested == "fp32" else " (bf16 is emulated on this CPU: expect it slower than fp32)")
    # mps and others: keep it simple and exact
    if requested in ("auto", "fp16", "bf16"):
        return "fp32", f"mixed precision not used on {device_type}"
    return requested, "requested"


def accelerate_mixed_precision(precision: str) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


LAUNCH_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _parent_command() -> list[str]:
    """The command line of the process that started this one (`accelerate launch ...`, or its torchrun)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _config_file_precision(command: list[str]) -> str | None:
    """mixed_precision in the Accelerate config file the launch read (--config_file, else the default one), read by
    Accelerate's own loader (YAML or JSON); None when there is none."""
    path = None
    for i, arg in enumerate(command):
        if arg in ("--config_file", "--config-file") and i + 1 < len(command):
            path = command[i + 1]
        elif arg.startswith(("--config_file=", "--config-file=")):
            path = arg.split("=", 1)[1]
    try:
        from accelerate.commands.config.config_args import load_config_from_file

        value = getattr(load_config_from_file(path), "mixed_precision", None)
    except Exception:  # no file, or one Accelerate itself cannot read: the launch then decided nothing from it
        return None
    value = getattr(value, "value", value)  # an enum in some versions
    return str(value) if value is not None else None


def launcher_precision(environ=os.environ, command: list[str] | None = None) -> tuple[str, str] | None:
    """(precision, what decided it) when `accelerate launch` was told one: its --mixed_precision flag or its config
    file; None otherwise. The launcher exports ACCELERATE_MIXED_PRECISION always, "no" when told nothing, so "no"
    counts only when the launch command or its config file says it."""
    value = environ.get("ACCELERATE_MIXED_PRECISION")
    if value not in LAUNCH_PRECISION:
        return None
    command = _parent_command() if command is None else command
    flag = any(a.startswith(("--mixed_precision", "--mixed-precision")) for a in command)
    if flag:
        return LAUNCH_PRECISION[value], f"accelerate launch --mixed_precision {value}"
    configured = _config_file_precision(command)
    if value != "no" or configured == "no":
        return LAUNCH_PRECISION[value], f"accelerate launch (its config file: mixed_precision {value})"
    return None


def launcher_accumulation(environ=os.environ) -> int:
    """accelerate launch --gradient_accumulation_steps N (exported as ACCELERATE_GRADIENT_ACCUMULATION_STEPS), else 1."""
    try:
        return max(1, int(environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")))
    except ValueError:
        return 1


def decide_precision(precision: str, device_type: str, environ=os.environ, command: list[str] | None = None,
                     flags: set[str] | None = None) -> tuple[str, str]:
    """(precision used, what decided it): --precision when given; with auto, a precision `accelerate launch` was
    told (its --mixed_precision or config file) wins over kdfast's own choice (resolve_precision)."""
    launched = launcher_precision(environ, command) if precision == "auto" else None
    if launched is None:
        return resolve_precision(precision, device_type, flags)
    used, reason = resolve_precision(launched[0], device_type, flags)
    return used, f"{launched[1]}, over --precision auto" + ("" if reason == "requested" else f"; {reason}")


HEAP_KEEP = 1 << 30  # bytes: allocations below this come from the heap, and this much freed heap is kept


def keep_freed_memory() -> bool:
    """glibc: serve allocations under HEAP_KEEP from the heap and keep freed heap memory, instead of mapping each large
    tensor anew (glibc's default above 128 kB at first) and faulting its pages in again at every step: a CPU training
    step of ResNet-8 at batch 256 ran about 10% faster (benchmarks/engine_overhead.py). False where not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, HEAP_KEEP) and libc.mallopt(-1, HEAP_KEEP))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
