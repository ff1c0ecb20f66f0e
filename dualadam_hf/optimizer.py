"""DualAdam and InvAdam (arXiv 2603.07122, Algorithm 1).

Three tiers, as torch's Adam: the classes validate arguments and hold state; ``_dispatch`` computes
the per-step scalars once (bias corrections, alpha_t, lr * weight_decay) and picks a backend; the
backends (single-tensor loop, foreach, fused) do element-wise arithmetic only and share one signature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DualAdam", "InvAdam", "StepScalars", "SCHEDULES", "INV_SCALES", "schedule_alpha"]

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

    lr: float
    beta1: float
    beta2: float
    eps: float
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
    if not lr >= 0.0:
        raise ValueError(f"{name}: lr must be >= 0, got {lr}")
    if len(betas) != 2:
        raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: betas[{index}] must be in [0, 1), got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")


def check_schedule(schedule: Any, switch_rate: float, switch_base: Any, switch_step: Any) -> None:
    if not switch_rate >= 0.0:
        raise ValueError(f"DualAdam: switch_rate must be >= 0, got {switch_rate}")
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


def _without_empty_groups(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list:
    """Param groups without the empty ones (the HF Trainer's no-decay group is empty for a model with
    no biases or norms, and an empty group breaks distributed checkpoint loading: pytorch issue
    143828). Plain tensors, or nothing but empty groups, are passed on as given."""
    params = list(params)
    if not params or not isinstance(params[0], dict):
        return params
    groups = [dict(group, params=list(group["params"])) for group in params]
    return [group for group in groups if group["params"]] or groups


class DualAdam(torch.optim.Optimizer):
    r"""DualAdam: InvAdam early, Adam late (arXiv 2603.07122, Algorithm 1).

    .. math::
       \begin{aligned}
       &\textbf{input}: \eta \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            \alpha_t \text{ (schedule)} \\
       &\textbf{for } t = 1, 2, \ldots: \\
       &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-\nabla \text{ if maximize}) \\
       &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
       &\quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
       &\quad \hat m_t \leftarrow m_t / (1-\beta_1^t), \quad \hat v_t \leftarrow v_t / (1-\beta_2^t) \\
       &\quad u_t \leftarrow \hat m_t / (\sqrt{\hat v_t} + \epsilon) \quad \text{(Adam)} \\
       &\quad \tilde u_t \leftarrow \hat m_t \sqrt{\hat v_t} \quad \text{(InvAdam)} \\
       &\quad \alpha_t \leftarrow \max(0, 1 - \xi t) \quad \text{(linear; or } \beta^t \text{, or a step at } s) \\
       &\quad \bar u_t \leftarrow \alpha_t \tilde u_t + (1-\alpha_t) u_t \\
       &\quad \theta_t \leftarrow \theta_{t-1} (1 - \eta\lambda) - \eta \bar u_t
       \end{aligned}

    We follow Algorithm 1 of the paper, not the authors' released code, in two places: the InvAdam
    term has no epsilon, and the InvAdam part is kept for every step with alpha_t > 0 (the released
    code drops it once alpha_t < xi). Weight decay is decoupled, as in AdamW.

    ``inv_scale="adam_rms"`` is not in the paper and is off by default. Element by element the InvAdam
    term is the Adam term times about v_hat ~ g**2, so at LLM gradient scales (|g| ~ 1e-4) it nearly
    vanishes and the blend is Adam with its step scaled by (1 - alpha_t). With ``"adam_rms"`` the
    InvAdam term of each tensor is rescaled to the norm of that tensor's Adam term,
    ``u_tilde * ||u|| / ||u_tilde||``, which keeps InvAdam's direction and gives it Adam's size. "Each
    tensor" is each tensor the optimizer holds: under ZeRO or FSDP that is a shard, so the HF
    integration refuses the option there, and DTensor parameters are refused at the first step.

    ``t`` counts this optimizer's steps per parameter, starting at 1, and is saved in the state
    (``state[p]["step"]``, a 0-dim tensor, beside ``exp_avg`` and ``exp_avg_sq``), so a resumed run
    continues alpha_t and the bias corrections. Once alpha_t = 0 the step is AdamW's arithmetic and
    does no InvAdam work.

    Args:
        params: parameters or param groups.
        lr: learning rate eta (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to sqrt(v_hat) in the Adam term (>= 0).
        weight_decay: decoupled weight decay lambda (>= 0).
        switch_rate: xi of the linear schedule; alpha reaches 0 after 1/xi steps (>= 0; 0 is InvAdam).
        schedule: ``"linear"`` (the paper), ``"exponential"`` (alpha_t = switch_base ** t),
            ``"step"`` (alpha_t = 1 for t <= switch_step, else 0), or a callable t -> alpha_t in [0, 1].
        switch_base: the base of the exponential schedule, in (0, 1].
        switch_step: the last InvAdam step of the step schedule, an integer >= 0.
        inv_scale: ``"none"`` (the paper) or ``"adam_rms"`` (see above); not with ``fused=True``.
        maximize: maximise the objective instead of minimising it.
        foreach: use the multi-tensor backend (None: yes, unless ``fused`` is chosen).
        fused: use the fused backend (None: where it is available and faster; see ``dualadam_hf.fused``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        switch_rate: float = 8e-5,
        *,
        schedule: str | Callable[[int], float] = "linear",
        switch_base: float | None = None,
        switch_step: int | None = None,
        inv_scale: str = "none",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        name = type(self).__name__
        check_hyperparameters(lr, betas, eps, weight_decay, name)
        check_schedule(schedule, switch_rate, switch_base, switch_step)
        check_inv_scale(inv_scale, fused, name)
        if fused and foreach:
            raise ValueError(f"{name}: fused=True and foreach=True are exclusive; pick one")
        self._custom_schedule = schedule if callable(schedule) else None
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            switch_rate=switch_rate,
            schedule=CALLABLE_SCHEDULE if callable(schedule) else schedule,
            switch_base=switch_base,
            switch_step=switch_step,
            inv_scale=inv_scale,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(_without_empty_groups(params), defaults)
        if fused:
            from dualadam_hf import fused as fused_backend

            fused_backend.check_available(self.param_groups, name)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], type(self).__name__)
        if group["schedule"] != CALLABLE_SCHEDULE:
            check_schedule(group["schedule"], group["switch_rate"], group["switch_base"], group["switch_step"])
        check_inv_scale(group["inv_scale"], group["fused"], type(self).__name__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_custom_schedule", None)
        for group in self.param_groups:
            group.setdefault("fused", None)
            group.setdefault("inv_scale", "none")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint saved before inv_scale existed keeps the value this optimizer was built with; one
        # that has it wins, as its lr and betas do (torch's rule for every hyperparameter).
        saved_groups = [
            group if "inv_scale" in group else dict(group, inv_scale=current["inv_scale"])
            for group, current in zip(state_dict["param_groups"], self.param_groups)
        ] + state_dict["param_groups"][len(self.param_groups):]
        super().load_state_dict(dict(state_dict, param_groups=saved_groups))

    def latest_alpha(self) -> float | None:
        """alpha_t used by the latest step (the highest step in the state), or None before any step.

        Derived from the saved step counters, so it is right after ``load_state_dict`` too.
        """
        latest = None
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                step = int(state["step"].item())
                if latest is None or step > latest[0]:
                    latest = (step, group)
        if latest is None:
            return None
        return schedule_alpha(latest[1], latest[0], self._custom_schedule)

    def _init_group(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor, dict[str, Tensor]]]:
        """(param, grad, state) for every parameter with a gradient; state is created here, lazily,
        because ZeRO-3 and FSDP2 give parameters their final shape after the optimizer is built."""
        entries = []
        rescaled = group["inv_scale"] != "none"
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            if rescaled and hasattr(p, "to_local"):
                raise RuntimeError(
                    f"{type(self).__name__}: inv_scale={group['inv_scale']!r} rescales per whole tensor, and this "
                    "parameter is a DTensor (FSDP2 or tensor parallel) whose shards would each be rescaled alone"
                )
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            entries.append((p, p.grad, state))
        return entries

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            entries = self._init_group(group)
            if entries:
                _dispatch(group, entries, self._custom_schedule)
        return loss


