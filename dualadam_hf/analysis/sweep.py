"""Run a recipe over seeds and optimizer variants, then collect the summaries (mean ± std per variant).

Each run is a subprocess of a training script (scripts/finetune.py or scripts/train_vision.py) with
``--seed N --output_dir OUT/VARIANT/seedN`` and the variant's flags; a run whose directory already holds
run_config.json (written last, after the final evaluations) is kept, so an interrupted sweep continues
where it stopped.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualadam_hf.analysis.compare import compare, json_text, summary_markdown
from dualadam_hf.train.records import RUN_RECORD

@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """``"adamw=--optim adamw_torch --weight_decay 0.01"`` -> Variant("adamw", (...)); ``"dualadam="`` keeps the recipe."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"variant {text!r} is not of the form NAME=FLAGS")
    return Variant(name.strip(), tuple(shlex.split(flags)))


def check_unique(values: list, what: str) -> None:
    """A repeated variant or seed would reuse one run and count it twice in the aggregate."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} given more than once: {', '.join(repeated)}")


def run_directory(out_dir: Path, variant: Variant, seed: int) -> Path:
    return out_dir / variant.name / f"seed{seed}"


def run_one(script: Path, recipe: Path, variant: Variant, seed: int, out_dir: Path, extra: list[str]) -> Path:
    directory = run_directory(out_dir, variant, seed)
    if (directory / RUN_RECORD).is_file():
        print(f"[sweep] {variant.name} seed {seed}: done already, kept", flush=True)
        return directory
    # an unfinished run's folder is started again from scratch (overwrite_output_dir)
    command = [sys.executable, str(script), str(recipe), *extra, *variant.flags, "--overwrite_output_dir", "true",
               "--seed", str(seed), "--output_dir", str(directory)]
    print(f"[sweep] {variant.name} seed {seed}: {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return directory


def aggregate(summaries: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {metric: {"mean", "std" (sample, n-1), "n"}}} over the numeric entries of its runs."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for variant in variants:
        runs = [s for s in summaries if s["variant"] == variant]
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and k not in ("seed",)]
        table[variant] = {}
        for key in keys:
            table[variant][key] = mean_std([r[key] for r in runs if isinstance(r.get(key), (int, float))])
    return table


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1; 0 for one value) and n."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate_markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
    metrics: list[str] = []
    for stats in table.values():
        metrics += [m for m in stats if m not in metrics]
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for variant, stats in table.items():
        cells = [
            f"{stats[m]['mean']:.4g} ± {stats[m]['std']:.2g} (n={stats[m]['n']})" if m in stats else "—"
            for m in metrics
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(
    script: Path, recipe: Path, variants: list[Variant], seeds: list[int], out_dir: Path, extra: list[str]
) -> dict[str, Any]:
    check_unique([v.name for v in variants], "variant name")
    check_unique(seeds, "seed")
    runs = []
    for seed in seeds:  # seeds outermost: a partial sweep still has every variant for the first seeds
        for variant in variants:
            runs.append((variant, seed, run_one(script, recipe, variant, seed, out_dir, extra)))
    summaries = compare([directory for _, _, directory in runs], out_dir)
    for summary, (variant, seed, _) in zip(summaries, runs):
        summary.update(variant=variant.name, seed=seed)
    table = aggregate(summaries, [v.name for v in variants])
    (out_dir / "summary.json").write_text(json_text(summaries))
    (out_dir / "summary.md").write_text(summary_markdown(summaries))
    (out_dir / "aggregate.json").write_text(json_text(table))
    (out_dir / "aggregate.md").write_text(aggregate_markdown(table))
    return {"runs": summaries, "aggregate": table}
