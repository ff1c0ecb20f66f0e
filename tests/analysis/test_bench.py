"""The optimizer-step benchmark on a tiny model: it runs and reports what its docstring promises."""

from __future__ import annotations

import pytest
import torch

from dualadam_hf.analysis import bench
from dualadam_hf.optim.fused import unavailable_reason

RESULT_KEYS = {"name", "ms_per_step", "gb_per_s", "vs_adamw_fused", "vs_adamw_foreach", "first_step_s", "compiles"}
REPORT_KEYS = {
    "device",
    "device_name",
    "dtype",
    "num_params",
    "num_tensors",
    "threads",
    "torch",
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


def test_tiny_benchmark_reports_the_documented_keys():
    names = ["AdamW fused", "AdamW foreach", "DualAdam foreach, blending", "DualAdam foreach, after switch"]
    if unavailable_reason(torch.zeros(2)) is None:
        names.append("DualAdam fused, blending")
    report = bench.run_benchmark(num_params=20_000, rounds=2, steps=1, names=names)
    assert set(report) == REPORT_KEYS
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
