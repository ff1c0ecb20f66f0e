"""The 2-parameter landscapes, their basins, the seeded runs, and scripts/landscape_2d.py end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from dualadam_hf.analysis.landscape import (
    OPTIMIZERS,
    classify,
    descend,
    eggholder,
    landscapes,
    local_minima,
    two_well,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
# As documented in dualadam_hf/analysis/landscape.py.
SHARP_MINIMUM = (0.00271, 0.0)
FLAT_MINIMUM = (2.0, 0.0)


def finite_difference_hessian(loss, point: tuple[float, float], h: float = 1e-4) -> torch.Tensor:
    point = torch.tensor(point, dtype=torch.float64)
    steps = h * torch.eye(2, dtype=torch.float64)
    hessian = torch.empty(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            hessian[i, j] = (
                loss(point + steps[i] + steps[j])
                - loss(point + steps[i] - steps[j])
                - loss(point - steps[i] + steps[j])
                + loss(point - steps[i] - steps[j])
            ) / (4 * h * h)
    return hessian


def test_two_well_has_exactly_the_documented_minima():
    minima, top_eigenvalues = local_minima(two_well, landscapes()["two_well"].bounds, grid_points=601)
    order = minima[:, 0].argsort()
    minima, top_eigenvalues = minima[order], top_eigenvalues[order]
    # A grid point can sit on either side of a minimum; keep one copy of each.
    distinct = torch.cat([torch.tensor([True]), (minima[1:] - minima[:-1]).norm(dim=-1) > 1e-6])
    minima = minima[distinct]
    expected = torch.tensor([SHARP_MINIMUM, FLAT_MINIMUM], dtype=torch.float64)
    torch.testing.assert_close(minima, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(two_well(minima), torch.tensor([-1.136, -1.0], dtype=torch.float64), atol=1e-3, rtol=0)


def test_two_well_sharp_minimum_is_much_sharper_than_the_flat_one():
    sharp = torch.linalg.eigvalsh(finite_difference_hessian(two_well, SHARP_MINIMUM))
    flat = torch.linalg.eigvalsh(finite_difference_hessian(two_well, FLAT_MINIMUM))
    assert (sharp > 0).all() and (flat > 0).all()
    assert sharp[-1] == pytest.approx(100.0, rel=0.02)
    assert flat[-1] == pytest.approx(1.0, rel=0.02)
    assert sharp[-1] > 50 * flat[-1]


def test_eggholder_matches_the_textbook_function():
    # The global minimum of the usual Eggholder, f(512, 404.2319) = -959.6407, in rescaled units.
    value = eggholder(torch.tensor([512.0, 404.2319], dtype=torch.float64) / 512) * 5000
    assert value.item() == pytest.approx(-959.6407, abs=1e-3)


def test_eggholder_starts_in_a_minimum_ten_times_sharper_than_every_flat_one():
    landscape = landscapes()["eggholder"]
    torch.testing.assert_close(
        landscape.sharp_minimum * 512, torch.tensor([482.35, 432.88], dtype=torch.float64), atol=0.01, rtol=0
    )
    hessian = torch.func.hessian(eggholder)
    sharp = torch.linalg.eigvalsh(hessian(landscape.sharp_minimum))[-1]
    flat = torch.linalg.eigvalsh(torch.func.vmap(hessian)(landscape.flat_minima))[:, -1]
    assert len(landscape.flat_minima) > 10
    assert (flat <= sharp / 10).all()


@pytest.mark.parametrize("name", ["two_well", "eggholder"])
def test_classify(name):
    landscape = landscapes()[name]
    sharp, flat = landscape.sharp_minimum, landscape.flat_minima[0]
    far = torch.tensor([100.0, 100.0], dtype=torch.float64)
    nan = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    inside = 0.9 * torch.tensor([0.6, 0.8], dtype=torch.float64)  # 0.9 radii away
    outside = 1.1 * torch.tensor([0.6, 0.8], dtype=torch.float64)
    points = torch.stack(
        [
            sharp,
            sharp + inside * landscape.sharp_radius,
            flat,
            flat - inside * landscape.flat_radius,
            sharp + outside * landscape.sharp_radius,
            far,
            nan,
        ]
    )
    assert classify(landscape, points) == ["sharp", "sharp", "flat", "flat", "elsewhere", "elsewhere", "elsewhere"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_runs_are_seeded_one_by_one(optimizer):
    landscape = landscapes()["two_well"]
    three = descend(landscape, optimizer, seeds=3, steps=50, noise_std=1.0, switch_rate=0.02)
    two = descend(landscape, optimizer, seeds=2, steps=50, noise_std=1.0, switch_rate=0.02)
    torch.testing.assert_close(two, three[:, :2], atol=0, rtol=0)
    assert (three[0] - landscape.sharp_minimum).norm(dim=-1).max() <= landscape.start_radius


def test_all_optimizers_share_starts():
    landscape = landscapes()["eggholder"]
    starts = [descend(landscape, optimizer, 4, 1, 0.0, 0.5)[0] for optimizer in OPTIMIZERS]
    for other in starts[1:]:
        torch.testing.assert_close(other, starts[0], atol=0, rtol=0)


def test_noisy_invadam_leaves_the_sharp_well_and_adam_does_not():
    # With gradient noise std 8, sqrt(v_hat) >= 8 and InvAdam's effective step lr * 8 = 0.08 times
    # the sharp curvature 100 is 8, past heavy-ball stability (2 * (1 + beta1) = 3.8); Adam's
    # effective step shrinks instead, to lr / 8.
    landscape = landscapes()["two_well"]
    invadam = classify(landscape, descend(landscape, "invadam", 8, 300, 8.0, 0.0)[-1])
    adam = classify(landscape, descend(landscape, "adam", 8, 300, 8.0, 0.0)[-1])
    assert "sharp" not in invadam
    assert adam == ["sharp"] * 8


def test_script_writes_results_and_plot(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "landscape_2d.py"), "--seeds", "2", "--steps", "20"]
        + ["--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"landscapes", "settings"}
    assert set(results["landscapes"]) == {"two_well", "eggholder"}
    for runs in results["landscapes"].values():
        assert set(runs) == set(OPTIMIZERS)
        for run in runs.values():
            assert 0.0 <= run["flat_rate"] <= 1.0
            assert 0.0 <= run["sharp_rate"] <= 1.0 - run["flat_rate"]
            assert isinstance(run["final_loss_mean"], float)
            assert len(run["end_points"]) == 2 and len(run["end_points"][0]) == 2
    assert results["settings"]["seeds"] == 2 and results["settings"]["steps"] == 20
    assert (tmp_path / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "two_well" in completed.stdout and "eggholder" in completed.stdout
