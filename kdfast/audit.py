"""What a step would make a GPU wait for, counted on any machine, a CPU included.

On a GPU the host queues kernels and runs ahead; it stops and waits for the device whenever it needs a value the
device computes (``.item()``, ``nonzero``, a boolean mask, ``.tolist()``, a copy to the host) or copies host data
from pageable memory to the device (CUDA drains the stream first). ``torch.cuda.set_sync_debug_mode`` finds these on
a GPU only; this audit finds them on a CPU by following where each tensor would live:

- device tensors: what the caller marks (the model, its optimizer state, the stored images), what
  ``kdfast.transfer.upload`` sends, and whatever an operation computes from a device tensor;
- host tensors: what exists unmarked (indices, sizes, kdfast's per-sample parameters computed on the host);
- fresh tensors (a factory such as ``zeros``/``arange``, or ``torch.tensor`` of Python data): they are what they
  first meet, since their ``device=`` cannot be told apart on a CPU; one made from Python data that meets a device
  tensor is a pageable copy.

Counted per step: ``sync`` events (each named, with the kdfast line that caused it), ``uploads`` (non-blocking
copies through ``upload``) and ``launches`` (operations on device tensors: about one kernel each).
"""
from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from . import transfer

DEVICE, FRESH, FROM_HOST = "device", "fresh", "from host"  # an unmarked tensor is a host tensor
aten = torch.ops.aten
READS_VALUES = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
                aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave,
                aten.masked_scatter, aten.argwhere, aten.nonzero_static}
HOST_READS = {"tolist", "numpy", "cpu"}  # (item, bool(), int() are aten._local_scalar_dense)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _site() -> str:
    """The innermost kdfast line (outside this module and transfer) of the current call."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/kdfast/" in frame.filename and not frame.filename.endswith(("audit.py", "transfer.py")):
            return f"{frame.filename.split('/kdfast/')[-1]}:{frame.lineno} {frame.line}"
    return "?"


class SyncAudit:
    """Count what would make a GPU wait: ``with SyncAudit() as audit: audit.mark(model, ...); with audit.step(): ...``;
    then ``audit.steps`` (a Counter per step: ``sync``, ``uploads``, ``launches``) and ``audit.sites`` (sync events by
    kind and kdfast line)."""

    def __init__(self):
        self.kind = WeakIdKeyDictionary()
        self.steps: list[Counter] = [Counter()]
        self.sites: Counter = Counter()
        self._modes = contextlib.ExitStack()

    def __enter__(self):
        transfer.AUDIT = self
        self._modes.enter_context(_Functions(self))
        self._modes.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc):
        self._modes.close()
        transfer.AUDIT = None

    @contextlib.contextmanager
    def step(self):
        self.steps.append(Counter())
        yield self.steps[-1]

    def mark(self, *things) -> None:
        """Mark as device tensors: tensors, modules (parameters, buffers, gradients), optimizers (their state),
        dicts and lists of them."""
        for thing in things:
            if isinstance(thing, torch.Tensor):
                self.kind[thing] = DEVICE
            elif isinstance(thing, torch.nn.Module):
                self.mark(*thing.parameters(), *thing.buffers(), *[p.grad for p in thing.parameters()
                                                                    if p.grad is not None])
            elif isinstance(thing, torch.optim.Optimizer):
                self.mark(*[v for state in thing.state.values() for v in state.values()])
            elif isinstance(thing, dict):
                self.mark(*thing.values())
            elif isinstance(thing, (list, tuple)):
                self.mark(*thing)

    def kind_of(self, t: torch.Tensor) -> str:
        return self.kind.get(t, "host")

    def sync(self, what: str) -> None:
        self.steps[-1]["sync"] += 1
        self.sites[(what, _site())] += 1

    def uploaded(self, tensors):
        """What transfer.upload sends, as device tensors (copies, so the host's own stay host tensors)."""
        self.steps[-1]["uploads"] += 1
        copies = tuple(t.clone() for t in tensors)
        self.mark(*copies)
        return copies

    def report(self) -> str:
        return "\n".join(f"{n:5d} x {what}: {site}" for (what, site), n in self.sites.most_common())


class _Functions(TorchFunctionMode):
    """Python-level calls a CPU runs as no-ops: .to(a device) of a host tensor, .cpu() / .tolist() of a device one."""

    def __init__(self, audit: SyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            return out
        t, audit = args[0], self.audit
        kind = audit.kind_of(t)
        if name in HOST_READS and kind == DEVICE:
            audit.sync(f"Tensor.{name} of a device tensor")
        elif name == "to" and kind == DEVICE and _target(args, kwargs) == "host":
            audit.sync("Tensor.to(host) of a device tensor")
            out = out.clone() if out is t else out
            audit.kind.pop(out, None)
        elif name == "to" and kind != DEVICE and t.dim() > 0 and _target(args, kwargs) == "device":
            audit.sync("Tensor.to(device) of host memory (pageable: waits for the device)")
            out = out.clone() if out is t else out
            audit.kind[out] = DEVICE
        return out


def _target(args, kwargs) -> str | None:
    """Where a Tensor.to call sends its tensor: "device" (a torch.device or another tensor's device), "host" (the
    string "cpu"), or None (a dtype only)."""
    device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device, torch.Tensor))),
                                       None))
    if isinstance(device, str):
        return "host" if device == "cpu" else "device"
    return None if device is None else "device"


