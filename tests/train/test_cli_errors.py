"""Every script refuses bad input with one `error:` line (or argparse's usage line) and a non-zero exit,
before writing anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_runs import dry_run_in

from dualadam_hf.train.finetune import main as finetune
from dualadam_hf.train.vision.train import main as train_vision

TINY = "recipes/tiny_alpaca.yaml"
DIGITS = "recipes/vision_digits.yaml"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--optim_args", "schedule=exponential"], "schedule='exponential' needs 0 < switch_base <= 1, got None"),
        (["--optim_args", "schedule=exponential,switch_base=2"], "needs 0 < switch_base <= 1, got 2.0"),
        (["--optim_args", "switch_rate=-1"], "switch_rate must be finite and >= 0, got -1.0"),
        (["--optim_args", "switch_step=3"], "switch_step applies to schedule=step only (schedule is linear)"),
        (["--optim_args", "switch_ratio=0.3,schedule=step,switch_step=3"], "switch_ratio applies to schedule=linear only"),
        (["--adam_beta1", "1.5"], "betas[0] must be in [0, 1), got 1.5"),
        (["--learning_rate", "-1"], "lr must be finite and >= 0, got -1.0"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
        (["--lr_scheduler_kwargs", "notjson"], "lr_scheduler_kwargs must be a JSON object, got 'notjson'"),
    ],
)
@pytest.mark.parametrize("script,recipe", [(finetune, TINY), (train_vision, DIGITS)])
def test_bad_training_settings_are_refused_by_the_dry_run_already(script, recipe, flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert script([recipe, "--dry_run", "true", "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not out.exists()


def test_invadam_on_a_dualadam_recipe_drops_its_switch_keys(tmp_path, capsys):
    assert finetune([TINY, *dry_run_in(tmp_path), "--optim", "invadam"]) == 0
    out = capsys.readouterr().out
    assert "optim_args 'switch_ratio=0.3' are DualAdam's; not used by invadam" in out and "alpha = 1" in out


@pytest.mark.parametrize("optimizer,lines", [
    ("invadam_8bit", ["state: exp_avg and exp_avg_sq 8bit block-wise (block 256;", "alpha = 1 at every step (pure InvAdam)"]),
    ("dualadam_4bit", ["state: exp_avg and exp_avg_sq 4bit block-wise (block 128;", "alpha reaches 0 after 30% of"]),
])
def test_the_dry_run_describes_low_bit_state_and_the_schedule_it_keeps(optimizer, lines, tmp_path, capsys):
    assert finetune([TINY, *dry_run_in(tmp_path), "--optim", optimizer]) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in lines), out
    if optimizer.startswith("invadam"):
        assert "schedule linear" not in out  # alpha never leaves 1


def test_the_dry_run_says_which_backend_steps(tmp_path, capsys):
    assert finetune([TINY, *dry_run_in(tmp_path), "--use_cpu", "true"]) == 0
    assert "step: on CPU, foreach; the compiled kernel for param groups of 10M elements or more" in capsys.readouterr().out


@pytest.mark.parametrize("name,inv_scale,triton,expected", [
    ("dualadam", "none", True, "one Triton launch per param group and dtype on CUDA (torch's fused AdamW once"),
    ("dualadam", "adam_rms", True, "foreach on CUDA (inv_scale adam_rms"),
    ("dualadam", "none", False, "foreach on CUDA (the Triton kernel needs Triton"),
    ("dualadam_8bit", "none", True, "over torchao's codes and scales"),
    ("dualadam_4bit", "none", False, "a compiled step per tensor on CUDA"),
    ("dualadam_8bit", "adam_rms", True, "a compiled step per tensor on CUDA"),
])
def test_the_backend_named_for_cuda(monkeypatch, name, inv_scale, triton, expected):
    from dualadam_hf.optim import triton_backend
    from dualadam_hf.train.describe import step_backend

    monkeypatch.setattr(triton_backend, "available", lambda device_type: triton)
    assert expected in step_backend(name, inv_scale, "cuda")


def run(*command):
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)


def test_compare_refuses_malformed_runs_and_a_file_as_out(tmp_path):
    cases = {"list": "[1, 2]", "nostep": json.dumps({"log_history": [{"loss": 1.0}]})}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(text)
        result = run("scripts/compare.py", str(tmp_path / name), "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and result.stderr.strip().startswith("error: ")
        assert "log_history entries have a step" in result.stderr and "Traceback" not in result.stderr
    good = tmp_path / "good"
    good.mkdir()
    (good / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    (good / "run_config.json").write_text("{not json")
    result = run("scripts/compare.py", str(good), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "run_config.json: not a JSON object" in result.stderr
    (tmp_path / "file").write_text("")
    (good / "run_config.json").write_text("{}")
    result = run("scripts/compare.py", str(good), "--out", str(tmp_path / "file"))
    assert result.returncode == 2 and "exists and is not a directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_repeated_variants_and_seeds_and_bad_quoting(tmp_path):
    base = ["scripts/sweep.py", TINY, "--out", str(tmp_path / "sweep")]
    result = run(*base, "--seeds", "0", "--variant", "x=--optim adamw_torch", "--variant", "x=")
    assert result.returncode == 2 and "variant name given more than once: x" in result.stderr
    result = run(*base, "--seeds", "0", "0", "--variant", "x=")
    assert result.returncode == 2 and "seed given more than once: 0" in result.stderr
    result = run(*base, "--seeds", "0", "--variant", "x=", "--extra", "--foo 'bar")
    assert result.returncode == 2 and "No closing quotation" in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_flatness_refuses_bad_counts_and_broken_runs(tmp_path):
    result = run("scripts/flatness.py", str(tmp_path), "--batches", "0")
    assert result.returncode == 2 and "--batches: 0 is below 1" in result.stderr
    result = run("scripts/flatness.py", str(tmp_path), "--samples", "1")
    assert result.returncode == 2 and "--samples: 1 is below 2" in result.stderr
    record = dict(kind="vision", optim="dualadam", optim_args=None, learning_rate=1e-3, weight_decay=0.0, seed=0)
    (tmp_path / "run_config.json").write_text(json.dumps({**record, "augmentation": "none"}))
    result = run("scripts/flatness.py", str(tmp_path))
    assert result.returncode == 2 and "run_config.json: no 'model'" in result.stderr and "Traceback" not in result.stderr
    del record["kind"]  # a record written before runs carried their kind
    (tmp_path / "run_config.json").write_text(json.dumps(record))
    result = run("scripts/flatness.py", str(tmp_path))
    assert result.returncode == 2 and "run_config.json: no 'kind'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", [(["--seeds", "0"], "--seeds: 0 is below 1"),
                                           (["--steps", "0"], "--steps: 0 is below 1"),
                                           (["--noise", "-1"], "--noise: -1.0 is below 0.0")])
def test_landscape_refuses_bad_counts(flags, message, tmp_path):
    result = run("scripts/landscape_2d.py", "--out", str(tmp_path / "out"), *flags)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()
