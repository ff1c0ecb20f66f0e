"""Checkpoint manifests (what ``verify`` and ``latest`` catch), saves the OS refuses as one ``SaveError`` line,
and the size estimate behind the free-space warning."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_lm import tiny_llama

from dualadam_hf.hf.checkpoints import (
    MANIFEST,
    SaveError,
    checkpoint_bytes,
    free_space_warning,
    human_size,
    latest_complete,
    save_failures_in_one_line,
    skipped_note,
    verify,
    write_manifest,
)


def fake_checkpoint(run: Path, step: int, *, manifest: bool = True) -> Path:
    checkpoint = run / f"checkpoint-{step}"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "model.safetensors").write_bytes(os.urandom(4096))
    (checkpoint / "optimizer.pt").write_bytes(os.urandom(8192))
    (checkpoint / "sub" / "rng_state.pth").write_bytes(os.urandom(100))
    if manifest:
        write_manifest(checkpoint)
    return checkpoint


def overwrite(path: Path, offset: int = 1000, count: int = 256) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        data = file.read(count)
        file.seek(offset)
        file.write(bytes(byte ^ 0xFF for byte in data))  # each byte changed: the size stays


def test_a_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 2)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert manifest["algorithm"] == "xxh3_128"
    assert {entry["path"]: entry["size"] for entry in manifest["files"]} == {
        "model.safetensors": 4096, "optimizer.pt": 8192, "sub/rng_state.pth": 100,
        "trainer_state.json": len(json.dumps({"global_step": 2}))}
    assert verify(checkpoint) == []


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda c: overwrite(c / "model.safetensors"), "model.safetensors does not match its xxh3_128 checksum"),
        (lambda c: overwrite(c / "sub" / "rng_state.pth", offset=0, count=1), "sub/rng_state.pth does not match"),
        (lambda c: os.truncate(c / "optimizer.pt", 5000), "optimizer.pt has 5000 bytes, its manifest 8192"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda c: (c / MANIFEST).write_text('{"algorithm": "xxh3_128", "fi'), f"{MANIFEST} is unreadable"),
    ],
    ids=["bytes overwritten", "one byte in a subfolder", "cut short", "deleted", "manifest cut short"],
)
def test_verify_names_each_file_that_changed_after_the_save(tmp_path, damage, problem):
    checkpoint = fake_checkpoint(tmp_path, 2)
    damage(checkpoint)
    problems = verify(checkpoint)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_verify_leaves_out_the_optimizer_state_for_a_weights_only_resume(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 2)
    overwrite(checkpoint / "optimizer.pt")
    assert verify(checkpoint, optimizer=False) == []
    assert verify(checkpoint) == ["optimizer.pt does not match its xxh3_128 checksum"]


def test_a_checkpoint_without_a_manifest_is_judged_by_its_parts_alone(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 2, manifest=False)
    overwrite(checkpoint / "model.safetensors")
    assert verify(checkpoint) == []
    assert latest_complete(tmp_path) == (checkpoint, {})


def test_latest_skips_checkpoints_that_fail_their_manifest_and_says_why(tmp_path):
    oldest, middle, newest = (fake_checkpoint(tmp_path, step) for step in (2, 4, 6))
    (tmp_path / "checkpoint-8").mkdir()  # incomplete
    overwrite(newest / "model.safetensors")
    os.truncate(middle / "optimizer.pt", 10)
    checkpoint, skipped = latest_complete(tmp_path)
    assert checkpoint == oldest
    assert skipped_note(skipped) == (
        f"skipped incomplete checkpoint-8; skipped checkpoint-6, which fails its {MANIFEST} (model.safetensors does not "
        f"match its xxh3_128 checksum); skipped checkpoint-4, which fails its {MANIFEST} (optimizer.pt has 10 bytes, "
        "its manifest 8192)"
    )


# ---- saves the OS refuses ----

def test_a_refused_checkpoint_save_is_one_line_and_leaves_no_partial(tmp_path):
    run = tmp_path / "run"
    kept = fake_checkpoint(run, 2)
    staging = run / ".partial-checkpoint-4"
    with pytest.raises(SaveError) as refused:
        with save_failures_in_one_line(run / "checkpoint-4", partial=staging, kept="earlier checkpoints are kept"):
            (staging / "checkpoint-4").mkdir(parents=True)
            (staging / "checkpoint-4" / "model.safetensors").write_bytes(b"half")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "checkpoint-4" / "optimizer.pt"))
            except OSError as error:  # the way torch and transformers wrap it: only in __context__
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from error
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"could not save {run / 'checkpoint-4'}: ENOSPC (No space left on device) writing ")
    assert " free there; the partial save is removed, earlier checkpoints are kept" in message
    assert not staging.exists() and verify(kept) == []


def test_any_other_failure_goes_through_and_keeps_the_partial(tmp_path):
    staging = tmp_path / ".partial-checkpoint-4"
    with pytest.raises(KeyError):
        with save_failures_in_one_line(tmp_path / "checkpoint-4", partial=staging, kept=""):
            staging.mkdir()
            raise KeyError("a bug, not the disk")
    assert staging.is_dir()


def test_a_refused_final_save_removes_only_the_files_it_wrote(tmp_path):
    (tmp_path / "run_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"an earlier model")
    checkpoint = fake_checkpoint(tmp_path, 2)
    with pytest.raises(SaveError, match="EFBIG"):
        with save_failures_in_one_line(tmp_path, kept="the run's checkpoints are kept"):
            (tmp_path / "config.json").write_text("{}")
            (tmp_path / "model.safetensors").write_bytes(b"cut")
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "run_config.json"]
    assert verify(checkpoint) == []


WRITE_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from dualadam_hf.hf.checkpoints import SaveError, save_failures_in_one_line

    staging = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    tensors = {"weight": torch.zeros(100_000)}
    save = {"torch.save": torch.save, "safetensors": save_file}[sys.argv[2]]
    try:
        with save_failures_in_one_line(staging.parent / "checkpoint-4", partial=staging, kept="earlier kept"):
            staging.mkdir()
            save(tensors, str(staging / "state"))
    except SaveError as error:
        print(error)
""")


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_write_past_the_file_size_limit_is_named_efbig(tmp_path, writer):
    """torch.save's C++ stream keeps no errno ("unexpected pos"); safetensors says "(os error 27)"."""
    staging = tmp_path / ".partial-checkpoint-4"
    done = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(staging), writer],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"could not save {tmp_path / 'checkpoint-4'}: EFBIG (File too large)"), done.stdout
    if writer == "torch.save":
        assert "the file-size limit (ulimit -f) is 100000 bytes" in done.stdout
    assert not staging.exists()


