"""How much of DualAdam's update is InvAdam's: ``dualadam_inv_share`` = ‖α_t·ũ_t‖ / ‖ū_t‖.

Recomputed from the optimizer's state (m_t, v_t and t are exactly what the latest step used), so it
costs nothing on steps that are not logged. Over all parameters: the sums of squares of this process's
state are returned, so that sharded optimizer states (ZeRO, FSDP2) can be summed across processes first.
"""

from __future__ import annotations

import math

import torch

from dualadam_hf.optim.dualadam import DualAdam
from dualadam_hf.optim.kernels import schedule_alpha
from dualadam_hf.optim.lowbit import is_quantized


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps DTensors; the update is element-wise, so this process's shard is what it holds. The
    # low-bit optimizers keep torchao's quantized tensors, read through dequantize() (a plain one's is itself).
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    # a plain tensor is read as it is: dequantize() would copy it whole (to fp32), past the chunk bound
    return local.dequantize() if is_quantized(local) else local


# Elements per chunk: bounds the temporaries (three fp32 chunks) whatever the size of a tensor.
CHUNK = 1 << 24


@torch.no_grad()
def inv_share_sums(optimizer: DualAdam) -> tuple[float, float]:
    """(Σ ‖α_t·ũ_t‖², Σ ‖ū_t‖²) over the parameters whose state this process holds.

    ũ_t is the InvAdam term as the step used it: rescaled per tensor to the norm of the Adam term u_t
    under ``inv_scale="adam_rms"``, so that its part is then α_t·‖u_t‖. With ū = a·ũ + b·u,
    ‖ū‖² = a²‖ũ‖² + 2ab⟨ũ, u⟩ + b²‖u‖², so one pass over the state per parameter gives every term (all
    of them >= 0: ũ and u have the sign of m̂ element by element).
    """
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
            inv_norm_sq, adam_norm_sq, cross = _term_sums(state, beta1, beta2, group["eps"], step)
            inv_weight = alpha
            if group["inv_scale"] == "adam_rms":
                inv_weight *= math.sqrt(adam_norm_sq / inv_norm_sq) if inv_norm_sq > 0 else 0.0
            adam_weight = 1.0 - alpha
            inv_sq += inv_weight**2 * inv_norm_sq
            bar_sq += (
                inv_weight**2 * inv_norm_sq + 2 * inv_weight * adam_weight * cross + adam_weight**2 * adam_norm_sq
            )
    return inv_sq, bar_sq


def _term_sums(state: dict, beta1: float, beta2: float, eps: float, step: int) -> tuple[float, float, float]:
    """(‖ũ‖², ‖u‖², ⟨ũ, u⟩) of one parameter's latest step, with ũ = m̂·√v̂ and u = m̂/(√v̂+ε), chunk by chunk."""
    exp_avg = _local(state["exp_avg"]).reshape(-1)
    exp_avg_sq = _local(state["exp_avg_sq"]).reshape(-1)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    inv_sq = adam_sq = cross = 0.0
    for m, v in zip(exp_avg.split(CHUNK), exp_avg_sq.split(CHUNK)):
        m_hat = m.float() / bias_correction1  # new tensors: .float() of fp32 state is the state
        sqrt_v_hat = (v.float() / bias_correction2).sqrt_()
        inv = torch.mul(m_hat, sqrt_v_hat)
        adam = m_hat.div_(sqrt_v_hat.add_(eps))
        inv_sq += torch.dot(inv, inv).item()
        adam_sq += torch.dot(adam, adam).item()
        cross += torch.dot(inv, adam).item()
    return inv_sq, adam_sq, cross


def inv_share(inv_sq: float, bar_sq: float) -> float | None:
    return math.sqrt(inv_sq / bar_sq) if bar_sq > 0 else None
