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
    """(Σ ‖α_t·ũ_t‖², Σ ‖ū_t‖²) over the parameters whose state this process holds.

    ũ_t is the InvAdam term as the step used it: rescaled per tensor to the norm of the Adam term u_t
    under ``inv_scale="adam_rms"``, so that its part is then α_t·‖u_t‖.
    """
    inv_sq = 0.0
    bar_sq = 0.0
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        rescale = group.get("inv_scale", "none") == "adam_rms"
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            step = int(state["step"].item())
            alpha = schedule_alpha(group, step, optimizer._custom_schedule)
            terms = _Terms(state, beta1, beta2, group["eps"], step)
            scale = 1.0
            if rescale:  # one more pass, for the two norms the step rescaled with
                inv_norm_sq, adam_norm_sq = terms.norms_squared()
                scale = math.sqrt(adam_norm_sq / inv_norm_sq) if inv_norm_sq > 0 else 0.0
            inv_part_sq, blend_sq = terms.sums_of_squares(alpha * scale, 1.0 - alpha)
            inv_sq += inv_part_sq
            bar_sq += blend_sq
    return inv_sq, bar_sq


class _Terms:
    """The InvAdam term m̂·√v̂ and the Adam term m̂/(√v̂+ε) of one parameter's latest step, chunk by chunk."""

    def __init__(self, state: dict, beta1: float, beta2: float, eps: float, step: int) -> None:
        self.exp_avg = _local(state["exp_avg"]).reshape(-1)
        self.exp_avg_sq = _local(state["exp_avg_sq"]).reshape(-1)
        self.bias_correction1 = 1.0 - beta1**step
        self.bias_correction2 = 1.0 - beta2**step
        self.eps = eps

    def chunks(self):
        for m, v in zip(self.exp_avg.split(CHUNK), self.exp_avg_sq.split(CHUNK)):
            m_hat = m.float() / self.bias_correction1  # new tensors: .float() of fp32 state is the state
            sqrt_v_hat = (v.float() / self.bias_correction2).sqrt_()
            yield torch.mul(m_hat, sqrt_v_hat), m_hat.div_(sqrt_v_hat.add_(self.eps))

    def norms_squared(self) -> tuple[float, float]:
        """(‖ũ‖², ‖u‖²)"""
        inv_sq = adam_sq = 0.0
        for inv, adam in self.chunks():
            inv_sq += inv.square_().sum().item()
            adam_sq += adam.square_().sum().item()
        return inv_sq, adam_sq

    def sums_of_squares(self, inv_weight: float, adam_weight: float) -> tuple[float, float]:
        """(‖inv_weight·ũ‖², ‖inv_weight·ũ + adam_weight·u‖²)"""
        inv_part = blend = 0.0
        for inv, adam in self.chunks():
            inv.mul_(inv_weight)
            inv_part += inv.square().sum().item()
            blend += inv.add_(adam, alpha=adam_weight).square_().sum().item()
        return inv_part, blend


def inv_share(inv_sq: float, bar_sq: float) -> float | None:
    return math.sqrt(inv_sq / bar_sq) if bar_sq > 0 else None
