"""No run lost or overwritten in silence: the output-dir guard, the non-finite guard, checkpoints that are
complete or absent, ``latest``, optimizer-less checkpoints, and the pre-flight checks (tiny recipe, CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from dualadam_hf.analysis.compare import compare
from dualadam_hf.hf.checkpoints import checkpoints_in, missing_parts
from dualadam_hf.train.finetune import main
from tiny_runs import ROOT, SHORT, TINY, one_error_line, snapshot, weights

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([TINY, *SHORT, "--output_dir", str(out)]) == 0
    return out


# ---- 1. the output-dir guard ----

@pytest.mark.parametrize("dry_run", [False, True])
def test_a_second_run_into_a_finished_run_is_refused_and_leaves_it_byte_identical(finished, capsys, dry_run):
    before = snapshot(finished)
    assert main([TINY, *SHORT, "--output_dir", str(finished), "--dry_run", str(dry_run).lower()]) == 2
    line = one_error_line(capsys)
    assert f"output_dir {finished} already holds a run (trainer_state.json" in line
    assert "overwrite_output_dir: true" in line and "resume_from_checkpoint: latest" in line
    assert snapshot(finished) == before


def test_overwrite_output_dir_replaces_the_run_and_its_checkpoints(finished, tmp_path, capsys):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(copy)], check=True)
    (copy / "checkpoint-8").mkdir()  # a later checkpoint of the old run: must not pass for the new run's
    assert main([TINY, *SHORT, "--max_steps", "2", "--output_dir", str(copy), "--overwrite_output_dir", "true"]) == 0
    assert [path.name for path in checkpoints_in(copy)] == ["checkpoint-2"]
    assert json.loads((copy / "trainer_state.json").read_text())["global_step"] == 2


# ---- 2. the non-finite guard ----

def test_a_non_finite_step_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([TINY, *SHORT, "--learning_rate", "1e10", "--save_steps", "1", "--output_dir", str(out)])
    assert code == 1
    line = one_error_line(capsys)
    step = int(line.split("step ")[1].split(":")[0])
    assert step >= 2 and ("is nan" in line or "is inf" in line)
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in line
    assert [path.name for path in checkpoints_in(out)][0] == f"checkpoint-{step - 1}"
    assert missing_parts(out / f"checkpoint-{step - 1}") == []
    assert all(torch.isfinite(tensor).all() for tensor in weights(out / f"checkpoint-{step - 1}").values())
    assert not (out / "model.safetensors").exists()  # the non-finite weights are not saved as the final model
    history = json.loads((out / f"checkpoint-{step - 1}" / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(entry["loss"]) and entry["loss"] != 0 for entry in history if "loss" in entry)


def test_summary_json_writes_non_finite_numbers_as_null(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [{"loss": 2.0, "step": 1}, {"eval_loss": float("nan"), "eval_ppl": float("nan"), "step": 1},
               {"loss": float("inf"), "step": 2}]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    compare([run], tmp_path / "out")

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)[0]
    assert summary["final_eval_ppl"] is None and summary["final_train_loss"] is None


# ---- 3 and 4. checkpoints complete or absent; latest; optimizer state ----

class CrashInSave(Exception):
    pass


def test_a_crash_mid_save_leaves_no_checkpoint_and_latest_resumes_to_the_same_weights(finished, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    save_rng_state = transformers.Trainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # the weights and optimizer state of step 4 are written by now
            raise CrashInSave
        save_rng_state(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", crash_at_step_4)
    with pytest.raises(CrashInSave):
        main([TINY, *SHORT, "--output_dir", str(out)])
    monkeypatch.undo()
    assert [path.name for path in checkpoints_in(out)] == ["checkpoint-2"]  # no checkpoint-4 folder
    assert (out / ".partial-checkpoint-4").is_dir()  # what the crash left, under a name no loader takes

    capsys.readouterr()
    assert main([TINY, *SHORT, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert not (out / ".partial-checkpoint-4").exists()
    resumed, straight = weights(out), weights(finished)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_checkpoint_from_before_atomic_saves_is_skipped_by_latest(finished, tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(out)], check=True)
    (out / "checkpoint-8").mkdir()  # what kill -9 inside an older save left: a folder, nothing in it
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "config.json").write_text("")
    assert main([TINY, *SHORT, "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--dry_run", "true"]) == 0
    note = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-6'}" in note and "skipped incomplete checkpoint-8, checkpoint-7" in note
    assert main([TINY, *SHORT, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-7")]) == 2
    assert "not a complete checkpoint, no a readable trainer_state.json and no model weights" in one_error_line(capsys)


@pytest.mark.parametrize("how", ["optimizer.pt deleted", "save_only_model"])
def test_a_checkpoint_without_optimizer_state_is_refused_unless_weights_only(tmp_path, capsys, how):
    out = tmp_path / "run"
    extra = ["--save_only_model", "true"] if how == "save_only_model" else []
    assert main([TINY, *SHORT, "--max_steps", "2", "--output_dir", str(out), *extra]) == 0
    checkpoint = out / "checkpoint-2"
    if how == "optimizer.pt deleted":
        (checkpoint / "optimizer.pt").unlink()
    resumed = tmp_path / "resumed"
    capsys.readouterr()
    assert main([TINY, *SHORT, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)]) == 2
    line = one_error_line(capsys)
    assert "no optimizer state (optimizer.pt); set resume_weights_only: true" in line
    assert not resumed.exists()

    assert main([TINY, *SHORT, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint),
                 "--resume_weights_only", "true"]) == 0
    assert "with a fresh optimizer: alpha and the learning-rate schedule restart" in capsys.readouterr().out
    alphas = {e["step"]: e["dualadam_alpha"]
              for e in json.loads((resumed / "trainer_state.json").read_text())["log_history"] if "dualadam_alpha" in e}
    # switch_ratio=1.0 of 6 steps: alpha_3 is 1 - 3/6 = 0.5 with the saved optimizer; the fresh one restarts
    assert alphas[3] == pytest.approx(1 - 1 / 6)


# ---- 5. pre-flight ----

@pytest.mark.parametrize(
    "flags,message",
    [
        (["--resume_from_checkpoint", "{tmp}/nowhere"], "resume_from_checkpoint {tmp}/nowhere: no such folder"),
        (["--resume_from_checkpoint", "{tmp}/half"], "resume_from_checkpoint {tmp}/half: not a complete checkpoint"),
        (["--resume_from_checkpoint", "true"], "resume_from_checkpoint true: no complete checkpoint in {tmp}/run"),
        (["--output_dir", "{tmp}/a_file"], "output_dir {tmp}/a_file: exists and is a file"),
        (["--output_dir", "/sys/dualadam/run"], "output_dir /sys/dualadam/run: not writable"),
        (["--dataset_name", "{tmp}/nowhere"], "dataset_name {tmp}/nowhere: no such file or folder"),
        (["--dataset_name", "{tmp}/empty"], "dataset_name {tmp}/empty: an empty folder"),
        (["--optim_args", "switch_rate=inf"], "optim_args: switch_rate='inf' is not a finite float >= 0"),
        (["--learning_rate", "inf"], "learning_rate must be finite, got inf"),
        (["--max_grad_norm", "nan"], "max_grad_norm must be finite, got nan"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_pre_flight_refusals_are_one_line_before_anything_is_written(tmp_path, capsys, no_loading, flags, message, dry_run):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("")
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    before = sorted(os.listdir(tmp_path))
    assert main([TINY, "--output_dir", str(tmp_path / "run"), *flags, "--dry_run", str(dry_run).lower()]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before


# ---- under accelerate launch, two processes ----

def launch_two(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml",
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
               "scripts/finetune.py", TINY, *SHORT, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.slow
def test_two_processes_refuse_a_finished_output_dir_and_resume_from_latest(tmp_path):
    out = tmp_path / "run"
    first = launch_two("--output_dir", str(out), "--max_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    again = launch_two("--output_dir", str(out), "--max_steps", "4")
    assert again.returncode != 0
    assert again.stderr.count(f"error: output_dir {out} already holds a run") == 2, again.stderr[-3000:]
    assert snapshot(out) == before

    # the first launch ran 4 steps: switch_ratio's xi changes with the run's length, a change to accept
    resumed = launch_two("--output_dir", str(out), "--resume_from_checkpoint", "latest",
                         "--resume_accept_changes", "run_length")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-4'}" in resumed.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert [path.name for path in checkpoints_in(out)] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]