class _Dispatch(TorchDispatchMode):
    """Every operation: reads of device values, host data meeting device data, and where each output lives."""

    def __init__(self, audit: SyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        audit = self.audit
        if func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):  # torch.tensor(Python data)
            out = func(*args, **kwargs)
            audit.kind[out] = FROM_HOST
            return out
        inputs = _tensors((args, kwargs))
        kinds = [audit.kind_of(t) for t in inputs]
        on_device = DEVICE in kinds
        if on_device:
            self._check(func, args, inputs, kinds)
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if on_device:
            audit.steps[-1]["launches"] += 0 if func.is_view else 1
            for t, kind in zip(inputs, kinds):
                if kind in (FRESH, FROM_HOST):
                    audit.kind[t] = DEVICE
            if func is aten.copy_.default and kinds[0] == "host":
                outputs = []  # a copy into host memory stays there
            for t in outputs:
                audit.kind[t] = DEVICE
        elif not inputs or all(k in (FRESH, FROM_HOST) for k in kinds):
            fresh = FROM_HOST if (func is aten.lift_fresh.default or FROM_HOST in kinds) else FRESH
            for t in outputs:
                audit.kind[t] = fresh
        else:  # host data: fresh tensors meeting it are host tensors
            for t in inputs + outputs:
                audit.kind.pop(t, None)
        return out

    def _check(self, func, args, inputs, kinds) -> None:
        audit = self.audit
        if func.overloadpacket in READS_VALUES:
            audit.sync(f"{func.overloadpacket.__name__} of a device tensor")
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
                t.dtype == torch.bool for t in _tensors(args[1:2])):
            audit.sync("a boolean mask index (a nonzero)")
        if func is aten.copy_.default and kinds[0] == "host" and kinds[1] == DEVICE:
            audit.sync("copy of a device tensor into host memory")
            return
        for t, kind in zip(inputs, kinds):
            if kind == FROM_HOST:
                audit.sync("a tensor of Python data meets a device tensor (a pageable copy)")
            elif kind == "host" and t.dim() > 0:
                audit.sync(f"host tensor {tuple(t.shape)} in {func.overloadpacket.__name__} with a device tensor "
                           "(a pageable copy, or a device mismatch on a GPU)")


class CudaSyncCount:
    """The syncs of each step on a real GPU, as torch reports them: ``torch.cuda.set_sync_debug_mode("warn")`` warns at
    every synchronizing operation. The interface of SyncAudit (mark, step, steps, report); CUDA only."""

    def __init__(self):
        self.steps: list[Counter] = [Counter()]
        self.sites: Counter = Counter()
        self._caught = None

    def __enter__(self):
        self._caught = warnings.catch_warnings(record=True)
        self.log = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(*exc)

    def mark(self, *things) -> None:
        pass

    @contextlib.contextmanager
    def step(self):
        self.steps.append(Counter())
        first = len(self.log)
        yield self.steps[-1]
        synced = [w for w in self.log[first:] if "synchroniz" in str(w.message)]
        self.steps[-1]["sync"] = len(synced)
        for w in synced:
            self.sites[(str(w.message).splitlines()[0][:80], f"{w.filename.split('/kdfast/')[-1]}:{w.lineno}")] += 1

    report = SyncAudit.report
