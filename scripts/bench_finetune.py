"""Where a fine-tuning run's time goes, phase by phase, for several optimizers side by side.

Usage:
    python scripts/bench_finetune.py --shape tiny --steps 3 --optim dualadam adamw_torch_fused
    python scripts/bench_finetune.py --shape 1b --steps 10 --json --out h200_finetune_1b.json
    python scripts/bench_finetune.py --shape 1b --optim dualadam --packing on -- --use_peft true
    python scripts/bench_finetune.py --shape 1b --optim dualadam --packing off --workdir NEW --reuse EARLIER

Writes, offline, a checkpoint in openPangu-Embedded's published layout (tiny: the fixture's sizes, for a
CPU; 1b: openPangu-Embedded-1B's published sizes, 1.39B random bf16 weights, 2.8 GB) and a JSON array of
Alpaca-schema records with Alpaca-GPT4-CN's token lengths; then each optimizer runs its own recipe
(recipes/pangu_alpaca*.yaml) through scripts/finetune.py's path for --steps optimizer steps, with packing
on and/or off, each run in a fresh process. Per run: imports, model load, data preparation, trainer setup,
first step (warm-up), seconds per optimizer step (median of steps 2..N, and the slowest), non-pad
tokens/s, MFU, optimizer.step's share of a step, the final evaluation with and without its generation,
the final save, the evaluations and checkpoints the run did in all, peak GPU memory. A run saves no
checkpoint while training (--save_strategy no: at --max_steps transformers would save one, ~17 GB at 1b,
that the recipe's run saves once at its end); "-- --save_strategy steps" brings it back.

--reuse DIR takes the checkpoint and the data, read-only, from DIR, the --workdir of an earlier benchmark,
instead of writing them (the runs' files still go to --workdir); the report's reused_from names DIR, and
write_checkpoint_seconds and write_data_seconds read 0. It is refused unless DIR holds a checkpoint of the
same --shape, whole (the earlier benchmark got past writing it), and data of the same --train-records and
--eval-records.

MFU = 6 x parameters (without the input embedding) x non-pad tokens/s / peak; attention's score and value
products and the recomputed forward of activation checkpointing are not counted. Peak: --peak-tflops, or
the card's dense bf16 TFLOPS (no sparsity) from a table (H100 SXM / H200 989, A100 312, H100 PCIe 756,
H100 / H200 NVL 835); on a CPU, none.

Flags after "--" go to every run's finetune.py command line, after the benchmark's own (they win), e.g.
"-- --generation_eval_samples 0" or "-- --attn_implementation eager". Each run gets the files written or
reused (--model_name_or_path, --dataset_name), --validation_fraction (holding out --eval-records),
--max_steps, --packing, --save_strategy no, --report_to none, --disable_tqdm true, its own --output_dir
(deleted after the run), --bf16 false without a GPU, and HF_HUB_OFFLINE=1; a flag finetune.py refuses
stops the benchmark before any run. The table goes to stdout (--json: the JSON report), to stderr a line
saying whether the checkpoint and the data were written or reused and one progress line per run; --out is
written before the first run and again after each (planned_runs names them all), so a benchmark stopped
midway leaves the runs it finished; SIGTERM stops the benchmark and kills the run in progress at once (on
its own, a run would finish its optimizer step and save a checkpoint, as preemption does). Exit status: 0
when every run finished, 1 when one failed (its error line is in the report), 2 for bad arguments, 143
when stopped by SIGTERM.
See dualadam_hf/analysis/finetune_bench.py.
"""

import argparse
import contextlib
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from dualadam_hf.analysis.finetune_bench import (
    EVAL_RECORDS, PACKINGS, RECIPES, SHAPES, TRAIN_RECORDS, BenchError, format_table, run_benchmark,
)
from dualadam_hf.train.cli import at_least

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage too
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = OneLineParser(
        prog="bench_finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="tiny: the fixture's sizes, for a CPU (the default); 1b: openPangu-Embedded-1B's")
    parser.add_argument("--steps", type=at_least(2, int), default=10,
                        help="optimizer steps per run, at least 2: the first is the warm-up (default 10)")
    recipes = ", ".join(f"{optim} ({recipe})" for optim, recipe in RECIPES.items())
    parser.add_argument("--optim", nargs="+", choices=list(RECIPES), default=list(RECIPES), metavar="NAME",
                        help=f"optimizers, each run with its recipe: {recipes} (default: all four)")
    parser.add_argument("--packing", choices=list(PACKINGS), default="both",
                        help="padding-free batches on, off, or both, one run each (default both)")
    parser.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                        help="the card's dense bf16 peak, for the MFU (default: from the table above)")
    parser.add_argument("--train-records", type=at_least(1, int), default=TRAIN_RECORDS, metavar="N",
                        help=f"training records written (default {TRAIN_RECORDS}: 32 steps of 32 sequences an epoch)")
    parser.add_argument("--eval-records", type=at_least(1, int), default=EVAL_RECORDS, metavar="N",
                        help=f"validation records written (default {EVAL_RECORDS}: the recipes' 2 %% of "
                        "Alpaca-GPT4-CN)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="also write the JSON report to FILE (a new file), updated after each run")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep the checkpoint, the data and each run's log in DIR (new or empty; default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--reuse", type=Path, metavar="DIR",
                        help="take the checkpoint and the data, read-only, from DIR, the --workdir of an earlier "
                        "benchmark of the same --shape, --train-records and --eval-records, instead of writing them")
    args = parser.parse_args(own)

    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        parser.error(f"argument --peak-tflops: must be a positive number, got {args.peak_tflops}")
    if args.out is not None and args.out.exists():
        parser.error(f"{args.out} exists; not overwriting it")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"{args.out.parent} is not a directory (--out)")
    kept = args.workdir
    if kept is not None and kept.exists() and (not kept.is_dir() or any(kept.iterdir())):
        parser.error(f"{kept} exists and is not an empty folder (--workdir)")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def write_report(report: dict) -> None:
        if args.out is not None:  # whole or not at all: a stop mid-write leaves the previous version
            partial = args.out.with_name(f".{args.out.name}.partial")
            partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            partial.replace(args.out)

    def stop(signum: int, frame: Any) -> None:
        # an exception, so that subprocess.run kills the run in progress (SIGKILL: a run's own SIGTERM handling
        # would finish the step and save a checkpoint) and the temporary folder is removed
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with contextlib.nullcontext(kept) if kept else tempfile.TemporaryDirectory(prefix="bench_finetune.") as folder:
            workdir = Path(folder)
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                report = run_benchmark(
                    shape=args.shape, steps=args.steps, optims=args.optim, packings=PACKINGS[args.packing],
                    recipes=RECIPES_DIR, workdir=workdir, peak_tflops=args.peak_tflops,
                    train_records=args.train_records, eval_records=args.eval_records, extra=extra,
                    reuse=args.reuse, progress=progress, on_report=write_report,
                )
            except BenchError as error:
                parser.error(str(error))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if all(run["status"] == "ok" for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
