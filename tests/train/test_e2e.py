"""The user's main job, end to end: accelerate launch the tiny recipe with DualAdam and with AdamW,
then compare the runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SHORT = ["--max_steps", "6", "--eval_steps", "3", "--logging_steps", "1", "--max_train_samples", "48",
         "--max_eval_samples", "12", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]


def launch(*args, env=None):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_accelerate_launch_both_optimizers_then_compare(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for name, flags in {"dualadam": [], "adamw": ["--optim", "adamw_torch"]}.items():
        runs[name] = tmp_path / name
        launch("scripts/finetune.py", "recipes/tiny_alpaca.yaml", "--output_dir", str(runs[name]), *SHORT, *flags,
               env=env)

    out = tmp_path / "compare"
    result = subprocess.run([sys.executable, "scripts/compare.py", str(runs["dualadam"]), str(runs["adamw"]),
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| run | optimizer |" in result.stdout
    for png in ("ppl.png", "gen_gap.png", "train_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    assert [s["optimizer"] for s in summary] == ["dualadam", "adamw_torch"]
    for entry, run in zip(summary, runs.values()):
        log = json.loads((run / "trainer_state.json").read_text())["log_history"]
        ppl = {e["step"]: e["eval_ppl"] for e in log if "eval_ppl" in e}
        best_step = min(ppl, key=ppl.get)
        assert entry["final_eval_ppl"] == ppl[max(ppl)]
        assert (entry["best_eval_ppl"], entry["best_step"]) == (ppl[best_step], best_step)
        assert entry["final_gen_gap"] == [e["eval_gen_gap"] for e in log if "eval_gen_gap" in e][-1]
        assert entry["final_train_loss"] == [e["loss"] for e in log if "loss" in e][-1]
        assert math.isclose(ppl[max(ppl)], math.exp([e["eval_loss"] for e in log if "eval_loss" in e][-1]))
    dual_log = json.loads((runs["dualadam"] / "trainer_state.json").read_text())["log_history"]
    adamw_log = json.loads((runs["adamw"] / "trainer_state.json").read_text())["log_history"]
    assert any("dualadam_alpha" in e for e in dual_log) and not any("dualadam_alpha" in e for e in adamw_log)
