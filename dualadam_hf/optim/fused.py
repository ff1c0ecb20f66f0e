"""Fused backend: the whole DualAdam step in one pass over (param, grad, exp_avg, exp_avg_sq).

Element-wise functions compiled by ``torch.compile`` (inductor: C++ on CPU, Triton on CUDA) read
p, g, m and v once, compute in float32 (16-bit tensors are widened in registers and rounded once
on the store) and write p, m and v in place: no temporaries, and no state besides ``exp_avg``,
``exp_avg_sq`` and ``step``. A float32 call updates a chunk of 8 tensors, so that the host cost of
a compiled call (guards, wrapper: ~25 us on CPU) is shared; 16-bit tensors go one per call
(``_chunk_size``).

Compiles are bounded, whatever the model: one graph per kernel kind, device and dtype.

- The per-step numbers (lr, alpha_t, the bias corrections, lr * weight_decay) enter as one small
  float32 tensor, whose values dynamo does not guard on; Python floats would be baked into the
  graph and recompile every step (pytorch issue 171320).
- Tensors enter as 1-D aliases with symbolic sizes (``dynamic=True``), so one graph serves every
  size, rank and storage offset. The aliases are new tensors on the same memory, not views (dynamo
  guards on a view's base, and bases of each rank would compile again); duck shaping is off while
  calling (sizes that happen to be equal when compiling would otherwise be guarded equal); a short
  last chunk is padded with two-element scratch tensors. Dynamo specialises sizes 0 and 1, so
  tensors of fewer than two elements, and tensors that are not contiguous (no 1-D alias), take the
  single-tensor backend.
- Two kernels, picked in Python from alpha_t: a blend for 0 < alpha < 1 and an InvAdam-only kernel for
  alpha = 1. Once alpha = 0 the step is AdamW's arithmetic and torch's own fused AdamW
  (``torch._fused_adamw_``) does it, so that phase costs what torch's costs.
- A step with lr = 0 writes no parameter and only advances m and v; it takes the single-tensor
  backend, because frameworks take such a step once (the state-creating step before a checkpoint
  load, the first step of a warm-up from 0) and it is not worth a compile.

When ``fused=None`` picks this backend (``preferred``), and why:

- Plain tensors only: FSDP2's DTensor and other subclasses take the foreach backend, which
  dispatches through the subclass; ``fused=True`` with them is refused with the reason.
- CPU, for param groups of at least ``FUSED_MIN_NUMEL`` elements. The first steps pay the compiles
  (~16 s cold for a DualAdam run on a 2-vCPU machine): worth it for models that train for thousands of
  steps, not for tiny models and test runs (docs/benchmarks.md).
- On CUDA, ``triton_backend`` does the fused step (one hand-written Triton launch per bucket rather than
  one compiled call per chunk); ``fused=True`` there selects it, and this module serves only the tensors
  it does not take.
- float32, bfloat16 and float16 only: the kernels compute in float32, which would lose float64's
  precision.
- A compiler that works: a C++ compiler for inductor on CPU, Triton and compute capability >= 7 on
  CUDA. If compiling fails anyway, a ``fused=None`` optimizer warns once and uses foreach from then
  on; ``fused=True`` raises.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from dualadam_hf.optim.kernels import StepScalars, _multi_tensor_dualadam, _single_tensor_dualadam

__all__ = ["FUSED_MIN_NUMEL", "check_available", "fused_dualadam", "preferred", "unavailable_reason"]

# fused=None takes the fused backend for param groups with at least this many elements (CPU).
FUSED_MIN_NUMEL = 10_000_000
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_DEVICES = ("cpu", "cuda")
_PREFERRED_DEVICES = ("cpu",)

# Device types on which compiling failed in this process, with the error; fused=None avoids them.
_compile_failures: dict[str, str] = {}


def unavailable_reason(tensor: Tensor) -> str | None:
    """Why the fused backend cannot update ``tensor``, or None when it can."""
    if type(tensor) not in (Tensor, torch.nn.Parameter):
        return (
            f"{type(tensor).__name__} parameters are not plain tensors (FSDP2 shards are DTensors); "
            "the fused backend updates plain tensors only, foreach handles tensor subclasses"
        )
    if tensor.device.type not in FUSED_DEVICES:
        return f"parameters on {tensor.device.type} are not supported; the fused backend runs on CPU and CUDA"
    if tensor.dtype not in FUSED_DTYPES:
        return (
            f"{tensor.dtype} parameters are not supported; the fused kernels compute in float32 and take "
            "float32, bfloat16 and float16 parameters"
        )
    return _compiler_missing(tensor.device.type)


def compiler_usable(device_type: str) -> bool:
    """Whether torch.compile can be tried on ``device_type``: a compiler is there and no compile failed."""
    return device_type in FUSED_DEVICES and device_type not in _compile_failures and _compiler_missing(device_type) is None


def record_compile_failure(device_type: str, error: Exception) -> None:
    """Compiling failed on ``device_type``: from now on the compiled backends are not chosen there."""
    _compile_failures[device_type] = str(error)


@functools.cache
def _compiler_missing(device_type: str) -> str | None:
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python or platform"
    if device_type == "cpu":
        import subprocess

        from torch._inductor import cpp_builder
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            cpp_builder.get_cpp_compiler()
        except (InvalidCxxCompiler, OSError, subprocess.SubprocessError) as error:
            return f"no working C++ compiler for torch.compile's CPU code ({type(error).__name__}: {error})"
        return None
    from torch.utils._triton import has_triton_package

    if not has_triton_package():
        return "Triton is not installed; torch.compile needs it for CUDA code"
    if torch.cuda.get_device_capability()[0] < 7:
        return "Triton needs a CUDA GPU of compute capability 7.0 or higher"
    return None


def check_available(param_groups: list[dict], name: str) -> None:
    """Raise a RuntimeError naming why, if ``fused=True`` cannot run on these parameters."""
    for group in param_groups:
        for p in group["params"]:
            reason = unavailable_reason(p)
            if reason is not None:
                raise RuntimeError(f"{name}: fused=True is not available: {reason}")


def preferred(params: list[Tensor]) -> bool:
    """The rule of ``fused=None`` (see the module docstring): large CPU groups the backend can run."""
    if sum(p.numel() for p in params) < FUSED_MIN_NUMEL:
        return False
    for p in params:
        if p.device.type not in _PREFERRED_DEVICES or p.device.type in _compile_failures:
            return False
        if unavailable_reason(p) is not None:
            return False
    return True


def _moments(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g = grad.float()
    m = exp_avg.float() * s[1] + g * s[2]
    v = exp_avg_sq.float() * s[3] + g * g * s[4]
    return m, v, v.sqrt()


def _store(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, update: Tensor, m: Tensor, v: Tensor, s: Tensor) -> None:
    param.copy_(param.float() * s[0] - update)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _chunk_size(dtype: torch.dtype) -> int:
    """Tensors per compiled call. Inductor writes a chunk as one C++ function with a loop per tensor;
    with 16-bit tensors every loop after the first ran 1.6 to 3 times slower than torch's fused
    AdamW (measured on an AVX-512 Xeon, gcc 12), so those go one per call."""
    return 8 if dtype == torch.float32 else 1


def _quadruples(tensors: list[Tensor]) -> zip:
    """(param, grad, exp_avg, exp_avg_sq) of each tensor of a chunk laid out as p, g, m, v, p, g, ..."""
    return zip(tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4])


# The kernels share one scalar layout, built by _kernel_scalars. With r = sqrt(v) and b the square
# root of the second bias correction, sqrt(v_hat) = r / b, so eps and the bias corrections fold
# into three numbers and no kernel divides by b:
#   Adam:    m_hat / (sqrt(v_hat) + eps) = (m / bc1) * b / (r + eps * b)
#   InvAdam: m_hat * sqrt(v_hat)         = (m / bc1) * r / b
# s = [decay, beta1, +-(1 - beta1), beta2, 1 - beta2, eps * b, alpha * lr / (bc1 * b), (1 - alpha) * lr * b / bc1]
def _blend_kernel(tensors: list[Tensor], s: Tensor) -> None:
    for param, grad, exp_avg, exp_avg_sq in _quadruples(tensors):
        m, v, root = _moments(grad, exp_avg, exp_avg_sq, s)
        _store(param, exp_avg, exp_avg_sq, m * (root * s[6] + s[7] / (root + s[5])), m, v, s)


def _invadam_kernel(tensors: list[Tensor], s: Tensor) -> None:
    for param, grad, exp_avg, exp_avg_sq in _quadruples(tensors):
        m, v, root = _moments(grad, exp_avg, exp_avg_sq, s)
        _store(param, exp_avg, exp_avg_sq, m * root * s[6], m, v, s)


def _kernel_scalars(s: StepScalars) -> list[float]:
    step_size = s.lr / s.bias_correction1
    b = s.bias_correction2_sqrt
    return [
        s.decay,
        s.beta1,
        -(1.0 - s.beta1) if s.maximize else 1.0 - s.beta1,  # the sign of g only matters in m
        s.beta2,
        1.0 - s.beta2,
        s.eps * b,
        s.alpha * step_size / b,
        (1.0 - s.alpha) * step_size * b,
    ]


@functools.cache
def compiled_kernel(kind: str) -> Callable[..., None]:
    """The compiled kernel for ``kind`` in ("blend", "invadam"); compiled on its first call."""
    kernel = {"blend": _blend_kernel, "invadam": _invadam_kernel}[kind]
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _kernel_kind(alpha: float) -> str:
    return "invadam" if alpha == 1.0 else "blend"


def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], s: StepScalars) -> None:
    """The step once alpha_t = 0: AdamW's arithmetic, so torch's own fused AdamW does it (it reads the step
    from ``state_steps`` and advances nothing; one tensor of the bucket's step serves them all). Contiguous
    tensors only: on CPU it walks a parameter and its gradient as if their strides were the same, and a
    transposed parameter with a contiguous gradient is silently updated with the wrong elements (torch 2.13)."""
    step = torch.tensor(float(s.step), dtype=torch.float32, device=params[0].device)
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(params),
        lr=s.lr, beta1=s.beta1, beta2=s.beta2, weight_decay=s.weight_decay, eps=s.eps, amsgrad=False,
        maximize=s.maximize,
    )


def _flattens(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    return p.numel() >= 2 and all(t.is_contiguous() for t in (p, g, m, v))


def _flat(tensor: Tensor) -> Tensor:
    """A 1-D tensor on the memory of contiguous ``tensor``; a new tensor rather than a view, so that
    dynamo sees no base (whose rank it would guard on)."""
    flat = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return flat.set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


def _call_kernel(kernel: Callable[..., None], tensors: list[Tensor], scalars: Tensor) -> None:
    # Duck shaping would give sizes that happen to be equal in the compiling call one symbol and a
    # guard that they stay equal: every new pattern of equal sizes would compile again. It is read
    # only when compiling, but which call compiles is not known here.
    from torch.fx.experimental import _config as shape_config

    saved = shape_config.use_duck_shape
    shape_config.use_duck_shape = False
    try:
        kernel(tensors, scalars)
    finally:
        shape_config.use_duck_shape = saved


def fused_dualadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    s: StepScalars,
    *,
    fall_back: bool = False,
) -> None:
    """The fused backend. ``fall_back`` (set for ``fused=None``): if compiling fails, warn and use
    foreach for this and every later step on that device type, instead of raising."""
    if s.rescale_inv:  # refused at construction; no per-tensor norm here
        raise RuntimeError("fused=True cannot rescale the InvAdam term (inv_scale='adam_rms'); use foreach")
    reason = unavailable_reason(params[0])  # a bucket has one type, device and dtype
    if reason is not None:
        raise RuntimeError(f"fused=True is not available: {reason}")
    if s.lr == 0.0:
        _single_tensor_dualadam(params, grads, exp_avgs, exp_avg_sqs, s)
        return
    flat, leftover = [], []
    for quadruple in zip(params, grads, exp_avgs, exp_avg_sqs):
        (flat if _flattens(*quadruple) else leftover).append(quadruple)
    if leftover:
        _single_tensor_dualadam(*(list(column) for column in zip(*leftover)), s)
    if not flat:
        return
    if s.alpha == 0.0:
        adamw(*(list(column) for column in zip(*flat)), s)
        return

    kernel = compiled_kernel(_kernel_kind(s.alpha))
    from torch._dynamo.exc import BackendCompilerFailed

    scalars = torch.tensor(_kernel_scalars(s), dtype=torch.float32, device=params[0].device)
    size = _chunk_size(params[0].dtype)
    for start in range(0, len(flat), size):
        chunk = flat[start : start + size]
        tensors = [_flat(t) for quadruple in chunk for t in quadruple]
        tensors += [torch.empty(2, dtype=t.dtype, device=t.device) for _ in range(size - len(chunk)) for t in chunk[0]]
        try:
            _call_kernel(kernel, tensors, scalars)
        except BackendCompilerFailed as error:  # raised before any tensor is written
            device_type = params[0].device.type
            if not fall_back:
                raise RuntimeError(f"fused backend: torch.compile failed on {device_type}: {error}") from error
            record_compile_failure(device_type, error)
            warnings.warn(
                f"DualAdam: torch.compile failed on {device_type}, using the foreach backend instead: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            _multi_tensor_dualadam(*(list(column) for column in zip(*flat[start:])), s)
            return
        # Written through aliases: tell autograd, as an in-place op on the tensors would.
        torch.autograd.graph.increment_version([t for p, _, m, v in chunk for t in (p, m, v)])