# ---- will a checkpoint fit ----

def test_the_size_estimate_counts_weights_at_their_dtype_and_the_state_format():
    model = tiny_llama()
    count = sum(parameter.numel() for parameter in model.parameters())
    assert checkpoint_bytes(model, "dualadam") == (4 * count, 8 * count)
    assert checkpoint_bytes(model.to(torch.bfloat16), "adamw_torch") == (2 * count, 8 * count)
    assert checkpoint_bytes(model, "dualadam_8bit")[1] == round((2 + 8 / 256) * count)
    assert checkpoint_bytes(model, "dualadam_4bit")[1] == round((1 + 8 / 128) * count)


def test_a_lora_run_saves_the_adapter_and_its_optimizer_state_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    assert 0 < adapter < sum(parameter.numel() for parameter in model.parameters()) / 10
    assert checkpoint_bytes(model, "dualadam") == (4 * adapter, 8 * adapter)


def test_the_free_space_warning_names_the_folder_the_free_space_and_the_estimate(tmp_path, monkeypatch):
    model = tiny_llama()
    weights, state = checkpoint_bytes(model, "dualadam")
    args = SimpleNamespace(output_dir=str(tmp_path / "run"), optim="dualadam", save_only_model=False,
                           save_strategy="steps")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * weights + state))
    assert free_space_warning(args, model) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * weights + state - 1))
    assert free_space_warning(args, model) == (
        f"{human_size(2 * weights + state - 1)} free for {tmp_path / 'run'}, less than one checkpoint "
        f"({human_size(weights + state)}: weights {human_size(weights)} + optimizer state {human_size(state)}) plus "
        f"the final model ({human_size(weights)}); a save that runs out of space stops the run"
    )
    args.save_only_model = True
    assert free_space_warning(args, model) is None
    args.save_strategy = "no"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=weights - 1))
    assert free_space_warning(args, model) == (f"{human_size(weights - 1)} free for {tmp_path / 'run'}, less than the "
                                               f"final model ({human_size(weights)}); a save that runs out of space "
                                               "stops the run")
