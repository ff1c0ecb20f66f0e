"""Preemption: SIGTERM, SIGINT and SIGUSR1 end a run with a complete checkpoint, one line naming it and the command
that resumes, and exit code 128 + the signal; the resume equals the uninterrupted run (tiny recipe, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dualadam_hf.hf.checkpoints import checkpoints_in, missing_parts
from dualadam_hf.train.finetune import main
from tiny_runs import ROOT, TINY, assert_same_weights, one_error_line, weights

# long enough that a signal sent at the first logged step arrives well before the end; no periodic checkpoint
RUN = ["--max_steps", "200", "--logging_steps", "1", "--eval_strategy", "no", "--max_train_samples", "32",
       "--max_eval_samples", "8", "--per_device_train_batch_size", "4", "--save_strategy", "no",
       "--disable_tqdm", "true", "--optim_args", "switch_ratio=0.5"]


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, f"ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main([TINY, *RUN, "--output_dir", str(out)]) == 0
    return out


def stop_and_resume(out: Path, signum: int) -> tuple[str, Path]:
    """Run in a subprocess, send ``signum`` once the first step is logged; check what the stop leaves; resume."""
    log = out.parent / f"{out.name}.log"
    process = start([sys.executable, "scripts/finetune.py", TINY, *RUN, "--output_dir", str(out)], log)
    wait_for(log, "'loss'", process)
    process.send_signal(signum)
    assert process.wait(timeout=300) == 128 + signum, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    (checkpoint,) = checkpoints_in(out)
    assert missing_parts(checkpoint) == [] and not (out / "model.safetensors").exists()
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 200
    name = signal.Signals(signum).name
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name}: stopped")]
    assert line.startswith(f"{name}: stopped after step {step}, checkpoint saved in {checkpoint}; resume with: python ")
    assert line.endswith(f"--output_dir {out} --resume_from_checkpoint {checkpoint}")
    return line, checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_whose_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path, signum):
    out = tmp_path / "run"
    _, checkpoint = stop_and_resume(out, signum)
    assert main([TINY, *RUN, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)]) == 0
    assert_same_weights(weights(out), weights(uninterrupted))


@pytest.mark.slow
def test_sigusr1_saves_and_stops_too(tmp_path):
    stop_and_resume(tmp_path / "run", signal.SIGUSR1)


def test_a_second_signal_stops_at_once(tmp_path):
    """The watch notes the first signal and, at the second, leaves with the signal's own status."""
    code = (
        "import os, signal, time\n"
        "from dualadam_hf.hf.preemption import PreemptionWatch\n"
        "with PreemptionWatch() as watch:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.1)\n"
        "    assert watch.received == signal.SIGTERM and watch.agreed('cpu', 1) == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not stopped')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not stopped" not in done.stdout
    assert done.stderr.splitlines() == [
        "SIGTERM received: finishing this optimizer step, then saving a checkpoint (send it again to stop at once, "
        "without one)",
        "SIGTERM received again: stopping now, without a checkpoint",
    ]


def test_the_watch_gives_back_the_previous_handlers():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    from dualadam_hf.hf.preemption import PreemptionWatch

    with PreemptionWatch():
        assert all(signal.getsignal(signum) != handler for signum, handler in before.items())
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.slow
def test_under_accelerate_launch_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone: both processes agree at the next step boundary, save one checkpoint together and
    stop; the resume under the same launch equals the uninterrupted two-process run."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml",
              "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
              "scripts/finetune.py", TINY, *RUN, "--max_steps", "80"]
    whole = tmp_path / "whole"
    done = subprocess.run([*launch, "--output_dir", str(whole)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out, log = tmp_path / "run", tmp_path / "run.log"
    process = start([*launch, "--output_dir", str(out)], log)
    wait_for(log, "'loss'", process)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)
               if "scripts/finetune.py" in " ".join(child.cmdline())]
    assert len(workers) == 2
    rank1 = next(worker for worker in workers if worker.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    text = log.read_text()
    assert process.returncode != 0
    (checkpoint,) = checkpoints_in(out)
    assert missing_parts(checkpoint) == []
    stopped = [line for line in text.splitlines() if line.startswith("SIGTERM: stopped after step")]
    assert stopped == [f"SIGTERM: stopped after step {checkpoint.name.split('-')[1]}, checkpoint saved in {checkpoint}; "
                       f"resume with the same launch command and: {stopped[0].split(' and: ')[1]}"], text[-3000:]

    resumed = subprocess.run([*launch, "--output_dir", str(out), "--resume_from_checkpoint", "latest"], cwd=ROOT,
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(out), weights(whole))


@pytest.mark.parametrize("where, message", [
    ("dualadam_hf.train.cli.check_resume", "interrupted (Ctrl-C) during the pre-flight checks: nothing was written"),
    ("dualadam_hf.train.finetune.load_model_and_tokenizer",
     "interrupted (Ctrl-C) outside the training loop: nothing more was saved"),
])
def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, where, message):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupted)
    assert main([TINY, *RUN, "--output_dir", str(tmp_path / "run")]) == 130
    assert one_error_line(capsys) == f"error: {message}"
    assert not (tmp_path / "run").exists()  # the run directory it took is given back as it found it
