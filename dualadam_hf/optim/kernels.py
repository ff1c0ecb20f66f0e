"""DualAdam's step arithmetic, which every backend shares: the per-step scalars, the schedules of alpha_t,
argument checks, and the single-tensor and foreach backends.

A leaf module (torch only): the optimizer classes (``dualadam``) and the fused backend (``fused``) both
import it, and it imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SCHEDULES = ("linear", "exponential", "step")
# "none": the paper's InvAdam term m_hat * sqrt(v_hat). "adam_rms": that term rescaled, per tensor, to the
# norm (equivalently the RMS) of the Adam term of the same step: InvAdam's direction at Adam's size.
INV_SCALES = ("none", "adam_rms")
# Stored in the param groups in place of a user's callable: a function cannot travel through
# ``torch.load(weights_only=True)``, so the callable itself stays on the optimizer instance.
CALLABLE_SCHEDULE = "callable"


@dataclass(frozen=True)
class StepScalars:
    """Everything a backend needs besides the tensors, computed once per step and bucket."""

    step: int  # t, counted from 1
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decay: float  # 1 - lr * weight_decay, decoupled as in AdamW
    alpha: float
    bias_correction1: float
    bias_correction2_sqrt: float
    maximize: bool
    rescale_inv: bool = False  # inv_scale="adam_rms"


def schedule_alpha(group: dict[str, Any], step: int, custom: Callable[[int], float] | None = None) -> float:
    """alpha_t of a param group's schedule at optimizer step ``step`` (counted from 1)."""
    schedule = group["schedule"]
    if schedule == "linear":
        return max(0.0, 1.0 - group["switch_rate"] * step)
    if schedule == "exponential":
        return group["switch_base"] ** step
    if schedule == "step":
        return 1.0 if step <= group["switch_step"] else 0.0
    alpha = float(custom(step))
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        raise ValueError(f"schedule callable returned alpha={alpha} at step {step}; it must lie in [0, 1]")
    return alpha


def check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, name: str
) -> None:
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"{name}: lr must be finite and >= 0, got {lr}")
    if len(betas) != 2:
        raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: betas[{index}] must be in [0, 1), got {beta}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"{name}: eps must be finite and >= 0, got {eps}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"{name}: weight_decay must be finite and >= 0, got {weight_decay}")


def check_schedule(schedule: Any, switch_rate: float, switch_base: Any, switch_step: Any) -> None:
    if not 0.0 <= switch_rate < math.inf:
        raise ValueError(f"DualAdam: switch_rate must be finite and >= 0, got {switch_rate}")
    if callable(schedule):
        return
    if schedule not in SCHEDULES:
        raise ValueError(
            f"DualAdam: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)} or a callable step -> alpha"
        )
    if schedule == "exponential" and not (
        isinstance(switch_base, (int, float)) and 0.0 < switch_base <= 1.0
    ):
        raise ValueError(f"DualAdam: schedule='exponential' needs 0 < switch_base <= 1, got {switch_base!r}")
    if schedule == "step" and (
        isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0
    ):
        raise ValueError(f"DualAdam: schedule='step' needs a non-negative integer switch_step, got {switch_step!r}")


def check_inv_scale(inv_scale: Any, fused: bool | None, name: str) -> None:
    if inv_scale not in INV_SCALES:
        raise ValueError(f"{name}: unknown inv_scale {inv_scale!r}; valid: {', '.join(INV_SCALES)}")
    if fused and inv_scale != "none":
        raise ValueError(
            f"{name}: fused=True cannot rescale the InvAdam term (inv_scale={inv_scale!r} needs a norm per "
            "tensor); use foreach"
        )


def _single_tensor_dualadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    s: StepScalars,
) -> None:
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        # Low-precision tensors are updated in fp32 and written back once.
        compute = param if param.dtype in (torch.float32, torch.float64) else param.float()
        m = exp_avg if compute is param else exp_avg.float()
        v = exp_avg_sq if compute is param else exp_avg_sq.float()
        g = grad.to(compute.dtype)
        if s.maximize:
            g = -g  # a new tensor: .grad itself is never written

        if s.decay != 1.0:
            compute.mul_(s.decay)
        m.lerp_(g, 1.0 - s.beta1)
        v.mul_(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)

        if s.lr != 0.0:
            step_size = s.lr / s.bias_correction1
            sqrt_v_hat = v.sqrt().div_(s.bias_correction2_sqrt)
            if s.rescale_inv and s.alpha != 0.0:
                inv = torch.mul(m, sqrt_v_hat)
                adam = m / sqrt_v_hat.add_(s.eps)
                inv.mul_(_norm_ratios([adam], [inv])[0] * s.alpha)
                compute.add_(inv.add_(adam, alpha=1.0 - s.alpha), alpha=-step_size)
            elif s.alpha == 0.0:
                compute.addcdiv_(m, sqrt_v_hat.add_(s.eps), value=-step_size)
            elif s.alpha == 1.0:
                compute.addcmul_(m, sqrt_v_hat, value=-step_size)
            else:
                # alpha * sqrt(v_hat) + (1 - alpha) / (sqrt(v_hat) + eps), times m_hat
                factor = torch.add(sqrt_v_hat, s.eps).reciprocal_().mul_(1.0 - s.alpha)
                factor.add_(sqrt_v_hat, alpha=s.alpha)
                compute.addcmul_(m, factor, value=-step_size)

        if compute is not param:
            param.copy_(compute)
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)


