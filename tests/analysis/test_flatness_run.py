"""scripts/flatness.py on finished runs: a digits run and a tiny LLM run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dualadam_hf.analysis.compare import CompareError
from dualadam_hf.train.finetune import main as finetune
from dualadam_hf.analysis.flatness_run import measure_run
from dualadam_hf.train.vision.train import main as train_vision


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert train_vision(["recipes/vision_digits.yaml", "--output_dir", str(out), "--max_steps", "30",
                         "--disable_tqdm", "true"]) == 0
    return out


def test_digits_run_is_measured_deterministically(digits_run):
    first = measure_run(digits_run, num_batches=2, batch_size=32, iters=30, samples=20)
    again = measure_run(digits_run, num_batches=2, batch_size=32, iters=30, samples=20)
    assert first == again
    assert first["examples"] == 64 and first["optimizer"] == "dualadam"
    assert first["top_eigenvalue"] > 0 and first["trace"] > 0 and math.isfinite(first["trace_stderr"])


def test_script_writes_flatness_json(digits_run):
    result = subprocess.run([sys.executable, "scripts/flatness.py", str(digits_run), "--batches", "1",
                             "--batch-size", "16", "--iters", "10", "--samples", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((digits_run / "flatness.json").read_text())
    assert "top eigenvalue" in result.stdout and written["examples"] == 16


def test_tiny_llm_run_is_measured(tmp_path):
    out = tmp_path / "llm"
    assert finetune(["recipes/tiny_alpaca.yaml", "--output_dir", str(out), "--max_steps", "2", "--eval_steps", "2",
                     "--max_train_samples", "16", "--max_eval_samples", "4", "--disable_tqdm", "true"]) == 0
    result = measure_run(out, num_batches=1, batch_size=4, iters=5, samples=3)
    assert result["examples"] == 4 and math.isfinite(result["top_eigenvalue"]) and result["loss"] > 0


def test_a_directory_without_run_config_is_refused(tmp_path):
    with pytest.raises(CompareError, match="no run_config.json"):
        measure_run(tmp_path)


def test_group_statistics_by_variant():
    from dualadam_hf.analysis.flatness_run import group_statistics

    results = [("a", {"top_eigenvalue": 1.0, "trace": 2.0, "loss": 0.1}),
               ("a", {"top_eigenvalue": 3.0, "trace": 4.0, "loss": 0.3}),
               ("b", {"top_eigenvalue": 5.0, "trace": 6.0, "loss": 0.5})]
    stats = group_statistics(results)
    assert stats["a"]["top_eigenvalue"] == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert stats["b"]["trace"] == {"mean": 6.0, "std": 0.0, "n": 1}
