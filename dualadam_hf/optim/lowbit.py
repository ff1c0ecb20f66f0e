"""DualAdam and InvAdam with 8-bit, 4-bit or FP8 optimizer state, on torchao's quantized state tensors.

Adam's two moments take 8 bytes per parameter in fp32; kept block-wise quantized they take about 2
(8-bit, FP8) or 1 (4-bit). torchao (``pip install dualadam_hf[lowbit]``) provides the state: its
``OptimState8bit`` / ``OptimState4bit`` / ``OptimStateFp8`` tensor subclasses hold codes and one fp32 scale
per block, dequantize on read and re-quantize on ``copy_``. What torchao's public API does not offer is
an optimizer whose update rule is not Adam's, so the classes here are DualAdam with two changes:

- state: ``exp_avg`` and ``exp_avg_sq`` are torchao's quantized tensors (plain tensors of the parameter's
  dtype below ``QUANTIZE_MIN_NUMEL`` elements, or when the block size does not divide the tensor, as
  torchao's own optimizers and bitsandbytes do); ``step`` is DualAdam's 0-dim tensor, so alpha_t, the
  bias corrections, resume and the diagnostics work as for DualAdam;
- step: per parameter, one function reads the dequantized moments in fp32, updates them, computes
  DualAdam's update from them (alpha_t, bias corrections and blend as in ``DualAdam``; the parameter is
  updated from the fp32 moments, before they are re-quantized, as torchao's Adam does) and writes the
  moments back quantized. It is compiled per tensor shape as torchao's Adam step is (the per-step numbers
  enter as one fp32 tensor, so they do not recompile), or runs eagerly where no compiler works.

On CUDA, 8-bit and 4-bit state take Triton kernels instead, with the same arithmetic and the same state:
``triton_lowbit`` steps every quantized tensor of a bucket in one launch, reading and writing torchao's
codes and scales in place, and the tensors with plain state take ``triton_backend`` (torch's fused AdamW
once alpha_t = 0). Left to the per-tensor step: FP8 state, block sizes that are not a power of two,
``inv_scale="adam_rms"``, callable schedules, ``fused=False``, and, with ``bf16_stochastic_round``, bf16
parameters with plain state (the plain kernel rounds to nearest).

Nothing here imports torchao until an optimizer is built: ``import dualadam_hf`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from dualadam_hf.optim import fused as fused_backend
from dualadam_hf.optim import triton_backend, triton_lowbit
from dualadam_hf.optim.dualadam import DualAdam
from dualadam_hf.optim.kernels import StepScalars

__all__ = [
    "DualAdam8bit", "DualAdam4bit", "DualAdamFp8", "InvAdam8bit", "InvAdam4bit", "QUANTIZE_MIN_NUMEL",
    "is_quantized", "missing_dependency", "quiet_torchao_import_logs", "state_bytes",
]

# Smaller tensors keep plain state (torchao's and bitsandbytes' threshold): their quantized state would
# save little, and norms and biases are where quantization error costs most.
QUANTIZE_MIN_NUMEL = 4096
INSTALL_HINT = "pip install 'dualadam_hf[lowbit]' (torchao>=0.18,<0.19)"
# torchao's block sizes, per state format: one fp32 scale per block
DEFAULT_BLOCK_SIZE = {"8bit": 256, "4bit": 128, "fp8": 256}
# bits per code of the formats the CUDA kernel (``triton_lowbit``) steps; FP8 state is stepped per tensor
KERNEL_BITS = {"8bit": 8, "4bit": 4}


def missing_dependency() -> str | None:
    """Why the low-bit optimizers cannot be built here, in one line, or None when torchao is installed."""
    if importlib.util.find_spec("torchao") is None:
        return (
            f"torchao is not installed, and the low-bit optimizers keep their state in its quantized tensors: {INSTALL_HINT}"
        )
    return None


class _ImportNoise(logging.Filter):
    """Drops the log lines torchao's import writes on machines without its CUDA extensions (CPU ones):
    "Failed to load .../torchao/_C_....so", and torch's deprecation note on the Enums torchao registers.
    Neither concerns the optimizer states, and transformers imports torchao whenever it is installed, so
    every training process would print them before its own output."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        unloadable_extension = message.startswith("Failed to load ") and "torchao" in record.getMessage()
        enum_registration = "is an Enum subclass and is now natively supported by torch.compile" in message
        return not (unloadable_extension or enum_registration)