def _multi_tensor_dualadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    s: StepScalars,
) -> None:
    low_precision = params[0].dtype not in (torch.float32, torch.float64)
    if low_precision:
        compute = [p.float() for p in params]
        ms = [m.float() for m in exp_avgs]
        vs = [v.float() for v in exp_avg_sqs]
        gs = [g.float() for g in grads]
    else:
        compute, ms, vs, gs = params, exp_avgs, exp_avg_sqs, grads
    if s.decay != 1.0:
        torch._foreach_mul_(compute, s.decay)
    if s.maximize:  # m <- beta1 m - (1 - beta1) g, without a negated copy of the gradients
        torch._foreach_mul_(ms, s.beta1)
        torch._foreach_add_(ms, gs, alpha=-(1.0 - s.beta1))
    else:
        torch._foreach_lerp_(ms, gs, 1.0 - s.beta1)
    torch._foreach_mul_(vs, s.beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - s.beta2)

    if s.lr != 0.0:
        # Fewer passes than the textbook order: with r = sqrt(v) and b = sqrt(1 - beta2^t),
        # sqrt(v_hat) = r / b, so the bias corrections and eps fold into the scalars:
        #   InvAdam  m_hat * sqrt(v_hat)         = (m / bc1) * r / b
        #   Adam     m_hat / (sqrt(v_hat) + eps) = (m / bc1) * b / (r + eps * b)
        # and the blend is two updates of the parameter, one per term.
        step_size = s.lr / s.bias_correction1
        b = s.bias_correction2_sqrt
        root = torch._foreach_sqrt(vs)
        if s.rescale_inv and s.alpha != 0.0:
            # As the single-tensor path, with sqrt(v_hat) itself (so that the norms see the same scale):
            # inv = m * sqrt(v_hat) and adam = m / (sqrt(v_hat) + eps), both times bc1, which the ratio
            # ignores and step_size carries. adam is built in root's storage: one temporary besides inv.
            torch._foreach_div_(root, b)
            inv = torch._foreach_mul(ms, root)
            torch._foreach_add_(root, s.eps)
            torch._foreach_reciprocal_(root)
            torch._foreach_mul_(root, ms)
            torch._foreach_mul_(inv, _norm_ratios(root, inv))
            torch._foreach_add_(compute, inv, alpha=-s.alpha * step_size)
            if s.alpha != 1.0:
                torch._foreach_add_(compute, root, alpha=-(1.0 - s.alpha) * step_size)
        else:
            if s.alpha != 0.0:
                torch._foreach_addcmul_(compute, ms, root, value=-s.alpha * step_size / b)
            if s.alpha != 1.0:
                torch._foreach_add_(root, s.eps * b)
                torch._foreach_addcdiv_(compute, ms, root, value=-(1.0 - s.alpha) * step_size * b)

    if low_precision:
        torch._foreach_copy_(params, compute)
        torch._foreach_copy_(exp_avgs, ms)
        torch._foreach_copy_(exp_avg_sqs, vs)


def _norm_ratios(numerators: list[Tensor], denominators: list[Tensor]) -> list[Tensor]:
    """||numerator|| / ||denominator|| per pair, as 0-dim tensors (no host sync).

    0 where the denominator's norm is 0: the InvAdam term is all zeros, or so small that its squares
    underflow (in fp32, every |m_hat * sqrt(v_hat)| below ~1e-19, i.e. gradients below ~3e-10). Such a
    tensor takes the (1 - alpha) Adam part only; at those gradients eps dominates Adam's term anyway.
    """
    tops = torch._foreach_norm(numerators)
    bottoms = torch._foreach_norm(denominators)
    return [torch.where(bottom > 0, top / bottom, torch.zeros_like(top)) for top, bottom in zip(tops, bottoms)]
