"""Escaping a sharp minimum on 2-parameter landscapes (arXiv 2603.07122, section IV-A, Fig. 2).

Every run starts inside a sharp basin; Adam, InvAdam and DualAdam then take the same number of
steps with the same learning rate, and each end point is classified as in the flat basin, in the
sharp basin, or elsewhere. This is a measurement, not a demonstration: the numbers are reported
as they come out.

Scale matters more here than usual. Adam's step is about ``lr`` whatever the gradient, while
InvAdam's, m_hat * sqrt(v_hat), grows like the gradient squared, so the same lr can be timid for
one and violent for the other. Both landscapes are therefore expressed in units where typical
gradients are of order 1, the scale at which the two updates coincide; the learning rate is about
a tenth of the sharp basin's half-width, so that Adam cannot leave it by step length alone.

What to expect, from the update rules: near a minimum of curvature h the effective step size is
lr / sqrt(v_hat) for Adam and lr * sqrt(v_hat) for InvAdam, and the minimum stops being stable once
that times h exceeds about 2 (1 + beta1) = 3.8 (heavy ball). Without gradient noise InvAdam's
sqrt(v_hat) shrinks with the gradient as it settles, so it can stay in a sharp minimum; gradient
noise of std s keeps sqrt(v_hat) >= s, which makes a sharp minimum unstable for InvAdam and more
stable for Adam. This is the paper's diffusion argument in miniature, so both noiseless and noisy
runs are worth measuring.

Landscapes (coordinates ``p = (x, y)``):

* ``two_well``: ``-exp(-|p - (0, 0)|^2 / (2 * 0.1^2)) - exp(-|p - (2, 0)|^2 / (2 * 1^2))``.
  A sharp well (top Hessian eigenvalue about 100) and a flat one (about 1) of equal height; the
  flat well's tail pulls the sharp minimum to (0.00271, 0) and deepens it to -1.136, so the sharp
  minimum is the slightly deeper one (the flat minimum is (2, 0) at -1.000). A basin is the convex
  core of its Gaussian: within one width of the centre (0.1 for sharp, 1 for flat).
  lr = 0.01.
* ``eggholder``: the Eggholder function as in the paper,
  ``f(x, y) = -(y + 47) sin(sqrt|x/2 + y + 47|) - x sin(sqrt|x - y - 47|)`` on its usual domain
  [-512, 512]^2, rescaled to ``p = (x, y) / 512`` in [-1, 1]^2 and loss ``f / 5000`` (the median
  gradient norm over the domain is then about 1). Runs start in the deepest interior minimum,
  (482.35, 432.88) in the original units, a pocket beside the ridge along x = y + 47 (top Hessian
  eigenvalue 97 there; the domain's median minimum has 1.3). "Sharp" is within 10 original units of
  it (its twin pocket across the ridge included); "flat" is within 10 units of any interior local
  minimum at least ``FLAT_RATIO`` times flatter (top Hessian eigenvalue); the nearest, (439.5, 454.0)
  with top eigenvalue 3.6, is 47 units away, and neighbouring minima are typically 40 apart. The
  function is not clipped to its domain: the valley of the start runs out of it (towards the
  boundary minimum at (512, 404.2) and beyond), and runs that follow it end "elsewhere".
  lr = 4e-4 (0.2 original units).

Every run takes ``steps`` steps (2000 by default); DualAdam's alpha_t reaches 0 half-way through.
Runs are seeded one by one: run ``k`` draws its start (uniform in a disc around the sharp minimum)
and its gradient noise from ``torch.Generator().manual_seed(k)``, so every optimizer sees the same
starts and the same noise, and run ``k`` is the same whatever the number of runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dualadam_hf.optim.dualadam import DualAdam, InvAdam

__all__ = [
    "FLAT_RATIO",
    "OPTIMIZERS",
    "SWITCH_FRACTION",
    "Landscape",
    "classify",
    "descend",
    "eggholder",
    "landscapes",
    "local_minima",
    "plot_trajectories",
    "run_landscapes",
    "two_well",
]

OPTIMIZERS = ("adam", "invadam", "dualadam")
# A minimum counts as flat when its top Hessian eigenvalue is at most the sharp one's / FLAT_RATIO.
FLAT_RATIO = 10.0
# Fraction of the run that DualAdam spends switching: alpha_t reaches 0 here and the rest is Adam,
# the paper's recipe (InvAdam to explore, Adam to converge) squeezed into one short run.
SWITCH_FRACTION = 0.5

_EGGHOLDER_HALF_WIDTH = 512.0
_EGGHOLDER_LOSS_SCALE = 5000.0
_EGGHOLDER_SHARP_MINIMUM = (482.35 / _EGGHOLDER_HALF_WIDTH, 432.88 / _EGGHOLDER_HALF_WIDTH)
_EGGHOLDER_BASIN_RADIUS = 10.0 / _EGGHOLDER_HALF_WIDTH


def _gaussian(p: Tensor, center: tuple[float, float], width: float) -> Tensor:
    squared_distance = ((p - p.new_tensor(center)) ** 2).sum(-1)
    return torch.exp(-squared_distance / (2 * width**2))


def two_well(p: Tensor) -> Tensor:
    """The two-well landscape at points ``p`` of shape (..., 2); see the module docstring."""
    return -_gaussian(p, (0.0, 0.0), 0.1) - _gaussian(p, (2.0, 0.0), 1.0)


def eggholder(p: Tensor) -> Tensor:
    """The rescaled Eggholder function at points ``p`` of shape (..., 2); see the module docstring."""
    x, y = (_EGGHOLDER_HALF_WIDTH * p).unbind(-1)
    f = -(y + 47) * torch.sin(torch.sqrt(torch.abs(x / 2 + y + 47))) - x * torch.sin(torch.sqrt(torch.abs(x - y - 47)))
    return f / _EGGHOLDER_LOSS_SCALE


@dataclass(frozen=True)
class Landscape:
    """A loss on the plane, where runs start, and the basins an end point is classified into."""

    name: str
    loss: Callable[[Tensor], Tensor]
    bounds: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max of the plots
    lr: float
    start_radius: float  # starts are uniform in this disc around the sharp minimum
    sharp_minimum: Tensor  # (2,); two_well uses its Gaussian's centre, 0.003 from the true minimum
    sharp_radius: float
    flat_minima: Tensor  # (K, 2)
    flat_radius: float


def local_minima(
    loss: Callable[[Tensor], Tensor], bounds: tuple[float, float, float, float], grid_points: int = 1025
) -> tuple[Tensor, Tensor]:
    """Local minima of ``loss`` inside ``bounds`` and the top Hessian eigenvalue at each.

    Candidates are the grid points no higher than their eight neighbours; Newton's method polishes
    them, and only those that end inside ``bounds`` with a vanishing gradient and a positive
    definite Hessian are kept (Eggholder's ridges are not differentiable, so some candidates fail).
    The same minimum may appear more than once.
    """
    x_min, x_max, y_min, y_max = bounds
    xs = torch.linspace(x_min, x_max, grid_points, dtype=torch.float64)
    ys = torch.linspace(y_min, y_max, grid_points, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    values = loss(grid)
    neighbourhood_min = -torch.nn.functional.max_pool2d(-values[None], 3, stride=1, padding=1)[0]
    points = grid[values <= neighbourhood_min]

    gradient = torch.func.vmap(torch.func.grad(loss))
    hessian = torch.func.vmap(torch.func.hessian(loss))
    for _ in range(50):
        step, _ = torch.linalg.solve_ex(hessian(points), gradient(points))
        points = points - step
    eigenvalues = torch.linalg.eigvalsh(hessian(points))
    inside = (points[:, 0] >= x_min) & (points[:, 0] <= x_max) & (points[:, 1] >= y_min) & (points[:, 1] <= y_max)
    # Far below the order-1 gradients of these landscapes, far above float64 round-off.
    stationary = gradient(points).norm(dim=-1) < 1e-8
    keep = inside & stationary & (eigenvalues[:, 0] > 0)
    return points[keep], eigenvalues[keep, 1]


@functools.cache
def landscapes() -> dict[str, Landscape]:
    """The two landscapes by name (built once: Eggholder's flat minima come from a grid search)."""
    eggholder_bounds = (-1.0, 1.0, -1.0, 1.0)
    minima, top_eigenvalues = local_minima(eggholder, eggholder_bounds)
    sharp = (minima - minima.new_tensor(_EGGHOLDER_SHARP_MINIMUM)).norm(dim=-1).argmin()
    flat = top_eigenvalues <= top_eigenvalues[sharp] / FLAT_RATIO
    return {
        "two_well": Landscape(
            name="two_well",
            loss=two_well,
            bounds=(-1.5, 4.5, -3.0, 3.0),
            lr=0.01,
            start_radius=0.05,
            sharp_minimum=torch.tensor([0.0, 0.0], dtype=torch.float64),
            sharp_radius=0.1,
            flat_minima=torch.tensor([[2.0, 0.0]], dtype=torch.float64),
            flat_radius=1.0,
        ),
        "eggholder": Landscape(
            name="eggholder",
            loss=eggholder,
            bounds=eggholder_bounds,
            lr=4e-4,
            start_radius=2.0 / _EGGHOLDER_HALF_WIDTH,
            sharp_minimum=minima[sharp],
            sharp_radius=_EGGHOLDER_BASIN_RADIUS,
            flat_minima=minima[flat],
            flat_radius=_EGGHOLDER_BASIN_RADIUS,
        ),
    }


def classify(landscape: Landscape, points: Tensor) -> list[str]:
    """``"flat"``, ``"sharp"`` or ``"elsewhere"`` for each of ``points`` (N, 2); NaN is elsewhere."""
    in_sharp = (points - landscape.sharp_minimum).norm(dim=-1) < landscape.sharp_radius
    flat_distance = torch.cdist(points, landscape.flat_minima).min(dim=-1).values
    in_flat = flat_distance < landscape.flat_radius
    labels = []
    for sharp, flat in zip(in_sharp.tolist(), in_flat.tolist()):
        labels.append("sharp" if sharp else "flat" if flat else "elsewhere")
    return labels


def _make_optimizer(name: str, params: list[Tensor], lr: float, switch_rate: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "invadam":
        return InvAdam(params, lr=lr)
    if name == "dualadam":
        return DualAdam(params, lr=lr, switch_rate=switch_rate)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def _starts_and_noise(landscape: Landscape, seeds: int, steps: int, noise_std: float) -> tuple[Tensor, Tensor]:
    starts, noise = [], []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        uniform = torch.rand(2, generator=generator, dtype=torch.float64)
        # sqrt makes the start uniform over the disc rather than crowded at its centre.
        radius, angle = landscape.start_radius * uniform[0].sqrt(), 2 * math.pi * uniform[1]
        offset = radius * torch.stack([angle.cos(), angle.sin()])
        starts.append(landscape.sharp_minimum + offset)
        noise.append(noise_std * torch.randn(steps, 2, generator=generator, dtype=torch.float64))
    return torch.stack(starts), torch.stack(noise, dim=1)


def descend(
    landscape: Landscape, optimizer: str, seeds: int, steps: int, noise_std: float, switch_rate: float
) -> Tensor:
    """Positions (steps + 1, seeds, 2) of ``seeds`` runs of ``optimizer`` on ``landscape``.

    Gaussian noise of standard deviation ``noise_std`` is added to every gradient component.
    """
    starts, noise = _starts_and_noise(landscape, seeds, steps, noise_std)
    # One (seeds, 2) parameter holds all runs: the three optimizers are element-wise, so its rows
    # evolve exactly as separate 2-parameter runs would, and the loop runs once instead of per seed.
    position = starts.clone().requires_grad_(True)
    opt = _make_optimizer(optimizer, [position], landscape.lr, switch_rate)
    path = [starts]
    for step in range(steps):
        (gradient,) = torch.autograd.grad(landscape.loss(position).sum(), position)
        position.grad = gradient + noise[step]
        opt.step()
        path.append(position.detach().clone())
    return torch.stack(path)


def run_landscapes(
    seeds: int = 16,
    noise_std: float = 0.0,
    steps: int = 2000,
    switch_rate: float | None = None,
    plotted_runs: int = 3,
    plotted_points: int = 200,
) -> dict:
    """Run every optimizer on every landscape and classify the end points.

    Args:
        seeds: number of runs per landscape and optimizer (run ``k`` uses seed ``k``).
        noise_std: standard deviation of the Gaussian noise added to each gradient component.
        steps: optimizer steps per run.
        switch_rate: DualAdam's xi; None puts alpha_t = 0 at ``SWITCH_FRACTION`` of the run.
        plotted_runs: runs per optimizer whose trajectories are kept for :func:`plot_trajectories`.
        plotted_points: at most this many positions (plus the end point) kept per trajectory.

    Returns:
        ``{"landscapes": {name: {optimizer: {"flat_rate", "sharp_rate", "final_loss_mean",
        "end_points", "labels", "trajectories"}}}, "settings": {...}}``, JSON-serialisable.
    """
    if switch_rate is None:
        switch_rate = 1.0 / (SWITCH_FRACTION * steps)
    stride = max(1, steps // plotted_points)
    results: dict = {"landscapes": {}}
    for name, landscape in landscapes().items():
        per_optimizer = {}
        for optimizer in OPTIMIZERS:
            path = descend(landscape, optimizer, seeds, steps, noise_std, switch_rate)
            end = path[-1]
            labels = classify(landscape, end)
            kept = torch.cat([path[:-1:stride], path[-1:]])[:, :plotted_runs]
            per_optimizer[optimizer] = {
                "flat_rate": labels.count("flat") / seeds,
                "sharp_rate": labels.count("sharp") / seeds,
                "final_loss_mean": landscape.loss(end).mean().item(),
                "end_points": end.tolist(),
                "labels": labels,
                "trajectories": kept.transpose(0, 1).tolist(),
            }
        results["landscapes"][name] = per_optimizer
    results["settings"] = {
        "seeds": seeds,
        "noise_std": noise_std,
        "steps": steps,
        "switch_rate": switch_rate,
        "betas": [0.9, 0.999],
        "flat_ratio": FLAT_RATIO,
        "landscapes": {
            name: {
                "lr": landscape.lr,
                "start_radius": landscape.start_radius,
                "sharp_minimum": landscape.sharp_minimum.tolist(),
                "sharp_radius": landscape.sharp_radius,
                "flat_minima": landscape.flat_minima.tolist(),
                "flat_radius": landscape.flat_radius,
            }
            for name, landscape in landscapes().items()
        },
    }
    return results


def plot_trajectories(results: dict, path: str) -> None:
    """Write a PNG of the kept trajectories in ``results`` (from :func:`run_landscapes`, or its JSON).

    One row per landscape, one column per optimizer, drawn as the paper's Fig. 2: contours of the
    loss, red stars at the starts, black circles at the end points of every run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["landscapes"])
    figure, axes = plt.subplots(
        len(names), len(OPTIMIZERS), figsize=(4 * len(OPTIMIZERS), 4 * len(names)), squeeze=False
    )
    for row, name in zip(axes, names):
        landscape = landscapes()[name]
        x_min, x_max, y_min, y_max = landscape.bounds
        xs = torch.linspace(x_min, x_max, 300, dtype=torch.float64)
        ys = torch.linspace(y_min, y_max, 300, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        values = landscape.loss(grid)
        for axis, optimizer in zip(row, OPTIMIZERS):
            run = results["landscapes"][name][optimizer]
            axis.contourf(xs, ys, values, levels=40, cmap="viridis")
            for trajectory in run["trajectories"]:
                trajectory = torch.tensor(trajectory)
                axis.plot(trajectory[:, 0], trajectory[:, 1], color="white", linewidth=0.8)
                axis.plot(trajectory[0, 0], trajectory[0, 1], "r*", markersize=12)
            end = torch.tensor(run["end_points"])
            axis.plot(end[:, 0], end[:, 1], "o", color="black", markersize=5)
            axis.set_xlim(x_min, x_max)
            axis.set_ylim(y_min, y_max)
            title = f"{name}, {optimizer}: flat {run['flat_rate']:.0%}, sharp {run['sharp_rate']:.0%}"
            axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