def quiet_torchao_import_logs() -> None:
    """Install ``_ImportNoise`` on the two loggers (idempotent); imports nothing."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _ImportNoise) for existing in logger.filters):
            logger.addFilter(_ImportNoise())


@functools.cache
def _torchao_optim() -> Any:
    """torchao.optim (its state subclasses and helpers), imported on first use; ``missing_dependency`` first."""
    quiet_torchao_import_logs()
    import torchao.optim
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    # The HF Trainer reloads optimizer.pt with torch.load(weights_only=True): the state subclasses must be
    # allowlisted. torchao 0.18 does it when its modules load; saying it here keeps resume working if not.
    torch.serialization.add_safe_globals([OptimState8bit, OptimState4bit, OptimStateFp8])
    return torchao.optim


def _quantized_zeros(state_format: str, local: Tensor, signed: bool, block_size: int) -> Tensor:
    torchao_optim = _torchao_optim()
    if state_format == "fp8":  # FP8 codes carry their sign
        return torchao_optim.subclass_fp8.OptimStateFp8.zeros(local.shape, block_size, local.device, dtype=local.dtype)
    state_type = (
        torchao_optim.subclass_8bit.OptimState8bit if state_format == "8bit" else torchao_optim.subclass_4bit.OptimState4bit
    )
    return state_type.zeros(local.shape, signed, block_size, local.device, dtype=local.dtype)


def is_quantized(tensor: Tensor) -> bool:
    """Whether ``tensor`` (a state tensor, or an FSDP2 DTensor of one) is a torchao quantized state."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return hasattr(local, "codes") and hasattr(local, "scale")


def state_bytes(tensor: Tensor) -> int:
    """Bytes a state tensor keeps in memory: codes, scales and lookup table of a quantized one."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if is_quantized(local):
        inner, _ = local.__tensor_flatten__()
        return sum(getattr(local, name).untyped_storage().nbytes() for name in inner)
    return local.untyped_storage().nbytes()


# The per-step numbers, one fp32 tensor (Python floats would be baked into the compiled graph and
# recompile every step: pytorch issue 171320): [1 - lr * wd, lr / bc1, sqrt(bc2), eps, alpha].
def _step_numbers(s: StepScalars, device: torch.device) -> Tensor:
    numbers = [s.decay, s.lr / s.bias_correction1, s.bias_correction2_sqrt, s.eps, s.alpha]
    return torch.tensor(numbers, dtype=torch.float32, device=device)


def _update_kind(s: StepScalars) -> str:
    """Which terms the step computes: no InvAdam work at alpha = 0, no Adam work at alpha = 1, no update at
    lr = 0 (the step frameworks take to create state before loading a checkpoint changes no parameter)."""
    if s.lr == 0.0:
        return "no_update"
    if s.rescale_inv and s.alpha != 0.0:
        return "rescaled"
    if s.alpha == 0.0:
        return "adam"
    if s.alpha == 1.0:
        return "invadam"
    return "blend"


def _step_one(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    numbers: Tensor,
    beta1: float,
    beta2: float,
    maximize: bool,
    kind: str,
    round_to_bf16: Callable[[Tensor], Tensor] | None,
) -> None:
    """One parameter's DualAdam step on quantized moments, in fp32. Written for ``torch.compile``
    (``fullgraph``): the quantized tensors implement ``lerp`` (dequantize, then lerp) and ``copy_``
    (re-quantize), as torchao's Adam step uses them. ``round_to_bf16``: torchao's stochastic rounding, or
    None for ``copy_``'s rounding to nearest."""
    g = grad.float()
    if maximize:
        g = -g
    m = exp_avg.float().lerp(g, 1.0 - beta1)
    v = exp_avg_sq.float().lerp(g * g, 1.0 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)

    # m_hat = m / bc1, whose 1 / bc1 the step size numbers[1] carries
    sqrt_v_hat = v.sqrt() / numbers[2]
    alpha = numbers[4]
    if kind == "no_update":  # lr = 0: the moments move, the parameter does not (0 * update could be NaN)
        return
    if kind == "adam":
        update = m / (sqrt_v_hat + numbers[3])
    elif kind == "invadam":
        update = m * sqrt_v_hat
    else:
        inv = m * sqrt_v_hat
        adam = m / (sqrt_v_hat + numbers[3])
        if kind == "rescaled":  # InvAdam's direction at the Adam term's norm, per tensor (DualAdam's inv_scale)
            inv_norm = torch.linalg.vector_norm(inv)
            ratio = torch.where(inv_norm > 0, torch.linalg.vector_norm(adam) / inv_norm, torch.zeros_like(inv_norm))
            inv = inv * ratio
        update = alpha * inv + (1.0 - alpha) * adam
    updated = param.float() * numbers[0] - numbers[1] * update
    if round_to_bf16 is not None:
        updated = round_to_bf16(updated)
    param.copy_(updated)


