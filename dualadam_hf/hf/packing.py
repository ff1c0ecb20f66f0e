"""Padding-free batches: a batch's examples concatenated into one row and kept apart by attention.

The collator is transformers' ``DataCollatorWithFlattening``: one row of ``input_ids``, ``labels`` with
-100 where one example meets the next (so no example learns to predict the next one's first token),
``position_ids`` restarting at 0 for each example, and the boundaries FlashAttention's varlen kernel takes:
``cu_seq_lens_q``/``_k`` (int32 tensors) and ``max_length_q``/``_k`` (Python ints). A batch keeps its
examples and the run its optimizer steps, so each step's loss is the padded one up to rounding.

Attention must keep the examples apart. Eager, SDPA and FlexAttention do so through the block-diagonal
mask ``masking_utils`` builds when it sees ``position_ids`` restart, which it does only with no
attention mask and no cache (so ``use_cache`` must be off); FlashAttention through the boundaries.
A block-diagonal mask over one long row costs more attention than the padding it removes (see
docs/benchmarks.md), so SDPA runs here as ``packed_sdpa``, causal within each example with no mask at all:
on a CUDA card that FlashAttention supports, torch's varlen kernel (``torch.nn.attention.varlen``,
torch >= 2.9) once over the whole row, from the collator's boundaries as they are, with no host read;
elsewhere (the CPU, float32, dropout) SDPA on each example's slice of the row, from boundaries the host
reads once per batch and every layer shares. Unpacked batches (generation, a padded evaluation) take plain
SDPA. ``packed_sdpa`` attends to each example's whole past, so models with a sliding window keep SDPA and
transformers' mask (``attends_fully``), or ``flash_attention_2`` where flash-attn is installed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

PACKED_SDPA = "packed_sdpa"
# Implementations that keep packed examples apart (see the module docstring), PACKED_SDPA included.
KEEPS_EXAMPLES_APART = (
    "eager",
    "sdpa",
    PACKED_SDPA,
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)

# How packed_sdpa runs one attention call (packed_kernel).
PLAIN_SDPA = "sdpa"
PER_EXAMPLE = "per_example"
VARLEN = "varlen"
# Whether this torch build runs the varlen kernel at all: a CUDA build with FlashAttention (ROCm's varlen
# backend is not the one this path was checked against).
VARLEN_IN_TORCH = (
    varlen_attn is not None and torch.version.cuda is not None and torch.backends.cuda.is_flash_attention_available()
)
# What FlashAttention-2's kernels in torch take (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp,
# mha_varlen_fwd; the card range is SDPA's check_flash_attention_hardware_support in sdp_utils.cpp).
FLASH_CAPABILITIES = ((8, 0), (12, 1))
# Cards whose FlashAttention backward refuses head dims in (192, 224] (sdp_utils.cpp,
# check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120).
FLASH_NO_BACKWARD_192_224 = (((8, 6), (8, 9)), ((12, 0), (12, 1)))
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


class PackingError(ValueError):
    """Packing asked of a model or attention implementation that cannot keep packed examples apart."""


def check_attention(attention: str | None) -> None:
    """Refuse, naming it, an attention implementation that cannot keep packed examples apart (None: the
    model's default, checked once the model is loaded)."""
    if attention is not None and attention not in KEEPS_EXAMPLES_APART:
        raise PackingError(
            f"packing: attn_implementation={attention} cannot keep packed examples apart; use one of "
            f"{', '.join(KEEPS_EXAMPLES_APART)}, or set packing: false"
        )


def packed_collator() -> DataCollatorWithFlattening:
    """Padding-free batches with the boundaries FlashAttention and ``packed_sdpa`` take."""
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)


T = TypeVar("T")
# The last host read of a batch's boundaries: (read, the tensor read, its version, the value).
_last_read: tuple[Callable[[torch.Tensor], Any], weakref.ref, int, Any] | None = None


def _version(tensor: torch.Tensor) -> int:
    return -1 if tensor.is_inference() else tensor._version  # inference tensors keep no version counter


def _read_once(read: Callable[[torch.Tensor], T], source: torch.Tensor) -> T:
    """``read(source)``, kept while ``source`` lives unchanged, so that the layers of one forward (and
    activation checkpointing's recomputation of it) share one host read of the batch. One entry: the model
    sees one batch at a time, and a tensor that died or changed in place is read again."""
    global _last_read
    last = _last_read
    if last is not None and last[0] is read and last[1]() is source and last[2] == _version(source):
        return last[3]
    value = read(source)
    _last_read = (read, weakref.ref(source), _version(source), value)
    return value


