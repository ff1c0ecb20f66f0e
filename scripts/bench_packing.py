"""Non-pad tokens per second of training, padded against packed (padding-free), side by side in one process.

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_packing.py
    python scripts/bench_packing.py --cases tiny --rounds 9 --json

Cases: "tiny" (recipes/tiny_alpaca.yaml's model and data) and "openpangu" (the openPangu-format fixture
with Alpaca-GPT4-CN's length distribution). Each round trains both layouts on the same batches, in a
rotating order; the median round is reported. See dualadam_hf/analysis/packing_bench.py and
docs/benchmarks.md.
"""

import argparse
import json
import sys

from dualadam_hf.analysis.packing_bench import CASES, PACKED_ATTENTIONS, format_table, run_cases


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench_packing.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases (default: both)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per layout and round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is kept (default 5)")
    parser.add_argument(
        "--packed_attention", choices=PACKED_ATTENTIONS, default="packed_sdpa",
        help="how the packed copy keeps examples apart: packed_sdpa (SDPA per example, what packing uses for SDPA; "
        "the default), or sdpa / eager with transformers' block-diagonal mask",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    results = run_cases(args.cases, steps=args.steps, rounds=args.rounds, packed_attention=args.packed_attention)
    print(json.dumps([result.as_dict() for result in results], indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
