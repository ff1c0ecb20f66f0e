"""The padded-vs-packed throughput benchmark: its length distribution, its counts, its command line."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dualadam_hf.analysis.packing_bench import (
    TOKENS_MEAN,
    TOKENS_STD,
    alpaca_gpt4_like_examples,
    format_table,
    measure,
    tiny_case,
)
from dualadam_hf.train.sft_data import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]


def test_the_alpaca_gpt4_lengths_have_the_published_mean_and_spread():
    examples = alpaca_gpt4_like_examples(4000, vocab_size=500, max_seq_length=1024, seed=1)
    lengths = [len(example["input_ids"]) for example in examples]
    assert statistics.mean(lengths) == pytest.approx(TOKENS_MEAN, rel=0.05)
    assert statistics.stdev(lengths) == pytest.approx(TOKENS_STD, rel=0.1)
    for example in examples[:50]:
        labels = example["labels"]
        prompt = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        assert prompt >= 1 and labels[prompt:] == example["input_ids"][prompt:]
        assert all(3 <= token < 500 for token in example["input_ids"])
    capped = alpaca_gpt4_like_examples(500, vocab_size=500, max_seq_length=64, seed=1)
    assert max(len(example["input_ids"]) for example in capped) == 64


def test_one_round_counts_the_same_tokens_for_both_layouts():
    make_model, examples, batch_size, pad_token_id = tiny_case()
    result = measure("tiny", make_model, examples[:40], batch_size=8, pad_token_id=pad_token_id, steps=2, rounds=1)
    assert result.nonpad_tokens > 0 and 0 < result.padding_share < 1
    assert result.padded_tokens_per_second > 0 and result.packed_tokens_per_second > 0
    assert result.speedup == pytest.approx(result.packed_tokens_per_second / result.padded_tokens_per_second)
    assert "| tiny | packed_sdpa | 8 |" in format_table([result])


def test_the_script_refuses_a_count_below_one():
    result = subprocess.run([sys.executable, "scripts/bench_packing.py", "--rounds", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().endswith("error: --rounds must be at least 1, got 0")
