"""Curves of several runs on one figure each: validation PPL, accuracy, generalization gap, training loss."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

Series = list[tuple[int, float]]


def _figure(title: str, ylabel: str, log_y: bool = False):
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    if log_y:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    return figure, axes


def _save(figure, axes, path: Path) -> Path:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


LINE_STYLES = ("-", "--", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))


def _variant(name: str) -> str:
    """"dualadam" of a sweep's run "dualadam/seed0 ..."; a name without "/" is its own variant."""
    return name.split("/", 1)[0]


def line_styles(names: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (color, line style). Runs named "VARIANT/..." (a sweep's) share their variant's color and
    differ by line style, so that twelve runs of four variants read as four colors; others get a color each."""
    colors: dict[str, str] = {}
    seen: dict[str, int] = {}
    styles = {}
    for name in names:
        group = _variant(name)
        colors.setdefault(group, f"C{len(colors) % 10}")
        styles[name] = (colors[group], LINE_STYLES[seen.get(group, 0) % len(LINE_STYLES)])
        seen[group] = seen.get(group, 0) + 1
    return styles


def legend_labels(names: list[str]) -> dict[str, str]:
    """name -> legend label. When some variant has several runs ("VARIANT/seedN ..."), the legend names each
    variant once (its first run's label without the "/seedN" part) and the other runs stay out of it."""
    groups = [_variant(name) for name in names if "/" in name]
    if len(groups) == len(set(groups)):
        return {name: name for name in names}
    labels, seen = {}, set()
    for name in names:
        group = _variant(name)
        labels[name] = "_nolegend_" if group in seen else re.sub(r"/\S*", "", name, count=1)
        seen.add(group)
    return labels


def plot_metric(runs: dict[str, Series], path: Path, title: str, ylabel: str, log_y: bool = False) -> Path:
    """One line per run: (step, value) points."""
    figure, axes = _figure(title, ylabel, log_y)
    styles = line_styles(list(runs))
    labels = legend_labels(list(runs))
    for name, points in runs.items():
        if points:
            steps, values = zip(*points)
            color, style = styles[name]
            axes.plot(steps, values, marker="o", markersize=3, color=color, linestyle=style, label=labels[name])
    if labels != {name: name for name in runs}:
        axes.text(0.99, 0.01, "one line style per seed", transform=axes.transAxes, ha="right", va="bottom",
                  fontsize="x-small", color="0.4")
    return _save(figure, axes, path)


def _two_lines_per_run(axes, series: list[tuple[dict[str, Series], str, dict]]) -> None:
    """Per run, one line for each (series by run, what it is, line style) in one colour, labelled "run: what"."""
    runs = list(series[0][0])
    styles = line_styles(runs)
    labels = legend_labels(runs)
    for name in runs:
        color, label = styles[name][0], labels[name]
        shown = label != "_nolegend_"
        for by_run, what, style in series:
            if by_run.get(name):
                axes.plot(*zip(*by_run[name]), color=color, label=f"{label}: {what}" if shown else label, **style)


def plot_train_losses(train: dict[str, Series], eval_train: dict[str, Series], path: Path) -> Path:
    """The logged (running, train-mode) training loss and the eval-mode loss on the fixed training subset."""
    figure, axes = _figure("Training loss", "loss (nats per token)")
    _two_lines_per_run(axes, [
        (train, "logged train loss", dict(alpha=0.6)),
        (eval_train, "eval-mode loss on training subset", dict(linestyle="--", marker="o", markersize=3)),
    ])
    return _save(figure, axes, path)


def plot_generation(rouge_l: dict[str, Series], bleu: dict[str, Series], path: Path) -> Path:
    """The scores of the greedy answers at each evaluation: ROUGE-L F1 solid, BLEU-4 dashed."""
    figure, axes = _figure("Generated answers against the references", "score (0 to 1)")
    _two_lines_per_run(axes, [
        (rouge_l, "ROUGE-L", dict(marker="o", markersize=3)),
        (bleu, "BLEU-4", dict(linestyle="--", marker="o", markersize=3)),
    ])
    return _save(figure, axes, path)