class InvAdam(DualAdam):
    r"""InvAdam: the update m_hat * sqrt(v_hat) for every step (DualAdam with alpha_t = 1).

    The paper's Table IV shows it does not converge on its own; it is here for ablations and for
    the landscape experiments. See :class:`DualAdam` for the algorithm and the arguments.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        # The linear schedule with xi = 0 gives alpha_t = 1 at every step (the paper's Table IV, xi = 0).
        super().__init__(
            params, lr, betas, eps, weight_decay, 0.0,
            schedule="linear", maximize=maximize, foreach=foreach, fused=fused,
        )


def _dispatch(
    group: dict[str, Any],
    entries: list[tuple[Tensor, Tensor, dict[str, Tensor]]],
    custom_schedule: Callable[[int], float] | None,
) -> None:
    """Advance the step counters, compute the scalars once per bucket, and run one backend on it.

    Buckets hold tensors of one type, device, dtype and step count: the step decides alpha_t and the
    bias corrections, and foreach kernels need uniform lists (mixed Tensor/DTensor lists fail).
    """
    buckets: dict[tuple, list[tuple[Tensor, Tensor, dict[str, Tensor]]]] = {}
    for entry in entries:
        p, _, state = entry
        state["step"] += 1
        key = (type(p), p.device, p.dtype, int(state["step"].item()))
        buckets.setdefault(key, []).append(entry)

    beta1, beta2 = group["betas"]
    backend = _choose_backend(group, entries)
    for (_, _, _, step), bucket in buckets.items():
        scalars = StepScalars(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            decay=1.0 - group["lr"] * group["weight_decay"],
            alpha=schedule_alpha(group, step, custom_schedule),
            bias_correction1=1.0 - beta1**step,
            bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
            maximize=group["maximize"],
            rescale_inv=group["inv_scale"] == "adam_rms",
        )
        params, grads, states = zip(*bucket)
        backend(
            list(params),
            list(grads),
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            scalars,
        )


def _choose_backend(group: dict[str, Any], entries: list) -> Callable[..., None]:
    """fused=True: fused; foreach=False: single-tensor; fused=None and foreach unset: fused where
    ``dualadam_hf.fused.preferred`` says it pays (falling back to foreach if compiling fails) and the
    InvAdam term is not rescaled, else foreach."""
    if group["fused"]:
        from dualadam_hf import fused as fused_backend

        return fused_backend.fused_dualadam
    if group["fused"] is None and group["foreach"] is None and group["inv_scale"] == "none":
        from dualadam_hf import fused as fused_backend

        if fused_backend.preferred([p for p, _, _ in entries]):
            return functools.partial(fused_backend.fused_dualadam, fall_back=True)
    if group["foreach"] is False:
        return _single_tensor_dualadam
    return _multi_tensor_dualadam


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
