"""Checkpoints that are what was saved, or are not taken: manifests caught by resume, ``latest`` and the non-finite
guard; saves the OS refuses as one line; the free-space warning (tiny recipe, CPU)."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from dualadam_hf.hf.checkpoints import MANIFEST, checkpoint_bytes, checkpoints_in, partial_dirs, verify
from dualadam_hf.models.tiny import build_tiny_llama, load_tiny_tokenizer
from dualadam_hf.train.finetune import main
from tiny_runs import ROOT, SHORT, TINY, one_error_line, weights

def overwrite_256_bytes(path: Path) -> None:
    with path.open("r+b") as file:
        file.seek(path.stat().st_size // 2)
        data = file.read(256)
        file.seek(path.stat().st_size // 2)
        file.write(bytes(byte ^ 0xFF for byte in data))


def cut_in_half(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([TINY, *SHORT, "--output_dir", str(out)]) == 0
    return out


def copy_run(finished: Path, destination: Path, *checkpoints: str) -> Path:
    """The finished run's checkpoints named (all of them when none), without its final files."""
    destination.mkdir()
    for checkpoint in checkpoints or [path.name for path in checkpoints_in(finished)]:
        shutil.copytree(finished / checkpoint, destination / checkpoint)
    return destination


def test_every_checkpoint_carries_a_manifest_that_verifies(finished):
    for checkpoint in checkpoints_in(finished):
        listed = {entry["path"] for entry in json.loads((checkpoint / MANIFEST).read_text())["files"]}
        on_disk = {path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*") if path.is_file()}
        assert listed == on_disk - {MANIFEST} and {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= listed
        assert verify(checkpoint) == []


@pytest.mark.parametrize("damage", [overwrite_256_bytes, cut_in_half])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_damaged_checkpoint_is_skipped_by_latest_and_the_resume_succeeds_from_the_one_before(
        finished, tmp_path, capsys, damage, name):
    out = copy_run(finished, tmp_path / "run")
    damage(out / "checkpoint-6" / name)
    capsys.readouterr()
    assert main([TINY, *SHORT, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
    note = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-4'} (the newest complete checkpoint; skipped checkpoint-6, which fails " \
           f"its {MANIFEST} ({name} " in note
    resumed, straight = weights(out), weights(finished)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert verify(out / "checkpoint-6") == []  # saved again by the resumed run


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_damaged_checkpoint_named_explicitly_is_refused_before_anything_loads(finished, tmp_path, capsys, no_loading,
                                                                                dry_run):
    out = copy_run(finished, tmp_path / "run", "checkpoint-2", "checkpoint-4")
    overwrite_256_bytes(out / "checkpoint-4" / "optimizer.pt")
    checkpoint = out / "checkpoint-4"
    assert main([TINY, *SHORT, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint),
                 "--dry_run", str(dry_run).lower()]) == 2
    assert one_error_line(capsys) == (
        f"error: resume_from_checkpoint {checkpoint}: its files changed after the save, optimizer.pt does not match its "
        f"xxh3_128 checksum ({MANIFEST}); resume from an earlier checkpoint"
    )


def test_a_non_finite_step_names_the_newest_checkpoint_that_verifies(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    training_step = transformers.Trainer.training_step

    def damage_checkpoint_3_then_diverge(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        if self.state.global_step == 3:  # checkpoint-3 is published; step 4 is under way
            overwrite_256_bytes(out / "checkpoint-3" / "model.safetensors")
            return loss * float("nan")
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", damage_checkpoint_3_then_diverge)
    assert main([TINY, *SHORT, "--save_steps", "1", "--output_dir", str(out)]) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: step 4: the training loss is nan")
    assert line.endswith(f"the last good checkpoint is {out / 'checkpoint-2'} (skipped checkpoint-3, which fails its "
                         f"{MANIFEST} (model.safetensors does not match its xxh3_128 checksum))")
    assert verify(out / "checkpoint-2") == [] and verify(out / "checkpoint-3") != []


def limit_file_size(limit: int):
    def preexec() -> None:  # in the child: Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def run_script(flags: list[str], *, file_size_limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/finetune.py", TINY, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False, preexec_fn=limit_file_size(file_size_limit),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


# the tiny model's model.safetensors is 1.9 MB, its optimizer.pt 3.8 MB
@pytest.mark.parametrize("limit,fails_in", [(3_000_000, "optimizer.pt: torch.save"), (1_000_000, "the weights: safetensors")])
def test_a_checkpoint_save_past_the_file_size_limit_is_one_line_and_keeps_the_earlier_ones(finished, tmp_path, limit,
                                                                                           fails_in):
    out = copy_run(finished, tmp_path / "run", "checkpoint-2", "checkpoint-4")
    before = {path.name: sorted(path.rglob("*")) for path in checkpoints_in(out)}
    done = run_script([*SHORT, "--output_dir", str(out), "--resume_from_checkpoint", "latest"], file_size_limit=limit)
    assert done.returncode == 1
    [line] = error_lines(done)
    assert line.startswith(f"error: could not save {out / 'checkpoint-6'}: EFBIG (File too large)"), line
    assert " free there; the partial save is removed, earlier checkpoints are kept" in line
    assert [path.name for path in checkpoints_in(out)] == ["checkpoint-4", "checkpoint-2"] and not partial_dirs(out)
    assert all(verify(path) == [] and sorted(path.rglob("*")) == before[path.name] for path in checkpoints_in(out))


def test_a_final_save_past_the_file_size_limit_is_one_line_and_leaves_no_half_model(tmp_path):
    out = tmp_path / "run"
    done = run_script([*SHORT, "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(out)],
                      file_size_limit=1_000_000)
    assert done.returncode == 1
    [line] = error_lines(done)
    assert line.startswith(f"error: could not save {out}: EFBIG (File too large)"), line
    assert line.endswith("free there; the partial save is removed, the run's checkpoints are kept")
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


def test_the_free_space_warning_and_the_estimate_it_makes(finished, tmp_path, monkeypatch, caplog):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5_000_000))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main([TINY, *SHORT, "--max_steps", "2", "--output_dir", str(out)]) == 0
    [warning] = [record.getMessage() for record in caplog.records if "free for" in record.getMessage()]
    assert warning.startswith(f"warning: 5.0 MB free for {out}, less than one checkpoint (5.7 MB: weights 1.9 MB + "
                              "optimizer state 3.8 MB) plus the final model (1.9 MB)")

    model_bytes, state_bytes = checkpoint_bytes(build_tiny_llama(load_tiny_tokenizer(), seed=42), "dualadam")
    checkpoint = finished / "checkpoint-6"
    assert model_bytes == pytest.approx((checkpoint / "model.safetensors").stat().st_size, rel=0.01)
    assert state_bytes == pytest.approx((checkpoint / "optimizer.pt").stat().st_size, rel=0.01)


# the tiny model's optimizer.pt (3.8 MB) is written by process 0 only, rng_state_1.pth (~15 kB) by process 1
@pytest.mark.slow
@pytest.mark.parametrize("rank,limit,file", [(0, 3_000_000, "optimizer.pt"), (1, 5_000, "rng_state_1.pth")])
def test_a_save_one_process_cannot_write_ends_every_process_with_one_line(tmp_path, rank, limit, file):
    # Before, the other process waited at the barrier after its own part: until ddp_timeout under NCCL, or
    # until gloo saw its peer leave, with a raw traceback. Now every process agrees on the save's outcome.
    from train.test_distributed import RUN, launch

    out = tmp_path / "run"
    launcher = ["--config_file", str(ROOT / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                "--mixed_precision", "no", "--main_process_port", "0"]
    done = launch(launcher, ["tests/file_size_limit_on_rank.py", str(rank), str(limit), "scripts/finetune.py", *RUN,
                             "--per_device_train_batch_size", "4"], out)
    assert done.returncode != 0
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    checkpoint = out / "checkpoint-4"
    own = (f"error: could not save {checkpoint}: EFBIG (File too large) writing {out}/.partial-checkpoint-4/"
           f"checkpoint-4/{file}: the file-size limit (ulimit -f) is {limit} bytes; ")
    other = (f"error: could not save {checkpoint}: process {rank} could not write its part (its own error line says "
             "why); earlier checkpoints are kept")
    assert len(errors) == 2 and other in errors, errors
    assert [line for line in errors if line != other][0].startswith(own), errors
    assert not checkpoint.exists() and partial_dirs(out) == []
