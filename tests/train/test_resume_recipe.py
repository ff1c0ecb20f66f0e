"""A resume continues its checkpoint's recipe: every change is refused in one line, naming it, unless
``resume_accept_changes`` names it; an accepted change is applied from the resumed step and recorded
(tiny recipe, CPU)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dualadam_hf.hf.checkpoints import MANIFEST
from dualadam_hf.hf.resume import RUN_SETTINGS
from dualadam_hf.train.finetune import main
from tiny_runs import SHORT, TINY, one_error_line

def log_history(run: Path) -> list[dict]:
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([TINY, *SHORT, "--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def resumable(finished, tmp_path) -> Path:
    """A copy of the finished run holding only its checkpoint at step 2, to resume from."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(finished / "checkpoint-2", out / "checkpoint-2")
    return out


def test_each_checkpoint_records_the_settings_its_state_depends_on(finished):
    settings = json.loads((finished / "checkpoint-4" / RUN_SETTINGS).read_text())["settings"]
    assert settings["optim"] == "dualadam" and settings["switch_ratio"] == 1.0
    assert settings["run_length"] == "6 steps" and settings["batch"] == "4 x 1 x 1"
    assert settings["model"] == "builtin:tiny-llama" and settings["peft"] == "none"
    assert settings["dataset"].startswith("alpaca_zh_sample.jsonl (sha256 ")
    assert settings["learning_rate"] == pytest.approx(3e-3)


@pytest.mark.parametrize(
    "flags, shown",
    [
        (["--learning_rate", "1e-3"], "learning_rate: 0.003 -> 0.001"),
        (["--optim_args", "switch_rate=0.05"], "switch_rate: (unset) -> 0.05; switch_ratio: 1.0 -> (unset)"),
        (["--max_steps", "12"], "run_length: 6 steps -> 12 steps"),
        (["--gradient_accumulation_steps", "2"], "batch: 4 x 1 x 1 -> 4 x 2 x 1"),
        (["--weight_decay", "0.1"], "weight_decay: 0.0 -> 0.1"),
        (["--dataset_name", "{tmp}/other.jsonl"], "dataset: alpaca_zh_sample.jsonl (sha256 "),
        (["--max_seq_length", "64"], "max_seq_length: 192 -> 64"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_changed_recipe_is_refused_in_one_line_naming_each_change(resumable, capsys, no_loading, flags, shown,
                                                                    dry_run):
    (resumable.parent / "other.jsonl").write_text(
        json.dumps({"instruction": "说", "input": "", "output": "好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    flags = [flag.replace("{tmp}", str(resumable.parent)) for flag in flags]
    before = sorted(path.name for path in resumable.rglob("*"))
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest", *flags,
                 "--dry_run", str(dry_run).lower()]) == 2
    line = one_error_line(capsys)
    assert f"resume_from_checkpoint {resumable / 'checkpoint-2'}: the recipe changed since it was saved (" in line
    assert shown in line and "set resume_accept_changes: " in line
    assert sorted(path.name for path in resumable.rglob("*")) == before


@pytest.mark.parametrize(
    "flags, shown",
    [
        (["--optim", "adamw_torch"], "optim: dualadam -> adamw_torch cannot change on resume"),
        (["--use_peft", "true"], "peft: none -> LoRA r=16"),
        (["--model_name_or_path", "{tmp}/another_model"], "model: builtin:tiny-llama -> "),
    ],
)
def test_the_optimizer_model_and_peft_cannot_change_even_when_accepted(resumable, capsys, flags, shown):
    (resumable.parent / "another_model").mkdir()
    flags = [flag.replace("{tmp}", str(resumable.parent)) for flag in flags]
    accept = ["--resume_accept_changes", "optim,peft,model"]
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest", *flags,
                 *accept]) == 2
    line = one_error_line(capsys)
    assert shown in line and "start a new run" in line


def test_accepting_a_key_that_is_not_recorded_is_refused(resumable, capsys):
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest",
                 "--resume_accept_changes", "lr", "--dry_run", "true"]) == 2
    assert "resume_accept_changes: 'lr' is not a recorded setting; recorded: " in one_error_line(capsys)


def test_an_accepted_learning_rate_is_applied_from_the_resumed_step_and_recorded(finished, resumable, capsys):
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest",
                 "--learning_rate", "1e-3", "--resume_accept_changes", "learning_rate"]) == 0
    assert "applying from step 2: learning_rate 0.003 -> 0.001" in capsys.readouterr().out
    # the tiny recipe's schedule is constant: every step after the resume at the new rate
    rates = {entry["step"]: entry["learning_rate"] for entry in log_history(resumable) if "learning_rate" in entry}
    assert [rates[step] for step in (3, 4, 5, 6)] == [pytest.approx(1e-3)] * 4
    record = json.loads((resumable / "run_config.json").read_text())
    assert record["learning_rate"] == pytest.approx(1e-3)
    assert record["recipe_changes"] == [{"key": "learning_rate", "old": 0.003, "new": 0.001, "step": 2}]
    changed, unchanged = load_file(str(resumable / "model.safetensors")), load_file(str(finished / "model.safetensors"))
    assert any(not torch.equal(changed[name], unchanged[name]) for name in changed)
    # later checkpoints record the new recipe and the change, so a resume from them needs no flag
    saved = json.loads((resumable / "checkpoint-4" / RUN_SETTINGS).read_text())
    assert saved["settings"]["learning_rate"] == pytest.approx(1e-3) and saved["changes"] == record["recipe_changes"]


def test_an_accepted_switch_rate_is_applied_to_alpha(resumable, capsys):
    # switch_ratio=1.0 over 6 steps is xi = 1/6; xi = 0.05 after step 2 gives alpha_t = 1 - 0.05 t
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest",
                 "--optim_args", "switch_rate=0.05", "--resume_accept_changes", "switch_rate,switch_ratio"]) == 0
    alphas = {entry["step"]: entry["dualadam_alpha"] for entry in log_history(resumable) if "dualadam_alpha" in entry}
    assert alphas[2] == pytest.approx(1 - 2 / 6)
    assert [alphas[step] for step in (3, 4, 5, 6)] == [pytest.approx(1 - 0.05 * step) for step in (3, 4, 5, 6)]


def test_without_changes_the_resume_equals_the_uninterrupted_run(finished, resumable):
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest"]) == 0
    resumed, whole = load_file(str(resumable / "model.safetensors")), load_file(str(finished / "model.safetensors"))
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


def test_a_checkpoint_without_recorded_settings_resumes_with_a_note(resumable, capsys):
    for name in (RUN_SETTINGS, MANIFEST):  # as an older version saved it
        os.remove(resumable / "checkpoint-2" / name)
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest",
                 "--dry_run", "true"]) == 0
    assert "checkpoint-2 records no settings (saved by an older version or another trainer): not checked" in (
        capsys.readouterr().out)


def test_weights_only_resumes_check_the_model_and_peft_only(resumable, capsys):
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest",
                 "--resume_weights_only", "true", "--optim", "adamw_torch", "--learning_rate", "1e-3",
                 "--dry_run", "true"]) == 0
    assert main([TINY, *SHORT, "--output_dir", str(resumable), "--resume_from_checkpoint", "latest",
                 "--resume_weights_only", "true", "--use_peft", "true", "--dry_run", "true"]) == 2
    assert "peft: none -> LoRA" in one_error_line(capsys)
