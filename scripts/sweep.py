"""Run a recipe over seeds and optimizer variants, then compare and aggregate (mean ± std per variant).

Usage:
    python scripts/sweep.py RECIPE.yaml --seeds 0 1 2 --variant "dualadam=" \
        --variant "adamw=--optim adamw_torch" --out outputs/sweeps/NAME [--script scripts/finetune.py] \
        [--extra "--max_steps 100"]

Runs land in OUT/VARIANT/seedN (kept if already finished); OUT gets the plots of scripts/compare.py,
summary.{md,json} (one row per run) and aggregate.{md,json} (mean, sample std and n per variant).
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from dualadam_hf.analysis.sweep import aggregate_markdown, check_unique, parse_variant, run_sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="the recipe every run starts from")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds (model init, data order)")
    parser.add_argument("--variant", action="append", required=True, dest="variants",
                        help="NAME=FLAGS, e.g. 'adamw=--optim adamw_torch'; repeat for each variant")
    parser.add_argument("--out", type=Path, required=True, help="directory of the sweep")
    parser.add_argument("--script", type=Path, default=Path("scripts/finetune.py"), help="training script to run")
    parser.add_argument("--extra", default="", help="flags given to every run, e.g. '--max_steps 100'")
    args = parser.parse_args()
    try:
        variants = [parse_variant(text) for text in args.variants]
        extra = shlex.split(args.extra)
        check_unique([v.name for v in variants], "variant name")
        check_unique(args.seeds, "seed")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in (args.recipe, args.script):
        if not path.is_file():
            print(f"error: not found: {path}", file=sys.stderr)
            return 2
    try:
        result = run_sweep(args.script, args.recipe, variants, args.seeds, args.out, extra)
    except subprocess.CalledProcessError as error:
        print(f"error: a run failed (exit {error.returncode}): {shlex.join(error.cmd)}", file=sys.stderr)
        return 1
    print(aggregate_markdown(result["aggregate"]))
    print(f"runs, plots and summaries in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
