"""CUDA backend: the whole DualAdam step of a param group in one Triton launch per bucket, or torch's own
fused AdamW once alpha_t = 0.

``fused=None`` (and ``fused=True``) take it for CUDA parameters of float32, bfloat16 or float16: plain
tensors, DeepSpeed's flat partitions, and FSDP2's DTensors (updated through their local shards, as the
update is element-wise). A bucket is the group's tensors of one device and one combination of dtypes.

Per step, for a bucket:

1. the ``step`` tensors, kept on the device as torch's fused Adam keeps them, advance in one
   ``_foreach_add_``;
2. while some tensor is blending (alpha_t > 0), a few small device ops turn the steps into per-tensor
   coefficients (bias corrections, alpha_t from the group's schedule, lr), and one launch of
   ``triton_kernels.dualadam_kernel`` reads p, g, m, v once and writes p, m, v;
3. once alpha_t = 0 for every tensor of the bucket, the step is AdamW's arithmetic and
   ``torch._fused_adamw_`` does it, at exactly the cost of torch's fused AdamW.

No host sync: the host keeps its own copy of each step count (``HostSteps``), read from the state once after
it was created or loaded (or written in place through the tensor), and uses it only to choose between 2 and
3. The numbers of the update itself come from the device's step, so a state that changed behind the host's
back is still stepped with the right alpha_t and bias corrections. Behind its back means through ``.data``,
as DeepSpeed restores a checkpoint into the existing state: to a later step (a resume), the kernel then
does AdamW's arithmetic itself until the host's count reaches the switch, right but slower than torch's
op; to an earlier step (a rollback within one process), the host would choose torch's AdamW while
alpha_t > 0, until the state is loaded with ``load_state_dict``.

Triton builds its launcher with the system's C compiler at the first launch: where it cannot (no compiler,
no Python headers), the optimizer warns once and steps with foreach (``available``).

The launch tables (addresses, sizes, the block map) are built once per set of tensors and cached by
address; only the gradients' addresses are checked every step (``zero_grad(set_to_none=True)`` may move
them), and copied to the device without a sync when they changed.

Not here: a callable schedule (alpha_t is computed on the device) and ``inv_scale="adam_rms"`` (norms per
tensor) take the foreach backend; the low-bit optimizers step their quantized state with their own backend.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dualadam_hf.optim.kernels import CALLABLE_SCHEDULE, StepScalars, _single_tensor_dualadam

__all__ = [
    "BLOCK_SIZE", "DEVICES", "HostSteps", "available", "device_coefficients", "group_takes", "kernel_tensors",
    "kind_code", "launch", "launch_device", "launch_plan", "local", "step_bucket", "takes", "to_device",
]

BLOCK_SIZE = 4096  # elements per program: 16 KB of float32 per tensor, 8 warps of 16 elements per thread
NUM_WARPS = 8
# Device types the backend runs on. Tests add "cpu" to run the kernel in Triton's interpreter.
DEVICES: tuple[str, ...] = ("cuda",)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAN_CACHE_SIZE = 64  # param sets whose launch tables are kept (groups x buckets x devices of a few optimizers)


def local(tensor: Tensor) -> Tensor:
    """The tensor the kernel writes: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def group_takes(group: dict[str, Any]) -> bool:
    """Whether a param group's settings leave its step to this backend (its tensors decide the rest)."""
    chosen = group["fused"] or (group["fused"] is None and group["foreach"] is None)
    return bool(chosen) and group["inv_scale"] == "none" and group["schedule"] != CALLABLE_SCHEDULE


def takes(param: Tensor) -> bool:
    """Whether the kernel can update ``param`` (its state is checked when it is stepped)."""
    shard = local(param)
    if type(shard) not in (Tensor, torch.nn.Parameter) or shard.dtype not in KERNEL_DTYPES:
        return False
    return shard.device.type in DEVICES and available(shard.device.type)


_PLAIN = (Tensor, torch.nn.Parameter)


def kernel_tensors(param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, ...] | None:
    """(param, grad, exp_avg, exp_avg_sq) as the kernel writes them (local shards of DTensors), or None if
    the kernel cannot update them: another dtype or device, a state of another dtype or a subclass
    (quantized), or a tensor that is not contiguous. Run for every parameter at every step, so it is kept
    to a few attribute reads."""
    tensors = (param, grad, state["exp_avg"], state["exp_avg_sq"])
    if type(param) not in _PLAIN:
        tensors = tuple(local(t) for t in tensors)
    shard, _, exp_avg, exp_avg_sq = tensors
    if exp_avg.dtype != exp_avg_sq.dtype or not takes(shard):  # takes: the dtype, device and Triton
        return None
    device, numel = shard.device, shard.numel()
    for tensor in tensors:
        # the kernel walks all four over the parameter's size: a state of another size (loaded for another
        # shape) takes foreach, which says so
        if (type(tensor) not in _PLAIN or tensor.device != device or tensor.numel() != numel
                or not tensor.is_contiguous()):
            return None
    return tensors


