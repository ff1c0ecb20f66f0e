"""How much of DualAdam's update is InvAdam's: ``dualadam_inv_share`` = ‖α_t·ũ_t‖ / ‖ū_t‖.

Recomputed from the optimizer's state (m_t, v_t and t are exactly what the latest step used), so it
costs nothing on steps that are not logged. Over all parameters: the sums of squares of this process's
state are returned, so that sharded optimizer states (ZeRO, FSDP2) can be summed across processes first.
"""

from __future__ import annotations

import math

import torch

from dualadam_hf.optimizer import DualAdam, schedule_alpha


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps DTensors; the update is element-wise, so this process's shard is what it holds.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def inv_share_sums(optimizer: DualAdam) -> tuple[float, float]:
    """(Σ ‖α_t·ũ_t‖², Σ ‖ū_t‖²) over the parameters whose state this process holds."""
    inv_sq = 0.0
    bar_sq = 0.0
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            step = int(state["step"].item())
            alpha = schedule_alpha(group, step, optimizer._custom_schedule)
            m_hat = _local(state["exp_avg"]).double() / (1.0 - beta1**step)
            sqrt_v_hat = (_local(state["exp_avg_sq"]).double() / (1.0 - beta2**step)).sqrt()
            inv = m_hat * sqrt_v_hat * alpha
            bar = inv + m_hat / (sqrt_v_hat + group["eps"]) * (1.0 - alpha)
            inv_sq += inv.square().sum().item()
            bar_sq += bar.square().sum().item()
    return inv_sq, bar_sq


def inv_share(inv_sq: float, bar_sq: float) -> float | None:
    return math.sqrt(inv_sq / bar_sq) if bar_sq > 0 else None