def _bounds_from_cumulative(cumulative: torch.Tensor) -> list[int]:
    return [int(bound) for bound in cumulative.tolist()]


def _bounds_from_positions(position_ids: torch.Tensor) -> list[int] | None:
    # one copy to the host, where nonzero() on the device would wait for it once more
    starts = [index for index, position in enumerate(position_ids[0].tolist()) if position == 0 and index > 0]
    return [0, *starts, position_ids.shape[1]] if starts else None


def segment_bounds(inputs: dict[str, Any]) -> list[int] | None:
    """Where each packed example starts, then the row's end (``[0, 37, 95, ...]``), from a batch or the
    keyword arguments of an attention call; None for a batch that is not packed.

    Read from ``cu_seq_lens_q`` where the collator gave it, else from one row of ``position_ids`` that
    restarts at 0 (``DataCollatorWithFlattening``'s default output); read once per batch (``_read_once``)."""
    cumulative = inputs.get("cu_seq_lens_q")
    if cumulative is not None:
        return _read_once(_bounds_from_cumulative, cumulative)
    position_ids = inputs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    return _read_once(_bounds_from_positions, position_ids)


def varlen_boundaries(inputs: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int] | None:
    """``(cu_seq, max_length)`` as the varlen kernel takes them (int32 on ``device``, an int); None for a
    batch that is not packed. The collator's ``cu_seq_lens_q`` and ``max_length_q`` are used as they are,
    with no host read; without them the boundaries are read once per batch (``segment_bounds``)."""
    cumulative, max_length = inputs.get("cu_seq_lens_q"), inputs.get("max_length_q")
    if cumulative is not None and isinstance(max_length, int):
        return cumulative.to(device=device, dtype=torch.int32), max_length
    bounds = segment_bounds(inputs)
    if bounds is None:
        return None
    if cumulative is None:
        cumulative = torch.tensor(bounds, dtype=torch.int32)
    return cumulative.to(device=device, dtype=torch.int32), max(end - start for start, end in zip(bounds, bounds[1:]))