@functools.cache
def available(device_type: str) -> bool:
    """Triton runs here: a CUDA GPU of compute capability 7.0 or more, or its interpreter on CPU, and the
    kernel compiles and launches (``_runs``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 7):
            return False
    elif os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        return False
    return _runs(torch.device(device_type))


def _runs(device: torch.device) -> bool:
    """Launch the kernel once on a four-element bucket that it leaves unchanged (lr = 0). Triton builds its
    launcher with the system's C compiler and needs the Python headers and a writable cache: where any of
    that is missing, say so once and let the optimizer step with foreach, instead of failing at its first
    step."""
    tensors = [[torch.zeros(4, device=device)] for _ in range(4)]
    group = dict(lr=0.0, betas=(0.9, 0.999), weight_decay=0.0, maximize=False)
    try:
        launch(*tensors, torch.zeros(1, 3, device=device), group)
    except Exception as error:  # Triton's compile and launch failures have no common type
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        warnings.warn(
            f"DualAdam: the Triton kernel does not run on {device.type} here ({type(error).__name__}: "
            f"{lines[0] if lines else ''}); stepping with foreach instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


class HostSteps:
    """The host's copy of each parameter's step count, so that choosing a kernel needs no ``.item()``.

    An entry is trusted while the state holds the same ``step`` tensor at the version the backend's own
    ``_foreach_add_`` left it: ``load_state_dict``, and in-place writes through the tensor (``copy_``,
    ``zero_``, ``fill_``: a callback restarting the schedule), make the next step read it again (one sync per
    parameter). A write through ``.data`` (DeepSpeed's restore of a checkpoint into the existing state) leaves
    no trace; see the module docstring for what that costs.
    """

    def __init__(self) -> None:
        self._steps: dict[Tensor, tuple[Tensor, int, int]] = {}

    def advance(self, param: Tensor, state: dict[str, Tensor], device: torch.device) -> int:
        """The step count after this step, which the caller then makes with one in-place add; moves
        ``state["step"]`` to ``device`` the first time."""
        step = state["step"]
        known = self._steps.get(param)
        # the version moved by the backend's own add at most (which a TorchDispatchMode may not count)
        if known is not None and known[0] is step and 0 <= step._version - known[2] <= 1:
            count = known[1]
        else:
            count = int(step.item())
            if step.device != device or step.dtype != torch.float32:
                step = state["step"] = torch.full((), count, dtype=torch.float32, device=device)
        self._steps[param] = (step, count + 1, step._version)
        return count + 1

    def created(self, param: Tensor, step: Tensor) -> None:
        """A new state: its step is 0, no need to read it."""
        self._steps[param] = (step, 0, step._version - 1)

    def forget(self, params: Iterable[Tensor]) -> None:
        """These parameters are stepped elsewhere (and their step in place): the host's copies are stale."""
        for param in params:
            self._steps.pop(param, None)


def device_coefficients(steps: Sequence[Tensor], group: dict[str, Any]) -> Tensor:
    """float32 [T, 3]: the kernel's (inv, adam, eps_b) per tensor, from each tensor's step on the device.

    In float64, as torch's fused Adam computes its bias corrections: with b = sqrt(1 - beta2^t),
    inv = alpha_t lr / (bc1 b), adam = (1 - alpha_t) lr b / bc1 and eps_b = eps b (``fused``'s folding).
    """
    beta1, beta2 = group["betas"]
    t = torch.stack(list(steps)).to(torch.float64)
    step_size = group["lr"] / (1.0 - torch.pow(beta1, t))
    b = torch.sqrt(1.0 - torch.pow(beta2, t))
    alpha = _alpha(group, t)
    return torch.stack([alpha * step_size / b, (1.0 - alpha) * step_size * b, group["eps"] * b], dim=1).float()


def _alpha(group: dict[str, Any], t: Tensor) -> Tensor:
    """alpha_t of the group's schedule for a tensor of steps (``kernels.schedule_alpha``'s rules)."""
    schedule = group["schedule"]
    if schedule == "linear":
        return torch.clamp(1.0 - group["switch_rate"] * t, min=0.0)
    if schedule == "exponential":
        return torch.pow(group["switch_base"], t)
    if schedule == "step":
        return (t <= group["switch_step"]).to(torch.float64)
    raise ValueError(f"the CUDA backend computes alpha_t on the device and cannot run schedule {schedule!r}")


def step_bucket(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    host_alphas: list[float],
) -> None:
    """One step of a bucket (plain tensors of one device and dtype combination); ``host_alphas`` is alpha_t
    of each tensor by the host's step counts, which only picks the kernel."""
    torch._foreach_add_(steps, 1.0)
    beta1, beta2 = group["betas"]
    if group["lr"] == 0.0:
        # The step frameworks take to create state before loading a checkpoint: m and v move, p does not.
        # Bias corrections do not matter without an update.
        scalars = StepScalars(
            step=0, lr=0.0, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decay=1.0, alpha=0.0,
            bias_correction1=1.0, bias_correction2_sqrt=1.0, maximize=group["maximize"],
        )
        _single_tensor_dualadam(params, grads, exp_avgs, exp_avg_sqs, scalars)
        return
    uniform = len({t.dtype for t in (params[0], grads[0], exp_avgs[0], exp_avg_sqs[0])}) == 1
    if uniform and not any(host_alphas):
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
            amsgrad=False, maximize=group["maximize"],
        )
        return
    launch(params, grads, exp_avgs, exp_avg_sqs, device_coefficients(steps, group), group)


