"""Evaluation measures: token-weighted NLL, safe perplexity, accuracy.

The HF Trainer's eval_loss is a mean of batch means, which weighs a token in a short batch more than a
token in a long one. Here every batch yields per-example sums (NLL summed over label tokens, number of
label tokens, correct predictions); those are gathered across processes and summed, and the loss is
their ratio over the whole set.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# per-example statistics, one row per example: [nll_sum, label_count, correct]
NLL_SUM, COUNT, CORRECT = 0, 1, 2


def safe_perplexity(loss: float) -> float:
    """exp(loss), ``inf`` when it overflows; a NaN loss gives NaN and a warning, never an exception."""
    if math.isnan(loss):
        logger.warning("evaluation loss is NaN; perplexity is NaN")
        return float("nan")
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def per_example_stats(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int] | None = None) -> torch.Tensor:
    """(examples, 3) float64 rows of [nll_sum, label_count, correct].

    Causal LM (logits batch x seq x vocab, labels batch x seq): position i predicts label i+1, label
    tokens are those != -100. A packed batch (one row, ``bounds`` = where each example starts, then the
    row's end) gives one row per example, as the same examples padded would, so that the evaluation loop
    gathers and de-duplicates examples either way. Classification (logits batch x classes, labels
    batch): one label each.
    """
    if logits.dim() == 3 and labels.dim() == 2:
        if bounds is not None:
            pairs = [(logits[0, start:end], labels[0, start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
        else:
            pairs = list(zip(logits, labels))
        rows = []
        # one example at a time: a whole batch of fp32 logits can be large for big vocabularies
        for row_logits, row_labels in pairs:
            row_logits, row_labels = row_logits[:-1], row_labels[1:]
            mask = row_labels != IGNORE_INDEX
            nll = F.cross_entropy(row_logits.float(), row_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            correct = ((row_logits.argmax(-1) == row_labels) & mask).sum()
            rows.append(torch.stack([nll.double(), mask.sum().double(), correct.double()]))
        return torch.stack(rows)
    if logits.dim() == 2 and labels.dim() == 1:
        nll = F.cross_entropy(logits.float(), labels, reduction="none")
        correct = logits.argmax(-1) == labels
        return torch.stack([nll.double(), torch.ones_like(nll, dtype=torch.float64), correct.double()], dim=1)
    raise ValueError(
        f"cannot evaluate logits of shape {tuple(logits.shape)} with labels of shape {tuple(labels.shape)}: "
        "expected a causal LM (batch, seq, vocab) / (batch, seq) or a classifier (batch, classes) / (batch,)"
    )


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """Totals of gathered per-example rows -> loss (token- or example-weighted mean NLL) and accuracy."""
    totals = stats.sum(dim=0) if stats.numel() else torch.zeros(3, dtype=torch.float64)
    count = totals[COUNT].item()
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "tokens": 0.0}
    return {
        "loss": totals[NLL_SUM].item() / count,
        "accuracy": totals[CORRECT].item() / count,
        "tokens": count,
    }
