"""DualAdam and InvAdam (arXiv 2603.07122, Algorithm 1).

Three tiers, as torch's Adam: the classes validate arguments and hold state; ``_dispatch`` computes
the per-step scalars once (bias corrections, alpha_t, lr * weight_decay) and picks a backend; the
backends (single-tensor loop, foreach, fused) do element-wise arithmetic only and share one signature.
On CUDA, ``triton_backend`` steps a param group first (``_device_step``): its numbers come from the step
counters it keeps on the GPU, so it has its own entry point; what it does not take goes on to ``_dispatch``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from dualadam_hf.optim import fused as fused_backend
from dualadam_hf.optim import triton_backend
from dualadam_hf.optim.kernels import (
    CALLABLE_SCHEDULE,
    StepScalars,
    _multi_tensor_dualadam,
    _single_tensor_dualadam,
    check_hyperparameters,
    check_inv_scale,
    check_schedule,
    schedule_alpha,
)

__all__ = ["DualAdam", "InvAdam"]


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
        fused: use the fused backend: one pass over memory, compiled on CPU (``dualadam_hf.optim.fused``), a Triton
            multi-tensor kernel on CUDA (``dualadam_hf.optim.triton_backend``). None: on CUDA always, on CPU for
            param groups where it pays.
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
        self._host_steps = triton_backend.HostSteps()
        if fused:
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
        self.__dict__.setdefault("_host_steps", triton_backend.HostSteps())
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

        Derived from the saved step counters, so it is right after ``load_state_dict`` too; one read per
        device (the CUDA backend keeps the counters on the GPU).
        """
        held = [(group, state) for group in self.param_groups
                for state in map(self.state.get, group["params"]) if state]
        latest = None
        for (group, _), step in zip(held, read_per_device([state["step"].reshape(()) for _, state in held])):
            if latest is None or step > latest[0]:
                latest = (int(step), group)
        if latest is None:
            return None
        return schedule_alpha(latest[1], latest[0], self._custom_schedule)

    def _init_group(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor, dict[str, Tensor]]]:
        """(param, grad, state) for every parameter with a gradient; state is created here, lazily,
        because ZeRO-3 and FSDP2 give parameters their final shape after the optimizer is built. ``step``
        is created on the parameter's device where the CUDA backend will step it, else on the CPU."""
        entries = []
        rescaled = group["inv_scale"] != "none"
        on_device = self._device_backend_takes(group)
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
                device_stepped = on_device and triton_backend.takes(p)
                device = triton_backend.local(p).device if device_stepped else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = self._new_moment(p, signed=True)
                state["exp_avg_sq"] = self._new_moment(p, signed=False)
                if device_stepped:
                    self._host_steps.created(p, state["step"])
            entries.append((p, p.grad, state))
        return entries

    def _device_backend_takes(self, group: dict[str, Any]) -> bool:
        """Whether the CUDA backend (``triton_backend``) may step this group; ``lowbit``'s optimizers step
        their quantized state with their own backend."""
        return triton_backend.group_takes(group)

    def _device_step(self, group: dict[str, Any], entries: list) -> list:
        """Step the entries the CUDA backend takes, one bucket per device and dtypes; return the others."""
        buckets: dict[tuple, list] = {}
        others = []
        for p, grad, state in entries:
            tensors = triton_backend.kernel_tensors(p, grad, state)
            if tensors is None:
                others.append((p, grad, state))
                continue
            shard, grad_shard, exp_avg, _ = tensors
            step = self._host_steps.advance(p, state, shard.device)
            # a view at an odd offset (a gradient bucket's, say) keeps its own bucket out of 128-bit accesses
            aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
            key = (shard.device, shard.dtype, grad_shard.dtype, exp_avg.dtype, aligned)
            buckets.setdefault(key, []).append((*tensors, state["step"], step))
        for bucket in buckets.values():
            params, grads, exp_avgs, exp_avg_sqs, steps, counts = (list(column) for column in zip(*bucket))
            alphas = [schedule_alpha(group, count) for count in counts]
            triton_backend.step_bucket(group, params, grads, exp_avgs, exp_avg_sqs, steps, alphas)
        return others

    def _new_moment(self, p: Tensor, signed: bool) -> Tensor:
        """A zero ``exp_avg`` (signed) or ``exp_avg_sq`` for ``p``; ``lowbit``'s optimizers quantize it."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _backend(self, group: dict[str, Any], entries: list) -> Callable[..., None]:
        """The backend that steps ``group``; ``lowbit``'s optimizers step their quantized state with their own."""
        return _choose_backend(group, entries)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            entries = self._init_group(group)
            if entries and self._device_backend_takes(group):
                entries = self._device_step(group, entries)
                self._host_steps.forget(p for p, _, _ in entries)  # stepped in place below, unseen by the host
            if entries:
                _dispatch(group, entries, self._custom_schedule, self._backend(group, entries))
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


def read_per_device(tensors: list[torch.Tensor]) -> list:
    """The values of same-shaped ``tensors``, in order, read by the host once per device."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    values: list = [None] * len(tensors)
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([tensors[i] for i in indices]).tolist()):
            values[index] = value
    return values


def _dispatch(
    group: dict[str, Any],
    entries: list[tuple[Tensor, Tensor, dict[str, Tensor]]],
    custom_schedule: Callable[[int], float] | None,
    backend: Callable[..., None],
) -> None:
    """Advance the step counters, compute the scalars once per bucket, and run ``backend`` on it.

    Buckets hold tensors of one type, device, dtype and step count: the step decides alpha_t and the
    bias corrections, and foreach kernels need uniform lists (mixed Tensor/DTensor lists fail).
    """
    buckets: dict[tuple, list[tuple[Tensor, Tensor, dict[str, Tensor]]]] = {}
    for entry in entries:
        p, _, state = entry
        if state["step"].device.type != "cpu":  # from the CUDA backend or its checkpoint: read on the host
            state["step"] = state["step"].cpu()
        state["step"] += 1
        key = (type(p), p.device, p.dtype, int(state["step"].item()))
        buckets.setdefault(key, []).append(entry)

    beta1, beta2 = group["betas"]
    for (_, _, _, step), bucket in buckets.items():
        scalars = StepScalars(
            step=step,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
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
    ``dualadam_hf.optim.fused.preferred`` says it pays (falling back to foreach if compiling fails) and the
    InvAdam term is not rescaled, else foreach."""
    if group["fused"]:
        return fused_backend.fused_dualadam
    if group["fused"] is None and group["foreach"] is None and group["inv_scale"] == "none":
        if fused_backend.preferred([p for p, _, _ in entries]):
            return functools.partial(fused_backend.fused_dualadam, fall_back=True)
    if group["foreach"] is False:
        return _single_tensor_dualadam
    return _multi_tensor_dualadam
