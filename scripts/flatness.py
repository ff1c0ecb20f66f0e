"""Hessian flatness of a finished run: top eigenvalue and trace of the training loss at the saved model.

Usage:
    python scripts/flatness.py RUN_DIR [RUN_DIR ...] [--batches 4] [--batch-size 64] [--iters 50] [--samples 100]

RUN_DIR is an output_dir of scripts/train_vision.py or scripts/finetune.py (full fine-tuning). The loss
is measured in eval mode on the first batches*batch_size training examples, the same for every run on
the same data. Writes RUN_DIR/flatness.json and prints one line per run; with several runs, also the mean ± sample
std per parent directory (a sweep's variant: OUT/VARIANT/seedN).
"""

import argparse
import json
import sys
from pathlib import Path

from dualadam_hf.train.cli import at_least
from dualadam_hf.analysis.compare import CompareError
from dualadam_hf.analysis.flatness_run import group_statistics, measure_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--batches", type=at_least(1), default=4, help="number of fixed training batches")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="examples per batch")
    parser.add_argument("--iters", type=at_least(1), default=50, help="power-iteration steps for the top eigenvalue")
    parser.add_argument("--samples", type=at_least(2), default=100, help="Rademacher vectors for the Hutchinson trace")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    args = parser.parse_args()
    results = []
    for run_dir in args.run_dirs:
        try:
            result = measure_run(run_dir, args.batches, args.batch_size, args.iters, args.samples, args.seed)
        except CompareError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        (run_dir / "flatness.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{run_dir}: loss {result['loss']:.4g}, top eigenvalue {result['top_eigenvalue']:.4g}, "
              f"trace {result['trace']:.4g} ± {result['trace_stderr']:.2g}", flush=True)
        results.append((run_dir.resolve().parent.name, result))
    if len(results) > 1:
        for group, stats in group_statistics(results).items():
            print(f"{group}: " + ", ".join(f"{key} {s['mean']:.4g} ± {s['std']:.2g} (n={s['n']})"
                                           for key, s in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
