"""What the tests of whole tiny-recipe runs share: the recipe, a short run with checkpoints, a dry run, and how to
read what a run left (its one error line, its weights, its files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny_alpaca.yaml"
# 6 optimizer steps, a checkpoint every 2
SHORT = ["--max_steps", "6", "--logging_steps", "1", "--eval_strategy", "no", "--max_train_samples", "32",
         "--max_eval_samples", "8", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
         "--save_steps", "2", "--disable_tqdm", "true", "--optim_args", "switch_ratio=1.0"]


def dry_run_in(tmp_path: Path) -> list[str]:
    """The flags of a dry run into a folder of the test's own, for any recipe: pre-flight refuses an output_dir that
    holds a run, dry run too, and a recipe's own (under outputs/) may hold one the user trained."""
    return ["--dry_run", "true", "--output_dir", str(tmp_path / "run")]


def one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr, progress bars aside (safetensors draws one saving, datasets one reading
    a new file)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()
             if line.strip() and "Writing model shards" not in line
             and not line.rstrip().endswith(("it/s]", "examples/s]"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by its sha256."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}
