"""Fused backend for DualAdam (work in progress: the performance issue replaces this module)."""

from __future__ import annotations

from torch import Tensor


def preferred(params: list[Tensor]) -> bool:
    return False


def check_available(param_groups: list[dict], name: str) -> None:
    raise RuntimeError(f"{name}: fused=True is not available in this build")


def fused_dualadam(*args, **kwargs) -> None:
    raise RuntimeError("fused backend not available")
