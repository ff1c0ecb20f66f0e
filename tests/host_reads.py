"""Counting the host's reads of tensor values: on a GPU each one waits for the device to catch up."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads:
    """Counts, while entered (re-entrant, cumulative), the reads of tensor values by the host: on a GPU
    each one waits for the device. Counted where Python asks for values (``.tolist()`` on a CPU tensor
    dispatches no aten op at all) and where aten reads them (``_local_scalar_dense`` behind ``.item()``,
    ``int()`` and ``bool()``, outputs sized by the data such as ``nonzero``, copies to the host); each read
    once."""

    METHODS = {"tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__"}
    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "unique_consecutive", "_unique2"}

    def __init__(self) -> None:
        self.count = 0
        self.inside_method = 0
        self.modes: list[tuple[TorchFunctionMode, TorchDispatchMode]] = []

    def __enter__(self) -> HostReads:
        modes = (_ReadMethods(self), _ReadOps(self))
        for mode in modes:
            mode.__enter__()
        self.modes.append(modes)
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes.pop()):
            mode.__exit__(*exc)


class _ReadMethods(TorchFunctionMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) not in HostReads.METHODS:
            return func(*args, **(kwargs or {}))
        self.reads.count += 1
        self.reads.inside_method += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.reads.inside_method -= 1


CPU = torch.device("cpu")


class _ReadOps(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.reads.inside_method:
            name = func.overloadpacket.__name__
            to_host = name == "_to_copy" and args[0].device.type != "cpu" and kwargs.get("device") == CPU
            to_host = to_host or (name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu")
            self.reads.count += name in HostReads.OPS or to_host
        return func(*args, **kwargs)
