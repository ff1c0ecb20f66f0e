"""Padding-free batches: a batch's examples concatenated into one row and kept apart by attention.

The collator is transformers' ``DataCollatorWithFlattening``: one row of ``input_ids``, ``labels`` with
-100 where one example meets the next (so no example learns to predict the next one's first token),
``position_ids`` restarting at 0 for each example, and the boundaries ``cu_seq_lens_q``/``_k`` that
FlashAttention's varlen kernel takes. A batch keeps its examples and the run its optimizer steps, so
each step's loss is the padded one up to rounding.

Attention must keep the examples apart. Eager, SDPA and FlexAttention do so through the block-diagonal
mask ``masking_utils`` builds when it sees ``position_ids`` restart, which it does only with no
attention mask and no cache (so ``use_cache`` must be off); FlashAttention through the boundaries.
A block-diagonal mask over one long row costs more attention than the padding it removes (see
docs/benchmarks.md), so SDPA runs here as ``packed_sdpa``: SDPA on each example's slice of the row,
causal, with no mask at all. Unpacked batches (generation, a padded evaluation) take plain SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def segment_bounds(inputs: dict[str, Any]) -> list[int] | None:
    """Where each packed example starts, then the row's end (``[0, 37, 95, ...]``), from a batch or the
    keyword arguments of an attention call; None for a batch that is not packed.

    Read from ``cu_seq_lens_q`` where the collator gave it, else from one row of ``position_ids`` that
    restarts at 0 (``DataCollatorWithFlattening``'s default output)."""
    cumulative = inputs.get("cu_seq_lens_q")
    if cumulative is not None:
        return [int(bound) for bound in cumulative.tolist()]
    position_ids = inputs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    starts = (position_ids[0, 1:] == 0).nonzero().flatten().add(1).tolist()
    if not starts:
        return None
    return [0, *starts, position_ids.shape[1]]


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA on each packed example's slice of the row (query, key, value: batch x heads x tokens x dim)."""
    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        bounds = segment_bounds(kwargs)
    if bounds is None or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, is_causal=True, **kwargs
        )[0]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=1), None


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
