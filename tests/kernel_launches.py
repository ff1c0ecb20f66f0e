"""Test helpers for the Triton backends: the device the kernels run on, and a record of their launches.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``tests/conftest.py`` sets
TRITON_INTERPRET=1 before they are imported) and the backends are told to take CPU tensors; with one they
run compiled on CUDA tensors.
"""

from __future__ import annotations

import torch

from dualadam_hf.optim import triton_backend


def kernel_device(monkeypatch) -> torch.device:
    """The GPU if there is one, else the CPU through the interpreter."""
    if torch.cuda.is_available():
        assert triton_backend.available("cuda")
        return torch.device("cuda")
    from triton import knobs

    assert knobs.runtime.interpret, "tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU"
    monkeypatch.setattr(triton_backend, "DEVICES", ("cuda", "cpu"))
    assert triton_backend.available("cpu")  # its one probing launch made here, before a test counts launches
    return torch.device("cpu")


def record_launches(monkeypatch, module, name: str) -> list[tuple]:
    """Wrap the kernel ``module.name``; every launch appends (Triton's specialisation key of its arguments,
    its sorted keyword arguments, its grid, its arguments) and then runs. The key is what Triton compiles
    one binary per, with the constexprs: see ``compiles``."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kernel = getattr(module, name)
    launches: list[tuple] = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                key = tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in args)
                launches.append((key, tuple(sorted(kwargs.items())), grid, args))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Recorder())
    return launches


def compiles(launches: list[tuple]) -> int:
    """How many binaries Triton would compile for these launches."""
    return len({(key, constexprs) for key, constexprs, _, _ in launches})