@dataclass
class _Plan:
    """Launch tables of one set of tensors; ``addresses`` is replaced when the gradients move."""

    grad_addresses: tuple[int, ...]
    addresses: Tensor  # int64 [T, 4] on the device
    numels: Tensor  # int64 [T]
    block_tensor: Tensor  # int32 [blocks]
    block_start: Tensor  # int64 [blocks]
    aligned: bool


_plans: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()


def to_device(values: list | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list or CPU tensor on ``device``, without waiting for the GPU (pinned memory, stream-ordered
    copy)."""
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _block_map(numels: list[int], block: int) -> tuple[Tensor, Tensor]:
    """For every block of ``block`` elements of every tensor: the tensor's index and the block's first element."""
    per_tensor = [-(-n // block) for n in numels]
    counts = torch.tensor(per_tensor, dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first_block = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    block_start = (torch.arange(sum(per_tensor), dtype=torch.int64) - first_block) * block
    return block_tensor, block_start


def launch_plan(tensors: list[list[Tensor]], block: int) -> _Plan:
    """The cached launch tables of these tensors, with the gradients' addresses brought up to date."""
    params, grads, exp_avgs, exp_avg_sqs = tensors
    device = params[0].device
    grad_addresses = tuple(g.data_ptr() for g in grads)
    key = (device, block, tuple((p.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), p.dtype, m.dtype, v.dtype)
                                for p, m, v in zip(params, exp_avgs, exp_avg_sqs)))
    plan = _plans.get(key)
    if plan is None or plan.grad_addresses != grad_addresses:
        rows = [[p.data_ptr(), g, m.data_ptr(), v.data_ptr()]
                for p, g, m, v in zip(params, grad_addresses, exp_avgs, exp_avg_sqs)]
        addresses = to_device(rows, torch.int64, device)
        aligned = all(address % 16 == 0 for row in rows for address in row)
        if plan is None:
            numels = [p.numel() for p in params]
            block_tensor, block_start = _block_map(numels, block)
            plan = _plans[key] = _Plan(
                grad_addresses, addresses, to_device(numels, torch.int64, device),
                to_device(block_tensor, torch.int32, device), to_device(block_start, torch.int64, device), aligned,
            )
            while len(_plans) > _PLAN_CACHE_SIZE:
                _plans.popitem(last=False)
        else:
            plan.grad_addresses, plan.addresses, plan.aligned = grad_addresses, addresses, aligned
    _plans.move_to_end(key)
    return plan


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Where a launch goes: Triton launches on the current CUDA device, which may not be the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kind_code(dtype: torch.dtype) -> int:
    from dualadam_hf.optim import triton_kernels

    return {torch.float32: triton_kernels.FLOAT32, torch.bfloat16: triton_kernels.BFLOAT16,
            torch.float16: triton_kernels.FLOAT16}[dtype].value


def launch(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    coefficients: Tensor,
    group: dict[str, Any],
    *,
    block: int = BLOCK_SIZE,
) -> None:
    """One launch of the DualAdam kernel over the bucket (``coefficients`` from ``device_coefficients``)."""
    from dualadam_hf.optim import triton_kernels

    plan = launch_plan([params, grads, exp_avgs, exp_avg_sqs], block)
    blocks = plan.block_tensor.numel()
    if blocks == 0:
        return
    beta1, beta2 = group["betas"]
    with launch_device(params[0].device):
        triton_kernels.dualadam_kernel[(blocks,)](
            plan.addresses, plan.numels, coefficients, plan.block_tensor, plan.block_start,
            1.0 - group["lr"] * group["weight_decay"],
            beta1,
            -(1.0 - beta1) if group["maximize"] else 1.0 - beta1,
            beta2,
            1.0 - beta2,
            P_KIND=kind_code(params[0].dtype),
            G_KIND=kind_code(grads[0].dtype),
            S_KIND=kind_code(exp_avgs[0].dtype),
            ALIGNED=plan.aligned,
            BLOCK=block,
            num_warps=NUM_WARPS,
            # no multiply-add contraction: every operation rounds as in the interpreter and in torch's eager ops
            enable_fp_fusion=False,
        )
    # Written through raw addresses: tell autograd, as an in-place op on the tensors would.
    torch.autograd.graph.increment_version([t for tensors in (params, exp_avgs, exp_avg_sqs) for t in tensors])
