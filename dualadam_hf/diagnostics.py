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


# Elements per chunk: bounds the temporaries (three fp32 chunks) whatever the size of a tensor.
CHUNK = 1 << 24


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
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            exp_avg = _local(state["exp_avg"]).reshape(-1)
            exp_avg_sq = _local(state["exp_avg_sq"]).reshape(-1)
            for m, v in zip(exp_avg.split(CHUNK), exp_avg_sq.split(CHUNK)):
                m = m.float()
                sqrt_v_hat = v.float().div(bias_correction2).sqrt_()
                inv_sq += (alpha / bias_correction1) ** 2 * torch.mul(m, sqrt_v_hat).square_().sum().item()
                # ū = m̂·(α·√v̂ + (1-α)/(√v̂+ε))
                factor = torch.add(sqrt_v_hat, group["eps"]).reciprocal_().mul_(1.0 - alpha)
                factor.add_(sqrt_v_hat, alpha=alpha)
                bar_sq += torch.mul(m, factor).square_().sum().item() / bias_correction1**2
    return inv_sq, bar_sq


def inv_share(inv_sq: float, bar_sq: float) -> float | None:
    return math.sqrt(inv_sq / bar_sq) if bar_sq > 0 else None
