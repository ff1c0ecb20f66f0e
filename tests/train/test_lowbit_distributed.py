"""optim="dualadam_8bit" under `accelerate launch` on CPU (gloo): two DDP processes train like one, so do
two FSDP2 processes, which shard the quantized state; both resume from their checkpoints; DeepSpeed is
refused in one line per process before anything loads.

As tests/train/test_distributed.py: 8 optimizer steps with switch_ratio=1.0 (alpha_t = 1 - t/8), one
process with batch 8 against two with batch 4 each, a checkpoint at step 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
EXPECTED_ALPHA = {step: 1.0 - step / STEPS for step in range(1, STEPS + 1)}
RUN = [
    "recipes/tiny_alpaca.yaml", "--optim", "dualadam_8bit", "--max_steps", str(STEPS), "--max_train_samples", "64",
    "--max_eval_samples", "15", "--optim_args", "switch_ratio=1.0", "--logging_steps", "1", "--eval_strategy", "no",
    "--generation_eval_samples", "0", "--save_strategy", "steps", "--save_steps", "4", "--disable_tqdm", "true",
    "--report_to", "none",
]


def launch(launcher_args: list[str], script_args: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, *script_args,
               "--output_dir", str(output_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


def launch_two(config_file: str, output_dir: Path, *flags: str, fsdp: bool = False) -> subprocess.CompletedProcess:
    launcher = ["--config_file", config_file, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
    script = ["tests/fsdp_on_cpu.py", "scripts/finetune.py"] if fsdp else ["scripts/finetune.py"]
    return launch(launcher, [*script, *RUN, "--per_device_train_batch_size", "4", *flags], output_dir)


def by_step(output_dir: Path, key: str) -> dict[int, float]:
    log = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in log if key in entry}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("one_process")
    launcher = ["--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = launch(launcher, ["scripts/finetune.py", *RUN, "--per_device_train_batch_size", "8"], output_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_two_processes_train_like_one(config, one_process, tmp_path):
    result = launch_two(f"recipes/accelerate/{config}.yaml", tmp_path, fsdp=config == "fsdp")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 2 processes = 8 examples per optimizer step" in result.stdout
    assert by_step(tmp_path, "dualadam_alpha") == pytest.approx(EXPECTED_ALPHA, abs=1e-12)
    loss, reference = by_step(tmp_path, "loss"), by_step(one_process, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    difference = max(abs(loss[step] - reference[step]) / reference[step] for step in loss)
    print(f"{config}: max relative difference of the training loss to one process: {difference:.2e}")
    assert difference < 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_resume_continues_the_run(config, tmp_path):
    """optimizer.pt (DDP) or torch.distributed.checkpoint shards (FSDP2) hold the quantized state."""
    config_file = f"recipes/accelerate/{config}.yaml"
    full = launch_two(config_file, tmp_path / "full", fsdp=config == "fsdp")
    assert full.returncode == 0, full.stderr[-4000:]
    resumed = launch_two(config_file, tmp_path / "resumed", "--resume_from_checkpoint",
                         str(tmp_path / "full" / "checkpoint-4"), fsdp=config == "fsdp")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # the resumed log starts with the checkpoint's history (steps 1 to 4)
    after = {step: loss for step, loss in by_step(tmp_path / "resumed", "loss").items() if step > 4}
    uninterrupted = by_step(tmp_path / "full", "loss")
    assert sorted(after) == list(range(5, STEPS + 1))
    assert all(after[step] == pytest.approx(uninterrupted[step], rel=1e-4) for step in after), (after, uninterrupted)
    alphas = {step: alpha for step, alpha in by_step(tmp_path / "resumed", "dualadam_alpha").items() if step > 4}
    assert alphas == pytest.approx({step: EXPECTED_ALPHA[step] for step in range(5, STEPS + 1)}, abs=1e-12)


@pytest.mark.slow
def test_deepspeed_is_refused_in_one_line_per_process_before_anything_loads(tmp_path):
    launcher = ["--config_file", "recipes/accelerate/zero2.yaml", "--num_processes", "2", "--mixed_precision", "no",
                "--main_process_port", "0"]
    result = launch(launcher, ["scripts/finetune.py", *RUN], tmp_path / "run")
    assert result.returncode != 0
    message = ("error: optim: dualadam_8bit keeps its state quantized per tensor, but DeepSpeed ZeRO hands the optimizer "
               "flat partitions of many tensors; use DDP or FSDP2")
    assert result.stderr.count(message) == 2, result.stderr[-4000:]
    assert "ValueError" not in result.stderr  # ours, without a traceback (the launcher's own may follow)
    assert "data: train:" not in result.stdout + result.stderr and not (tmp_path / "run").exists()
