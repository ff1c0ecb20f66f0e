"""Compare runs from their ``trainer_state.json``: plots, summary.md and summary.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualadam_hf.analysis import plots
from dualadam_hf.hf.generation import markdown_cell
from dualadam_hf.train.records import RUN_RECORD, RunRecordError, read_run_record

def json_text(value: Any) -> str:
    """Indented JSON in which a NaN or infinite number is null: JSON has no NaN, and readers choke on it."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(entry) for entry in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False) + "\n"


class CompareError(ValueError):
    """A run directory that cannot be compared; the message names it."""


@dataclass
class Run:
    name: str
    optimizer: str
    history: list[dict[str, Any]]

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(entry["step"], entry[key]) for entry in self.history if key in entry]


def load_run(directory: Path) -> Run:
    state_path = directory / "trainer_state.json"
    if not state_path.is_file():
        raise CompareError(f"{directory}: no trainer_state.json (not a finished run directory?)")
    try:
        history = json.loads(state_path.read_text())["log_history"]
        if not all(isinstance(entry, dict) and "step" in entry for entry in history):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CompareError(f"{state_path}: not a trainer state whose log_history entries have a step") from None
    optimizer = "unknown"  # a run of the stock Trainer has no record
    if (directory / RUN_RECORD).is_file():
        try:
            optimizer = read_run_record(directory).optim
        except RunRecordError as error:
            raise CompareError(str(error)) from None
    return Run(name=directory.name, optimizer=optimizer, history=history)


def _unique_evals(run: Run, key: str) -> list[tuple[int, float]]:
    """Evaluation points by step; the final evaluate() after training repeats the last step's."""
    by_step = dict(run.series(key))
    return sorted(by_step.items())


def summarize_run(run: Run) -> dict[str, Any]:
    ppl = _unique_evals(run, "eval_ppl")
    gap = _unique_evals(run, "eval_gen_gap")
    accuracy = _unique_evals(run, "eval_accuracy")
    train = run.series("loss")
    summary: dict[str, Any] = {"run": run.name, "optimizer": run.optimizer}
    if ppl:
        best_step, best = min(ppl, key=lambda point: point[1] if not math.isnan(point[1]) else math.inf)
        summary.update(final_eval_ppl=ppl[-1][1], best_eval_ppl=best, best_step=best_step)
    else:
        summary.update(final_eval_ppl=None, best_eval_ppl=None, best_step=None)
    if accuracy:
        best_step, best = max(accuracy, key=lambda point: point[1])
        summary.update(final_eval_accuracy=accuracy[-1][1], best_eval_accuracy=best)
        if not ppl:
            summary["best_step"] = best_step
    for key in ("eval_bleu", "eval_rouge_l"):  # the greedy answers' scores, when the run generated
        points = _unique_evals(run, key)
        if points:
            summary[f"final_{key}"] = points[-1][1]
            summary[f"best_{key}"] = max(value for _, value in points)
    summary["final_gen_gap"] = gap[-1][1] if gap else None
    summary["final_train_loss"] = train[-1][1] if train else None
    for key in ("test_accuracy", "test_loss"):  # the held-out test split, measured once at the end
        if run.series(key):
            summary[key] = run.series(key)[-1][1]
    return summary


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def summary_markdown(summaries: list[dict[str, Any]]) -> str:
    columns = list(summaries[0])
    for summary in summaries[1:]:
        columns += [key for key in summary if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for summary in summaries:
        lines.append("| " + " | ".join(_cell(summary.get(key)) for key in columns) + " |")
    return "\n".join(lines) + "\n"


def last_generations(run_dir: Path) -> list[dict[str, Any]]:
    """The samples of a run's last evaluation that generated (``generations/step_<N>.jsonl``, highest N)."""
    files = sorted((run_dir / "generations").glob("step_*.jsonl"), key=lambda path: int(path.stem.split("_")[1]))
    if not files:
        return []
    try:
        return [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError:
        raise CompareError(f"{files[-1]}: not JSON lines") from None


def samples_markdown(runs: list[Run], run_dirs: list[Path], label: dict[str, str]) -> str:
    """For each prompt, its reference and each run's last answer side by side ('' when no run generated)."""
    answers: dict[str, dict[str, str]] = {}
    references: dict[str, str] = {}
    for run, directory in zip(runs, run_dirs):
        for record in last_generations(directory):
            answers.setdefault(record["prompt"], {})[label[run.name]] = record["answer"]
            references[record["prompt"]] = record["reference"]
    if not answers:
        return ""

    lines = ["# Generated answers, side by side", "",
             "Each run's answers from its last evaluation that generated, to the same prompts (greedy decoding).", ""]
    for number, (prompt, by_run) in enumerate(answers.items(), start=1):
        lines += [f"## {number}", "", "```text", prompt.strip(), "```", "",
                  "| | answer |", "|---|---|", f"| **reference** | {markdown_cell(references[prompt])} |"]
        lines += [f"| {name} | {markdown_cell(by_run.get(name, '—'))} |" for name in label.values()]
        lines.append("")
    return "\n".join(lines)


def compare(run_dirs: list[Path], out_dir: Path) -> list[dict[str, Any]]:
    """Load every run first (a bad directory is refused before anything is written), then write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"{out_dir}: exists and is not a directory")
    runs = [load_run(directory) for directory in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):  # a sweep's OUT/VARIANT/seedN: name runs VARIANT/seedN
        for run, directory in zip(runs, run_dirs):
            run.name = f"{directory.resolve().parent.name}/{directory.name}"
    summaries = [summarize_run(run) for run in runs]

    out_dir.mkdir(parents=True, exist_ok=True)
    label = {run.name: f"{run.name} ({run.optimizer})" if run.optimizer not in run.name else run.name for run in runs}
    if any(run.series("eval_ppl") for run in runs):
        plots.plot_metric({label[r.name]: _unique_evals(r, "eval_ppl") for r in runs}, out_dir / "ppl.png",
                          "Validation perplexity", "PPL", log_y=True)
    if any(run.series("eval_accuracy") for run in runs):
        plots.plot_metric({label[r.name]: _unique_evals(r, "eval_accuracy") for r in runs}, out_dir / "accuracy.png",
                          "Validation accuracy", "accuracy")
    plots.plot_metric({label[r.name]: _unique_evals(r, "eval_gen_gap") for r in runs}, out_dir / "gen_gap.png",
                      "Generalization gap (eval_loss - eval_train_loss)", "gap (nats)")
    plots.plot_train_losses({label[r.name]: r.series("loss") for r in runs},
                            {label[r.name]: _unique_evals(r, "eval_train_loss") for r in runs},
                            out_dir / "train_loss.png")
    if any(run.series("eval_rouge_l") for run in runs):
        plots.plot_generation({label[r.name]: _unique_evals(r, "eval_rouge_l") for r in runs},
                              {label[r.name]: _unique_evals(r, "eval_bleu") for r in runs}, out_dir / "generation.png")
    samples = samples_markdown(runs, run_dirs, label)
    if samples:
        (out_dir / "samples.md").write_text(samples, encoding="utf-8")
    (out_dir / "summary.json").write_text(json_text(summaries))
    (out_dir / "summary.md").write_text(summary_markdown(summaries))
    return summaries
