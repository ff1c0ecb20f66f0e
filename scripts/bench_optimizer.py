"""Time one optimizer step: torch's AdamW (fused, foreach) against DualAdam and InvAdam's backends.

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_optimizer.py
    python scripts/bench_optimizer.py --params 100e6 --device cuda --json
    python scripts/bench_optimizer.py --shape openpangu-1b --device cuda --out h200_openpangu1b_fp32.json
    python scripts/bench_optimizer.py --params 2e6 --optimizers "AdamW fused" "DualAdam fused, blending"

All optimizers live in one process and are timed round-robin on their own copies of a
transformer-shaped set of tensors (a GPT-like model of --params parameters, or openPangu-Embedded-1B's
own shapes); the median over rounds is reported, with the AdamW-equivalent bandwidth (28 bytes per
float32 parameter, whatever the optimizer's state), the ratios to torch's fused and foreach AdamW, and
each optimizer's first step (for fused backends, the compile time). kozistr's DualAdam is included
when pytorch_optimizer is installed. See dualadam_hf/analysis/bench.py and docs/benchmarks.md.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from dualadam_hf.analysis.bench import SHAPES, candidates, format_table, run_benchmark


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench_optimizer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", choices=SHAPES, default="gpt",
        help="gpt: a GPT-like model of --params parameters (the default); openpangu-1b: openPangu-Embedded-1B's "
        "341 tensors (1.39e9 parameters)",
    )
    parser.add_argument("--params", type=float, help="model size in parameters, gpt shape only (default 30e6)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when a GPU is present, else cpu)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="parameter dtype (default float32)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds over all optimizers; the median is kept")
    parser.add_argument("--steps", type=int, default=5, help="steps per optimizer and round")
    parser.add_argument(
        "--optimizers", nargs="+", metavar="NAME", help="run only these (default: all); names as printed"
    )
    parser.add_argument(
        "--cold-compile",
        action="store_true",
        help="compile into a fresh inductor/Triton cache, so the first step shows a cold compile",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report to FILE (a new file)")
    parser.add_argument("--list", action="store_true", help="list the optimizer names and exit")
    args = parser.parse_args()

    if args.list:
        print("\n".join(c.name for c in candidates()))
        return 0
    if args.params is not None and args.shape != "gpt":
        parser.error(f"--params sizes the gpt shape; {args.shape} has its own size")
    if args.out is not None and args.out.exists():
        print(f"error: {args.out} exists; not overwriting it", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.parent.is_dir():
        print(f"error: {args.out.parent} is not a directory", file=sys.stderr)
        return 2
    if args.cold_compile:
        cache = tempfile.mkdtemp(prefix="bench_optimizer_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    size = {} if args.params is None else dict(num_params=int(args.params))
    report = run_benchmark(
        **size,
        shape=args.shape,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        rounds=args.rounds,
        steps=args.steps,
        names=args.optimizers,
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.out is not None:
        with args.out.open("x", encoding="utf-8") as out:
            out.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
