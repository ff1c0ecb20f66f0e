"""Do Adam, InvAdam and DualAdam escape a sharp minimum? 2-parameter landscapes, as the paper's Fig. 2.

Usage:
    python scripts/landscape_2d.py [--seeds N] [--noise STD] [--steps K] [--out DIR]

Runs N seeded starts inside the sharp basin of each landscape (a two-well function and the
rescaled Eggholder function; see dualadam_hf/analysis/landscape.py) for K steps of each optimizer, with
the same learning rate for all three, and classifies each end point as flat basin, sharp basin or
elsewhere. Writes DIR/results.json (rates, end points, a few trajectories, settings) and
DIR/trajectories.png, and prints the flat and sharp rates.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from dualadam_hf.train.cli import at_least
from dualadam_hf.analysis.landscape import OPTIMIZERS, plot_trajectories, run_landscapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=at_least(1), default=16, help="runs per landscape and optimizer (default: 16)")
    parser.add_argument(
        "--noise", type=at_least(0.0, float), default=0.0, help="std of Gaussian noise added to each gradient component (default: 0)"
    )
    parser.add_argument("--steps", type=at_least(1), default=2000, help="optimizer steps per run (default: 2000)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/landscape"), help="output directory")
    args = parser.parse_args()
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")

    results = run_landscapes(seeds=args.seeds, noise_std=args.noise, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results))
    plot_trajectories(results, args.out / "trajectories.png")

    print(f"flat / sharp rate, {args.seeds} runs, {args.steps} steps, gradient noise std {args.noise}")
    print(f"{'landscape':<12}" + "".join(f"{name:>14}" for name in OPTIMIZERS))
    for landscape, runs in results["landscapes"].items():
        cells = "".join(f"{runs[name]['flat_rate']:>8.2f} / {runs[name]['sharp_rate']:.2f}" for name in OPTIMIZERS)
        print(f"{landscape:<12}{cells}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'trajectories.png'}")


if __name__ == "__main__":
    main()
