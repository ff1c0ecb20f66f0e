"""One run per output_dir (the lock), and an overwrite that is a swap (tiny recipe, CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dualadam_hf.hf.checkpoints import checkpoints_in
from dualadam_hf.train.finetune import main
from dualadam_hf.train.run_dir import ASIDE, DISCARDED, LOCK_FILE, OutputDirInUse, RunDirectory
from tiny_runs import ROOT, SHORT, TINY, one_error_line, snapshot

QUICK = [*SHORT, "--max_steps", "2", "--max_train_samples", "16"]
HOLD = """
import sys, time
from dualadam_hf.train.run_dir import RunDirectory
RunDirectory.take(sys.argv[1], set_aside=sys.argv[2] == "aside")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([TINY, *QUICK, "--save_steps", "1", "--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def previous(finished, tmp_path) -> Path:
    """A copy of the finished run, with files no run of ours writes, all dated an hour back."""
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(copy)], check=True)
    (copy / "notes.txt").write_text("the user's own notes")
    (copy / ".hidden").write_text("")
    (copy / "checkpoint-8").mkdir()
    past = time.time() - 3600
    for path in copy.rglob("*"):
        os.utime(path, (past, past))
    return copy


def holder_process(output_dir: Path, *, aside: bool = False) -> subprocess.Popen:
    """Another process that takes output_dir (and, with ``aside``, sets its run aside), then sleeps."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir), "aside" if aside else ""], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


# ---- the swap ----

@pytest.mark.parametrize("failure", ["dataset unreadable", "non-finite step before the first save"])
def test_an_overwrite_that_fails_before_its_first_save_puts_the_previous_run_back(previous, tmp_path, capsys, failure):
    before = snapshot(previous)
    if failure == "dataset unreadable":  # exists, so pre-flight passes; fails to load after the swap
        (tmp_path / "bad.jsonl").write_text('{"instruction": \n')
        flags, message = ["--dataset_name", str(tmp_path / "bad.jsonl")], "no records could be read as json"
    else:  # TensorBoard writes output_dir/runs/ when training begins: something of the new run to remove
        flags = ["--learning_rate", "1e10", "--save_steps", "100", "--report_to", "tensorboard"]
        message = "stopped before the optimizer applied it"
    assert main([TINY, *QUICK, "--output_dir", str(previous), "--overwrite_output_dir", "true", *flags]) == 1
    assert message in one_error_line(capsys)
    assert snapshot(previous) == before
    assert sorted(os.listdir(previous)) == sorted({Path(name).parts[0] for name in before} | {"checkpoint-8"})


def test_a_successful_overwrite_leaves_nothing_of_the_previous_run(previous, capsys):
    started = time.time()
    assert main([TINY, *QUICK, "--output_dir", str(previous), "--overwrite_output_dir", "true"]) == 0
    assert f"what {previous} holds is moved aside into {ASIDE}" in capsys.readouterr().out
    left = sorted(os.listdir(previous))
    assert not {"notes.txt", ".hidden", "checkpoint-8", ASIDE, DISCARDED, LOCK_FILE} & set(left), left
    assert {"eval_results.json", "train_results.json", "all_results.json", "checkpoint-2"} <= set(left)
    # every file is this run's: the previous run's were dated an hour back
    assert all(path.stat().st_mtime >= started - 1 for path in previous.rglob("*")), left


def test_a_run_that_fails_after_its_first_save_keeps_its_checkpoint_and_not_the_previous_run(previous, capsys):
    started = time.time()
    flags = ["--learning_rate", "1e10", "--save_steps", "1", "--max_steps", "6"]
    assert main([TINY, *QUICK, *flags, "--output_dir", str(previous), "--overwrite_output_dir", "true"]) == 1
    assert "the last good checkpoint is" in one_error_line(capsys)
    assert [path.name for path in checkpoints_in(previous)][-1] == "checkpoint-1"
    assert not {"notes.txt", ".hidden", "checkpoint-8", ASIDE, DISCARDED, LOCK_FILE} & set(os.listdir(previous))
    assert all(path.stat().st_mtime >= started - 1 for path in previous.rglob("*"))


def test_a_run_set_aside_by_a_killed_overwrite_is_listed_then_put_back(previous, tmp_path, capsys):
    before = snapshot(previous)
    kill_9(holder_process(previous, aside=True))  # killed before its first save: the previous run is in ASIDE
    assert sorted(os.listdir(previous)) == sorted([ASIDE, LOCK_FILE])

    assert main([TINY, *QUICK, "--output_dir", str(previous)]) == 2
    assert f"already holds a run ({ASIDE} (a run set aside by an overwrite" in one_error_line(capsys)

    (tmp_path / "bad.jsonl").write_text("[")
    code = main([TINY, *QUICK, "--output_dir", str(previous), "--overwrite_output_dir", "true",
                 "--dataset_name", str(tmp_path / "bad.jsonl")])
    assert code == 1
    one_error_line(capsys)
    assert snapshot(previous) == before  # put back, set aside again, put back again


# ---- the lock ----

@pytest.mark.parametrize("dry_run", [True, False])
def test_a_second_run_is_refused_naming_the_holder_until_it_is_killed(tmp_path, capsys, dry_run):
    out = tmp_path / "run"
    holder = holder_process(out)
    try:
        assert main([TINY, *QUICK, "--output_dir", str(out), "--dry_run", str(dry_run).lower()]) == 2
        line = one_error_line(capsys)
        who = f"pid {holder.pid} on {socket.gethostname()}, started "
        assert f"error: output_dir {out} is in use by another run ({who}" in line
        assert os.listdir(out) == [LOCK_FILE]
    finally:
        kill_9(holder)
    assert os.listdir(out) == [LOCK_FILE]  # what kill -9 leaves: a lock file nobody holds
    assert main([TINY, *QUICK, "--output_dir", str(out), "--dry_run", str(dry_run).lower()]) == 0
    if not dry_run:
        assert (out / "model.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_taking_a_held_output_dir_is_refused_and_a_refused_run_writes_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    holder = holder_process(out)
    try:
        with pytest.raises(OutputDirInUse, match=f"pid {holder.pid} on "):
            RunDirectory.take(out, set_aside=False)
        assert os.listdir(out) == [LOCK_FILE]
    finally:
        kill_9(holder)
    (out / LOCK_FILE).unlink()
    out.rmdir()
    out.parent.rmdir()
    RunDirectory.take(out, set_aside=False).release()  # took, wrote nothing: removes what it created
    assert not (tmp_path / "new").exists()


def test_a_run_holds_its_output_dir_while_it_trains(tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "scripts/finetune.py", TINY, *QUICK, "--max_steps", "150", "--save_strategy", "no",
               "--output_dir", str(out)]
    first = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert first.stdout.readline().startswith("model:")  # the summary is printed once the lock is held
    assert main([TINY, *QUICK, "--output_dir", str(out), "--overwrite_output_dir", "true"]) == 2
    assert f"pid {first.pid} on {socket.gethostname()}" in one_error_line(capsys)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert not (out / LOCK_FILE).exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("output_dir", [".", ".."])
def test_an_overwrite_of_the_folder_the_user_works_in_is_refused(tmp_path, capsys, monkeypatch, output_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main([str(ROOT / TINY), "--output_dir", output_dir, "--overwrite_output_dir", "true"]) == 2
    assert "which holds the current or home directory; give the run a folder of its own" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["work"] and os.listdir(work) == ["notes.txt"]
