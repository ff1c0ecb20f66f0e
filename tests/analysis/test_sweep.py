from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dualadam_hf.analysis.sweep import aggregate, aggregate_markdown, parse_variant


def test_parse_variant():
    variant = parse_variant("adamw=--optim adamw_torch --lr_scheduler_type 'constant_with_warmup'")
    assert variant.name == "adamw" and variant.flags == ("--optim", "adamw_torch", "--lr_scheduler_type",
                                                         "constant_with_warmup")
    assert parse_variant("dualadam=").flags == ()
    with pytest.raises(ValueError, match="not of the form NAME=FLAGS"):
        parse_variant("adamw")


def test_aggregate_mean_and_sample_std():
    summaries = [
        {"variant": "a", "seed": 0, "best_eval_ppl": 10.0, "optimizer": "x"},
        {"variant": "a", "seed": 1, "best_eval_ppl": 14.0, "optimizer": "x"},
        {"variant": "b", "seed": 0, "best_eval_ppl": 3.0, "optimizer": "y"},
    ]
    table = aggregate(summaries, ["a", "b"])
    assert table["a"]["best_eval_ppl"] == {"mean": 12.0, "std": pytest.approx(2 ** 0.5 * 2), "n": 2}
    assert table["b"]["best_eval_ppl"] == {"mean": 3.0, "std": 0.0, "n": 1}
    assert "seed" not in table["a"]
    assert "12 ± 2.8 (n=2)" in aggregate_markdown(table)


@pytest.mark.slow
def test_sweep_of_two_variants_and_two_seeds(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "scripts/sweep.py", "recipes/tiny_alpaca.yaml", "--seeds", "0", "1",
               "--variant", "dualadam=", "--variant", "adamw=--optim adamw_torch", "--out", str(out),
               "--extra", "--max_steps 2 --eval_steps 2 --max_train_samples 16 --max_eval_samples 4 --disable_tqdm true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "summary.json").read_text())
    assert [(r["variant"], r["seed"]) for r in runs] == [("dualadam", 0), ("adamw", 0), ("dualadam", 1), ("adamw", 1)]
    table = json.loads((out / "aggregate.json").read_text())
    ppl = [r["final_eval_ppl"] for r in runs if r["variant"] == "adamw"]
    assert table["adamw"]["final_eval_ppl"]["mean"] == pytest.approx(sum(ppl) / 2)
    assert (out / "ppl.png").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.stdout.count("done already, kept") == 4