@functools.cache
def _compiled_step() -> Callable[..., None]:
    # dynamic=False, as torchao's Adam: one graph per shape and kind, the shapes of a model being few
    return torch.compile(_step_one, fullgraph=True, dynamic=False)


def lowbit_backend(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    s: StepScalars,
    *,
    compiled: bool,
    stochastic_round: bool,
) -> None:
    """The backend of the low-bit optimizers (the signature of ``kernels``' backends): ``_step_one`` per
    parameter, compiled or eager. If compiling fails (before the step writes anything), warn once and step
    eagerly from then on, as the fused backend falls back to foreach."""
    step = _compiled_step() if compiled else _step_one
    numbers = _step_numbers(s, params[0].device)
    kind = _update_kind(s)
    round_to_bf16 = None
    if stochastic_round and params[0].dtype == torch.bfloat16:
        # looked up here, not in the compiled function: dynamo cannot trace the import behind it
        round_to_bf16 = _torchao_optim().quant_utils._fp32_to_bf16_sr
    # Every shape compiles once; the limit on recompiles is for functions whose inputs should not vary.
    from torch._dynamo.exc import BackendCompilerFailed

    with torch._dynamo.utils.disable_cache_limit():
        for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
            # detach: compiling with FSDP2's DTensor parameters fails otherwise (torchao issue 652)
            arguments = (param.detach(), grad, exp_avg, exp_avg_sq, numbers, s.beta1, s.beta2, s.maximize, kind,
                         round_to_bf16)
            try:
                step(*arguments)
            except BackendCompilerFailed as error:
                device_type = param.device.type
                fused_backend.record_compile_failure(device_type, error)
                warnings.warn(
                    f"low-bit DualAdam: torch.compile failed on {device_type}, stepping eagerly instead: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                step = _step_one
                step(*arguments)


class _LowBitDualAdam(DualAdam):
    """DualAdam with quantized moments; the subclasses fix the state format (``state_format``).

    Same arguments and schedules as :class:`DualAdam`, plus:

    Args:
        block_size: elements per quantization block, each with one fp32 scale (default: torchao's, 256 for
            8-bit and FP8 state, 128 for 4-bit).
        bf16_stochastic_round: write bf16 parameters with stochastic rounding (torchao's), so that updates
            smaller than bf16's resolution are kept on average instead of lost.
        compiled: compile the per-tensor step (None: where a compiler works; False: eager, slower, same math).
        fused: None: Triton kernels on CUDA for 8-bit and 4-bit state (``triton_lowbit``), the per-tensor
            step elsewhere; False: the per-tensor step everywhere; True is refused (the quantized state has
            backends of its own).
    """

    state_format: str = ""

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
        block_size: int | None = None,
        bf16_stochastic_round: bool = False,
        compiled: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        name = type(self).__name__
        if fused:
            raise ValueError(
                f"{name}: fused=True is not available: the quantized state is dequantized, updated and re-quantized "
                "by backends of its own (a Triton kernel on CUDA, a compiled step per tensor elsewhere); "
                "leave fused unset"
            )
        block_size = DEFAULT_BLOCK_SIZE[self.state_format] if block_size is None else block_size
        check_block_size(block_size, self.state_format, name)
        reason = missing_dependency()
        if reason is not None:
            raise ImportError(f"{name}: {reason}")
        _torchao_optim()
        super().__init__(
            params, lr, betas, eps, weight_decay, switch_rate,
            schedule=schedule, switch_base=switch_base, switch_step=switch_step, inv_scale=inv_scale,
            maximize=maximize, fused=fused,
        )
        # per optimizer, as torchao's: a state tensor keeps the block size it was created with
        self.block_size = block_size
        self.bf16_stochastic_round = bf16_stochastic_round
        self.compiled = compiled

    def _new_moment(self, p: Tensor, signed: bool) -> Tensor:
        is_dtensor = hasattr(p, "to_local")
        local = p.to_local() if is_dtensor else p
        if local.numel() >= QUANTIZE_MIN_NUMEL and local.numel() % self.block_size == 0:
            moment = _quantized_zeros(self.state_format, local, signed, self.block_size)
        else:
            moment = torch.zeros_like(local, memory_format=torch.preserve_format)
        if not is_dtensor:
            return moment
        from torch.distributed.tensor import DTensor

        # FSDP2 shards may differ in shape across ranks (a first dimension not divisible by the world
        # size), so the global shape and stride are given; from_local moves to the mesh's device type,
        # hence the move back (CPU offload).
        wrapped = DTensor.from_local(
            moment, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
        return wrapped.to(p.device)

    def _device_backend_takes(self, group: dict[str, Any]) -> bool:
        """CUDA kernels for 8-bit and 4-bit state in blocks of a power of two (the kernel's tile)."""
        block = self.block_size
        return self.state_format in KERNEL_BITS and block & (block - 1) == 0 and triton_backend.group_takes(group)

    def _device_step(self, group: dict[str, Any], entries: list) -> list:
        """Quantized state: one ``triton_lowbit`` launch per bucket (device, dtypes, block size); plain state:
        ``DualAdam``'s CUDA backend. Returns the entries neither takes."""
        bits = KERNEL_BITS[self.state_format]
        stochastic = self.bf16_stochastic_round
        buckets: dict[tuple, list] = {}
        plain, others = [], []
        for p, grad, state in entries:
            exp_avg, exp_avg_sq = triton_backend.local(state["exp_avg"]), triton_backend.local(state["exp_avg_sq"])
            if not is_quantized(exp_avg):
                # the plain kernel rounds bf16 to nearest: stochastic rounding stays with the per-tensor step
                (others if stochastic and p.dtype == torch.bfloat16 else plain).append((p, grad, state))
                continue
            shard, grad_shard = triton_backend.local(p), triton_backend.local(grad)
            takes = triton_backend.takes(p) and triton_lowbit.takes_state(shard, grad_shard, exp_avg, exp_avg_sq, bits)
            if not takes:
                others.append((p, grad, state))
                continue
            self._host_steps.advance(p, state, shard.device)
            key = (shard.device, shard.dtype, grad_shard.dtype, exp_avg.block_size)
            buckets.setdefault(key, []).append((shard, grad_shard, exp_avg, exp_avg_sq, state["step"]))
        for bucket in buckets.values():
            params, grads, exp_avgs, exp_avg_sqs, steps = (list(column) for column in zip(*bucket))
            triton_lowbit.step_bucket(group, params, grads, exp_avgs, exp_avg_sqs, steps, stochastic_round=stochastic)
        return others + super()._device_step(group, plain)

    def _backend(self, group: dict[str, Any], entries: list) -> Callable[..., None]:
        device_type = entries[0][0].device.type
        compiled = self.compiled
        if compiled is None:  # torch.compile's C++ (CPU) or Triton (CUDA), as the fused backend needs
            compiled = fused_backend.compiler_usable(device_type)
        return functools.partial(lowbit_backend, compiled=compiled, stochastic_round=self.bf16_stochastic_round)


def check_block_size(block_size: Any, state_format: str, name: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive integer, got {block_size!r}")
    if state_format == "4bit" and block_size % 2:
        raise ValueError(f"{name}: block_size must be even for 4-bit state (two codes per byte), got {block_size}")


class DualAdam8bit(_LowBitDualAdam):
    """DualAdam with 8-bit block-wise quantized moments (about 2 bytes per parameter); see ``_LowBitDualAdam``."""

    state_format = "8bit"


class DualAdam4bit(_LowBitDualAdam):
    """DualAdam with 4-bit block-wise quantized moments (about 1 byte per parameter); see ``_LowBitDualAdam``."""

    state_format = "4bit"


class DualAdamFp8(_LowBitDualAdam):
    """DualAdam with FP8 (e4m3) block-wise scaled moments (about 2 bytes per parameter); see ``_LowBitDualAdam``."""

    state_format = "fp8"


class _AlphaOne(_LowBitDualAdam):
    """InvAdam's arguments (no schedule): alpha_t = 1 at every step, as :class:`InvAdam`."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        block_size: int | None = None,
        bf16_stochastic_round: bool = False,
        compiled: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, 0.0, schedule="linear", maximize=maximize, block_size=block_size,
            bf16_stochastic_round=bf16_stochastic_round, compiled=compiled, fused=fused,
        )


class InvAdam8bit(_AlphaOne, DualAdam8bit):
    """InvAdam with 8-bit state."""


class InvAdam4bit(_AlphaOne, DualAdam4bit):
    """InvAdam with 4-bit state."""
