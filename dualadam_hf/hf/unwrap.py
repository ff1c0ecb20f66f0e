"""Find our optimizer behind Accelerate's and DeepSpeed's wrappers."""

from __future__ import annotations

from typing import Any

from dualadam_hf.optim.dualadam import DualAdam


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer: AcceleratedOptimizer, accelerate's DeepSpeedOptimizerWrapper and
    DeepSpeed's ZeRO optimizers each keep the one they wrap in ``.optimizer``."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen and not isinstance(optimizer, DualAdam):
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def find_dualadam(optimizer: Any) -> DualAdam | None:
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, DualAdam) else None
