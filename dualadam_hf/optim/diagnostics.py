"""How much of DualAdam's update is InvAdam's: ``dualadam_inv_share`` = ‖α_t·ũ_t‖ / ‖ū_t‖.

Recomputed from the optimizer's state (m_t, v_t and t are exactly what the latest step used), so it
costs nothing on steps that are not logged. Over all parameters: the sums of squares of this process's
state are returned, so that sharded optimizer states (ZeRO, FSDP2) can be summed across processes first.
"""

from __future__ import annotations

import math

import torch

from dualadam_hf.optim.dualadam import DualAdam, read_per_device
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

    The host reads two values per device: the step counters, then every parameter's three sums. A read
    per parameter and chunk would wait for a GPU some thousand times at a 1B model's 341 tensors.
    """
    held = [
        (group, state)
        for group in optimizer.param_groups
        for state in (optimizer.state.get(p) for p in group["params"])
        if state
    ]
    steps = read_per_device([state["step"].reshape(()) for _, state in held])
    sums = read_per_device([
        _term_sums(state, *group["betas"], group["eps"], int(step))
        for (group, state), step in zip(held, steps)
    ])
    inv_sq = 0.0
    bar_sq = 0.0
    for (group, _), step, (inv_norm_sq, adam_norm_sq, cross) in zip(held, steps, sums):
        alpha = schedule_alpha(group, int(step), optimizer._custom_schedule)
        inv_weight = alpha
        if group["inv_scale"] == "adam_rms":
            inv_weight *= math.sqrt(adam_norm_sq / inv_norm_sq) if inv_norm_sq > 0 else 0.0
        adam_weight = 1.0 - alpha
        inv_sq += inv_weight**2 * inv_norm_sq
        bar_sq += (
            inv_weight**2 * inv_norm_sq + 2 * inv_weight * adam_weight * cross + adam_weight**2 * adam_norm_sq
        )
    return inv_sq, bar_sq


def _term_sums(state: dict, beta1: float, beta2: float, eps: float, step: int) -> torch.Tensor:
    """[‖ũ‖², ‖u‖², ⟨ũ, u⟩] of one parameter's latest step, float64 on the state's device, with ũ = m̂·√v̂
    and u = m̂/(√v̂+ε), chunk by chunk (each chunk's fp32 dot products added in float64, in order)."""
    exp_avg = _local(state["exp_avg"]).reshape(-1)
    exp_avg_sq = _local(state["exp_avg_sq"]).reshape(-1)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    sums = torch.zeros(3, dtype=torch.float64, device=exp_avg.device)
    for m, v in zip(exp_avg.split(CHUNK), exp_avg_sq.split(CHUNK)):
        m_hat = m.float() / bias_correction1  # new tensors: .float() of fp32 state is the state
        sqrt_v_hat = (v.float() / bias_correction2).sqrt_()
        inv = torch.mul(m_hat, sqrt_v_hat)
        adam = m_hat.div_(sqrt_v_hat.add_(eps))
        sums += torch.stack([torch.dot(inv, inv), torch.dot(adam, adam), torch.dot(inv, adam)]).double()
    return sums


def inv_share(inv_sq: float, bar_sq: float) -> float | None:
    return math.sqrt(inv_sq / bar_sq) if bar_sq > 0 else None
