"""The optimizer-step benchmark on a tiny model: it runs and reports what its docstring promises."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualadam_hf.analysis import bench
from dualadam_hf.optim.fused import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]

RESULT_KEYS = {"name", "ms_per_step", "gb_per_s", "vs_adamw_fused", "vs_adamw_foreach", "first_step_s", "compiles"}
REPORT_KEYS = {
    "shape",
    "device",
    "device_name",
    "dtype",
    "num_params",
    "num_tensors",
    "threads",
    "torch",
    "cuda",
    "triton",
    "rounds",
    "steps_per_round",
    "results",
}


@pytest.mark.parametrize("num_params", [20_000, 3_000_000, 30_000_000])
def test_transformer_shapes_come_close_to_the_size_asked(num_params):
    shapes = bench.transformer_shapes(num_params)
    total = sum(torch.Size(s).numel() for s in shapes)
    assert 0.7 * num_params <= total <= 1.5 * num_params
    width = shapes[0][1]
    assert (width,) in shapes and (width, width) in shapes and (4 * width, width) in shapes


def test_openpangu_1b_shapes_are_the_published_ones():
    shapes = bench.model_shapes("openpangu-1b", num_params=0)
    assert len(shapes) == 341  # embedding, 26 layers of 13 tensors, final norm, lm_head
    assert sum(torch.Size(s).numel() for s in shapes) == 1_391_497_728
    assert shapes[0] == shapes[-1] == (153_376, 1536)  # untied lm_head
    assert (768, 1536) in shapes and (768,) in shapes  # k/v: 6 heads of 128, with a bias
    assert (6144, 1536) in shapes and (1536, 6144) in shapes


def test_unknown_shape_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown shape 'llama'; known: gpt, openpangu-1b"):
        bench.model_shapes("llama", num_params=20_000)


def test_tiny_benchmark_reports_the_documented_keys():
    names = ["AdamW fused", "AdamW foreach", "DualAdam foreach, blending", "DualAdam foreach, after switch"]
    if unavailable_reason(torch.zeros(2)) is None:
        names.append("DualAdam fused, blending")
    report = bench.run_benchmark(num_params=20_000, rounds=2, steps=1, names=names)
    assert set(report) == REPORT_KEYS
    assert report["shape"] == "gpt" and report["cuda"] is None
    triton_installed = importlib.util.find_spec("triton") is not None
    assert report["triton"] == (importlib.import_module("triton").__version__ if triton_installed else None)
    assert [row["name"] for row in report["results"]] == [c.name for c in bench.candidates() if c.name in names]
    for row in report["results"]:
        assert set(row) == RESULT_KEYS
        assert row["ms_per_step"] > 0 and row["gb_per_s"] > 0 and row["first_step_s"] > 0
    fused_adamw = report["results"][0]
    assert fused_adamw["vs_adamw_fused"] == 1.0
    assert report["results"][1]["vs_adamw_foreach"] == 1.0
    table = bench.format_table(report)
    assert all(name in table for name in names)


def test_unknown_optimizer_name_is_refused_with_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown or unavailable optimizers \['AdamW turbo'\]; known here: AdamW fused"
    ):
        bench.run_benchmark(num_params=20_000, names=["AdamW turbo"])


def test_the_script_writes_its_report_to_a_new_file_and_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, "scripts/bench_optimizer.py", "--params", "2e4", "--rounds", "1", "--steps", "1",
               "--optimizers", "AdamW foreach", "--out", str(out)]
    written = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS and [row["name"] for row in report["results"]] == ["AdamW foreach"]
    assert "AdamW foreach" in written.stdout  # the table still goes to stdout

    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"error: {out} exists; not overwriting it"]
    assert json.loads(out.read_text()) == report