def packed_kernel(
    *,
    packed: bool,
    device_type: str,
    capability: tuple[int, int] | None,
    varlen_in_torch: bool,
    dtype: torch.dtype,
    head_dim: int,
    value_head_dim: int,
    dropout: float,
    requires_grad: bool,
) -> str:
    """How ``packed_sdpa`` runs one attention call: ``PLAIN_SDPA`` for a batch that is not packed; ``VARLEN``
    (torch's FlashAttention varlen kernel, once over the whole row) where that kernel runs: a torch that has
    it (``VARLEN_IN_TORCH``), a CUDA card in ``FLASH_CAPABILITIES``, float16 or bfloat16, query and value
    head dims equal, a multiple of 8 and at most 256 (with a backward, not in (192, 224] on the cards of
    ``FLASH_NO_BACKWARD_192_224``), and no dropout (the kernel has none); else ``PER_EXAMPLE`` (SDPA on
    each example's slice)."""
    if not packed:
        return PLAIN_SDPA
    if not (varlen_in_torch and device_type == "cuda" and capability is not None):
        return PER_EXAMPLE
    flash_card = FLASH_CAPABILITIES[0] <= capability <= FLASH_CAPABILITIES[1]
    flash_shape = head_dim == value_head_dim and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM
    no_backward = requires_grad and 192 < head_dim <= 224
    no_backward = no_backward and any(low <= capability <= high for low, high in FLASH_NO_BACKWARD_192_224)
    if flash_card and flash_shape and not no_backward and dtype in FLASH_DTYPES and dropout == 0:
        return VARLEN
    return PER_EXAMPLE


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed example (query, key, value: batch x heads x tokens x dim; the output:
    batch x tokens x heads x dim), with the kernel ``packed_kernel`` picks."""
    tokens = query.shape[2]
    packed = attention_mask is None and query.shape[0] == 1 and key.shape[2] == tokens
    packed = packed and (kwargs.get("cu_seq_lens_q") is not None or kwargs.get("position_ids") is not None)
    device = query.device
    kernel = packed_kernel(
        packed=packed,
        device_type=device.type,
        capability=torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        varlen_in_torch=VARLEN_IN_TORCH,
        dtype=query.dtype,
        head_dim=query.shape[-1],
        value_head_dim=value.shape[-1],
        dropout=kwargs.get("dropout", 0.0),
        requires_grad=torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
    )
    if kernel == VARLEN:
        boundaries = varlen_boundaries(kwargs, device)
        if boundaries is not None:
            return _varlen_attention(query, key, value, *boundaries, scaling=kwargs.get("scaling")), None
    elif kernel == PER_EXAMPLE:
        bounds = segment_bounds(kwargs)
        if bounds is not None and bounds[-1] == tokens:
            return _per_example_attention(module, query, key, value, bounds, **kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq: torch.Tensor,
    max_length: int,
    *,
    scaling: float | None,
) -> torch.Tensor:
    # (1, heads, tokens, dim) -> (tokens, heads, dim): the row's tokens as the kernel's total_q; the output
    # comes back as (1, tokens, heads, dim), the layout transformers' attention functions return.
    output = varlen_attn(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seq,
        cu_seq,
        max_length,
        max_length,
        scale=scaling,
        window_size=(-1, 0),  # causal: the kernel's is_causal is window_size == (-1, 0)
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.unsqueeze(0)


def _per_example_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    **kwargs: Any,
) -> torch.Tensor:
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, is_causal=True, **kwargs
        )[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=1)


def _packed_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    # No padding mask means nothing to mask beyond causality, which packed_sdpa_attention applies per example
    # (a packed row) or SDPA's is_causal applies (an unpadded row); with padding (generation), SDPA's mask.
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Idempotent: make ``attn_implementation="packed_sdpa"`` known to transformers."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)


def attends_fully(config: Any) -> bool:
    """Whether every layer attends causally to the whole past: no sliding window (Mistral, Qwen2's sliding
    layers, Gemma 2/3), no chunked attention. ``packed_sdpa`` computes exactly that and nothing else."""
    if getattr(config, "sliding_window", None) is not None or getattr(config, "attention_chunk_size", None):
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    return all(layer_type == "full_attention" for layer_type in layer_types)


def attention_of(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def prepare_for_packing(model: Any) -> str:
    """Make ``model`` keep packed examples apart, or refuse in one line (ValueError, naming the culprit).

    SDPA becomes ``packed_sdpa`` where every layer attends fully (``attends_fully``); with a sliding window
    SDPA stays, and keeps the examples apart with transformers' block-diagonal mask. The other
    implementations that keep packed examples apart stay. The cache is turned off for the forward passes of
    training and evaluation (generation keeps its own setting). Returns the attention implementation the
    run uses."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise PackingError(f"packing: {model_type} is not a decoder-only causal LM; set packing: false")
    if not getattr(model, "_supports_attention_backend", False):
        raise PackingError(
            f"packing: {model_type} does not run its attention through transformers' attention interface, so "
            "packed examples would attend to each other; set packing: false"
        )
    attention = attention_of(model)
    check_attention(attention or "none")
    if attention == PACKED_SDPA and not attends_fully(config):
        raise PackingError(
            f"packing: attn_implementation={PACKED_SDPA} attends to the whole past, but {model_type} uses a sliding "
            "window or chunked attention; use sdpa"
        )
    if attention == "sdpa" and attends_fully(config):
        register()
        model.set_attn_implementation(PACKED_SDPA)
        attention = PACKED_SDPA
    config.use_cache = False
    return attention


def batch_token_counts(inputs: dict[str, Any]) -> torch.Tensor | None:
    """``[non-pad tokens, tokens of the padded layout]`` of a batch, as a float64 tensor on the batch's
    device (no host sync): for a packed batch the padded layout is its examples right-padded to the longest
    one; for a padded batch it is the batch itself."""
    cumulative = inputs.get("cu_seq_lens_q")
    if cumulative is not None:
        lengths = cumulative[1:] - cumulative[:-1]
        return torch.stack([cumulative[-1], lengths.max() * lengths.numel()]).double()
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor):
        return None
    mask = inputs.get("attention_mask")
    real = mask.sum() if isinstance(mask, torch.Tensor) else torch.tensor(input_ids.numel(), device=input_ids.device)
    return torch.stack([real.to(input_ids.device), torch.tensor(input_ids.numel(), device=input_ids.device)]).double()


def token_metrics(counts: torch.Tensor, runtime: float | None) -> dict[str, float]:
    """``train_padding_share`` and ``train_nonpad_tokens_per_second`` from summed ``batch_token_counts``."""
    real, layout = (float(value) for value in counts.tolist())
    if layout == 0:
        return {}
    metrics = {"train_nonpad_tokens": real, "train_padding_share": (layout - real) / layout}
    if runtime:
        metrics["train_nonpad_tokens_per_second"] = real / runtime
    return metrics
