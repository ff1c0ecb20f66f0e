from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dualadam_hf.hf.metrics import per_example_stats, safe_perplexity, summarize


def test_safe_perplexity():
    assert safe_perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert safe_perplexity(1000.0) == float("inf")
    assert safe_perplexity(float("inf")) == float("inf")


def test_nan_loss_gives_nan_perplexity_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert math.isnan(safe_perplexity(float("nan")))
    assert "NaN" in caplog.text


def test_causal_lm_stats_shift_and_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    stats = per_example_stats(logits, labels)
    for row in range(2):
        targets = labels[row, 1:]
        mask = targets != -100
        expected = F.cross_entropy(logits[row, :-1][mask], targets[mask], reduction="sum")
        assert stats[row, 0].item() == pytest.approx(expected.item(), rel=1e-6)
        assert stats[row, 1].item() == mask.sum().item()
    assert summarize(stats)["loss"] == pytest.approx(stats[:, 0].sum().item() / 5)


def test_classification_stats():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    summary = summarize(per_example_stats(logits, labels))
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())


def test_unsupported_shapes_are_named():
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3, 4\) with labels of shape \(2,\)"):
        per_example_stats(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
