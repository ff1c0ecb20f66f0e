"""Compare training runs: validation PPL, generalization gap and training-loss plots, and a summary.

Usage:
    python scripts/compare.py RUN_DIR [RUN_DIR ...] --out DIR

Each RUN_DIR is an output_dir of scripts/finetune.py or scripts/train_vision.py (it must hold
trainer_state.json). Writes DIR/ppl.png (or accuracy.png for classifiers), DIR/gen_gap.png,
DIR/train_loss.png, DIR/summary.md and DIR/summary.json, and prints the summary table.
"""

import argparse
import sys
from pathlib import Path

from dualadam_hf.analysis.compare import CompareError, compare, summary_markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run output directories, in the order to report")
    parser.add_argument("--out", type=Path, required=True, help="directory for the plots and summaries")
    args = parser.parse_args()
    try:
        summaries = compare(args.run_dirs, args.out)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_markdown(summaries))
    print(f"plots and summaries in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
