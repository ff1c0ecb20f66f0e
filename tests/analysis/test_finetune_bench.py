"""The fine-tuning benchmark: its 1b shape (without allocating it), its data's lengths, its arithmetic, its
command line, one run end to end at the tiny shape on the CPU, and a second benchmark reusing the first's
checkpoint and data."""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualadam_hf.analysis.finetune_bench import (
    RUN_FIELDS,
    WRITTEN,
    BenchError,
    finetune_args,
    parameter_counts,
    peak_tflops_of,
    resize_checkpoint,
    shape_sizes,
    summarize,
    write_data,
)
from dualadam_hf.analysis.packing_bench import TOKENS_MEAN, TOKENS_STD
from dualadam_hf.models.openpangu_fixture import weight_shapes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_finetune.py"
REPORT_FIELDS = {
    "shape", "config", "parameters", "flop_parameters", "device", "torch", "cuda", "transformers", "peak_tflops",
    "peak_tflops_source", "mfu_convention", "steps", "data", "write_checkpoint_seconds", "write_data_seconds",
    "reused_from", "finetune_flags", "planned_runs", "runs",
}


@pytest.fixture(scope="module")
def bench_main():
    return runpy.run_path(str(SCRIPT), run_name="bench_finetune")["main"]


def test_the_1b_shape_has_the_published_sizes():
    sizes = shape_sizes("1b")
    assert sizes == dict(vocab_size=153_376, hidden_size=1536, intermediate_size=6144, num_hidden_layers=26,
                         num_attention_heads=12, num_key_value_heads=6)
    shapes = weight_shapes(sizes)  # names and shapes only: nothing is allocated
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (12 * 128, 1536)  # head dim 128
    assert shapes["model.layers.25.self_attn.k_proj.weight"] == (6 * 128, 1536)
    assert {shapes[f"model.layers.0.self_attn.{name}_proj.bias"] for name in "qkvo"} == {(1536,), (768,)}
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (153_376, 1536)  # untied
    assert "model.layers.26.mlp.up_proj.weight" not in shapes
    assert parameter_counts(sizes) == (1_391_497_728, 1_391_497_728 - 153_376 * 1536)


def test_resizing_writes_the_sizes_and_weights_that_load(tiny_openpangu, tmp_path):
    checkpoint = Path(shutil.copytree(tiny_openpangu, tmp_path / "resized"))
    sizes = dict(vocab_size=3000, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    resize_checkpoint(checkpoint, sizes)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert {key: config[key] for key in sizes} == sizes
    assert config["model_type"] == "PanguEmbedded" and config["bias"] is True and config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(sizes)[0]


def test_the_records_have_alpaca_gpt4_cn_lengths(tiny_openpangu, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu)
    measured = write_data(tmp_path / "data.json", tokenizer, train_records=500, eval_records=100)
    records = json.loads((tmp_path / "data.json").read_text(encoding="utf-8"))
    assert len(records) == 600 and all(set(record) == {"instruction", "input", "output"} for record in records)
    assert all(record["instruction"] and record["output"] for record in records)
    assert measured["tokens_per_record_mean"] == pytest.approx(TOKENS_MEAN, rel=0.05)
    assert measured["tokens_per_record_stdev"] == pytest.approx(TOKENS_STD, rel=0.1)


def raw_report(**changes):
    raw = dict(
        exit_code=0, imported_at=105.0, finished_at=160.0, seconds=dict(load=2.0, data=1.0, setup=0.5, save=3.0),
        step_seconds=[4.0, 1.0, 2.0], optimizer_seconds=[0.5, 0.25, 0.25], step_tokens=[[900, 900], [1000, 1600],
                                                                                       [2000, 2400]],
        evaluations=[[9.0, 6.0], [10.0, 7.0]], checkpoint_seconds=[5.0], train_loss=7.5, peak_gpu_memory_bytes=2**31,
    )
    return raw | changes


def test_the_summary_takes_medians_of_the_steps_after_the_first():
    figures = summarize(raw_report(), launched=100.0, flop_parameters=10**9, peak_tflops=100.0)
    assert set(figures) == set(RUN_FIELDS) - {"optim", "packing", "status", "error"}
    assert figures["imports_seconds"] == 5.0 and figures["total_seconds"] == 60.0
    assert figures["first_step_seconds"] == 4.0 and figures["step_seconds"] == 1.5
    assert figures["slowest_step_seconds"] == 2.0
    assert figures["nonpad_tokens_per_step"] == 1500 and figures["nonpad_tokens_per_second"] == 1000
    assert figures["padding_share"] == pytest.approx(1 - 3000 / 4000)
    assert figures["mfu"] == pytest.approx(6 * 10**9 * 1000 / 100e12)
    assert figures["optimizer_step_seconds"] == 0.25 and figures["optimizer_share"] == pytest.approx((0.25 + 0.125) / 2)
    assert (figures["evaluation_seconds"], figures["generation_seconds"]) == (10.0, 7.0)  # the final one
    assert figures["evaluation_without_generation_seconds"] == 3.0
    assert (figures["evaluation_calls"], figures["checkpoint_saves"], figures["checkpoint_seconds"]) == (2, 1, 5.0)
    assert figures["peak_gpu_memory_gib"] == 2.0
    assert summarize(raw_report(), launched=100.0, flop_parameters=10**9, peak_tflops=None)["mfu"] is None


def test_a_phase_the_run_skipped_is_named():
    with pytest.raises(BenchError, match="without passing through save, evaluation: finetune's path changed"):
        summarize(raw_report(seconds=dict(load=2.0, data=1.0, setup=0.5), evaluations=[]), launched=100.0,
                  flop_parameters=1, peak_tflops=None)


@pytest.mark.parametrize(
    "name,tflops",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
     ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("AMD EPYC 7B13", None)],
)
def test_the_peak_table(name, tflops):
    assert peak_tflops_of(name)[0] == tflops


def test_a_run_saves_no_checkpoint_while_training_unless_the_flags_ask():
    common = dict(checkpoint=Path("ck"), data=Path("data.json"), validation_fraction=0.5, steps=3, packing=True,
                  output_dir=Path("out"), on_cpu=True)
    argv = finetune_args(Path("recipe.yaml"), extra=(), **common)
    assert argv[argv.index("--save_strategy") + 1] == "no"
    # the flags after "--" come last, so theirs wins
    argv = finetune_args(Path("recipe.yaml"), extra=("--save_strategy", "steps"), **common)
    assert argv[-2:] == ["--save_strategy", "steps"] and argv.index("--save_strategy") < len(argv) - 2


def test_out_refuses_an_existing_file_in_one_line(bench_main, tmp_path, capsys):
    existing = tmp_path / "report.json"
    existing.write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_status:
        bench_main(["--out", str(existing)])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == f"error: {existing} exists; not overwriting it\n"
    assert existing.read_text(encoding="utf-8") == "{}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shape", "7b"], "error: argument --shape: invalid choice: '7b' (choose from 'tiny', '1b')\n"),
        (["--steps", "1"], "error: argument --steps: 1 is below 2\n"),
        (["--optim", "sgd"], "error: argument --optim: invalid choice: 'sgd' (choose from 'dualadam', "
                             "'adamw_torch_fused', 'dualadam_8bit', 'adamw_torch_8bit')\n"),
        (["--peak-tflops", "-1"], "error: argument --peak-tflops: must be a positive number, got -1.0\n"),
    ],
)
def test_bad_arguments_are_one_line(bench_main, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_status:
        bench_main(argv)
    assert exit_status.value.code == 2 and capsys.readouterr().err == message


def test_a_finetune_flag_finetune_refuses_stops_before_any_run(bench_main, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        bench_main(["--workdir", str(tmp_path / "work"), "--train-records", "8", "--eval-records", "2", "--",
                    "--lora_r", "0"])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: finetune refuses pangu_alpaca.yaml with these flags: lora_r must be >= 1, got 0\n"
    assert not list((tmp_path / "work").glob("run*"))


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_the_cpu(bench_main, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = bench_main([
        "--shape", "tiny", "--steps", "3", "--optim", "dualadam", "--packing", "on", "--train-records", "24",
        "--eval-records", "4", "--peak-tflops", "0.5", "--json", "--out", str(out), "--",
        "--gradient_accumulation_steps", "2", "--train_eval_samples", "4", "--generation_eval_samples", "2",
        "--generation_max_new_tokens", "4",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    progress = [line for line in captured.err.splitlines() if line.startswith("[1/1]")]
    assert progress[0] == "[1/1] dualadam, packing on: running" and " s/step, " in progress[1]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(captured.out) == report
    assert set(report) == REPORT_FIELDS
    assert report["shape"] == "tiny" and report["steps"] == 3 and report["cuda"] is None
    assert report["reused_from"] is None and report["write_checkpoint_seconds"] > 0
    assert report["peak_tflops"] == 0.5 and report["peak_tflops_source"] == "--peak-tflops"
    assert report["data"]["train_records"] == 24 and report["data"]["eval_records"] == 4
    assert report["planned_runs"] == ["dualadam, packing on"] and not list(tmp_path.glob(".*.partial"))
    assert report["parameters"] == parameter_counts(report["config"])[0] > report["flop_parameters"] > 0
    [run] = report["runs"]
    assert set(run) == set(RUN_FIELDS)
    assert (run["optim"], run["packing"], run["status"], run["error"]) == ("dualadam", True, "ok", None)
    for field in ("imports_seconds", "model_load_seconds", "data_seconds", "setup_seconds", "first_step_seconds",
                  "step_seconds", "optimizer_step_seconds", "evaluation_seconds", "generation_seconds",
                  "evaluation_without_generation_seconds", "total_seconds"):
        assert 0 < run[field] < run["total_seconds"] or field == "total_seconds", field
    assert 0 <= run["save_seconds"] < run["total_seconds"]
    # 2 accumulated batches of 4 examples, every token real in a packed batch
    assert 8 * 10 < run["nonpad_tokens_per_step"] < 8 * 1024 and run["padding_share"] == 0
    assert run["step_seconds"] <= run["slowest_step_seconds"]
    assert run["mfu"] == pytest.approx(6 * report["flop_parameters"] * run["nonpad_tokens_per_second"] / 0.5e12)
    assert 0 < run["optimizer_share"] < 1
    assert run["evaluation_calls"] >= 1 and run["peak_gpu_memory_gib"] is None
    assert (run["checkpoint_saves"], run["checkpoint_seconds"]) == (0, 0)  # --save_strategy no
    assert math.isfinite(run["train_loss"]) and abs(run["train_loss"] - math.log(report["config"]["vocab_size"])) < 1


@pytest.mark.slow
def test_a_run_that_fails_is_reported_with_its_error_line(bench_main, tmp_path, capsys):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: the run would not fail")
    out = tmp_path / "report.json"
    code = bench_main(["--steps", "2", "--optim", "adamw_torch_fused", "--packing", "off", "--train-records", "8",
                       "--eval-records", "2", "--workdir", str(tmp_path / "work"), "--json", "--out", str(out), "--",
                       "--attn_implementation", "flash_attention_2"])
    captured = capsys.readouterr()
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(captured.out)  # a failed run is kept too
    [run] = json.loads(captured.out)["runs"]
    assert code == 1 and run["status"] == "failed"
    assert run["error"].startswith("cannot load the model") and "FlashAttention2" in run["error"]
    assert all(run[field] is None for field in RUN_FIELDS if field not in ("optim", "packing", "status", "error"))
    assert f"[1/1] adamw_torch_fused, packing off: failed: {run['error']}" in captured.err.splitlines()
    assert (tmp_path / "work" / "run1" / "log.txt").is_file() and not (tmp_path / "work" / "run1" / "output").exists()


SMOKE_RUN = ["--steps", "2", "--optim", "dualadam", "--packing", "on", "--train-records", "8", "--eval-records", "2"]
SMOKE_FLAGS = ["--", "--gradient_accumulation_steps", "1", "--train_eval_samples", "4", "--generation_eval_samples",
               "2", "--generation_max_new_tokens", "4"]


def inputs_written(workdir: Path) -> dict[Path, int]:
    """Every file of a benchmark's workdir but its runs' (the checkpoint, the data, WRITTEN), with its mtime."""
    return {path: path.stat().st_mtime_ns for path in workdir.rglob("*")
            if path.is_file() and not path.relative_to(workdir).parts[0].startswith("run")}


def test_a_second_benchmark_reuses_the_first_ones_checkpoint_and_data(bench_main, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert bench_main([*SMOKE_RUN, "--workdir", str(first), "--json", *SMOKE_FLAGS]) == 0
    earlier = json.loads(capsys.readouterr().out)
    assert earlier["reused_from"] is None
    written = inputs_written(first)
    code = bench_main([*SMOKE_RUN, "--workdir", str(second), "--reuse", str(first), "--json", *SMOKE_FLAGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"checkpoint and data: reused from {first}" in captured.err.splitlines()
    report = json.loads(captured.out)
    assert set(report) == REPORT_FIELDS and report["reused_from"] == str(first)
    assert report["write_checkpoint_seconds"] == report["write_data_seconds"] == 0
    assert (report["config"], report["data"]) == (earlier["config"], earlier["data"])
    [run] = report["runs"]
    assert set(run) == set(RUN_FIELDS) and (run["status"], run["error"]) == ("ok", None)
    assert all(run[field] is not None for field in RUN_FIELDS if field not in ("error", "mfu", "peak_gpu_memory_gib"))
    # the run read the earlier files, left them as they were, and wrote none of its own
    assert str(first / "openPangu-Embedded-tiny") in (second / "run1" / "log.txt").read_text(encoding="utf-8")
    assert inputs_written(first) == written and not inputs_written(second)


@pytest.fixture
def earlier_workdirs(tiny_openpangu, tmp_path):
    """``finished``: a tiny checkpoint, also under the 1b name, and WRITTEN for 8 + 2 records; ``stopped``: a
    checkpoint without WRITTEN, as a benchmark stopped while writing leaves it."""
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    for name in ("tiny", "1b"):
        shutil.copytree(tiny_openpangu, finished / f"openPangu-Embedded-{name}")
    (finished / WRITTEN).write_text(json.dumps(dict(shape="tiny", data=dict(train_records=8, eval_records=2))),
                                    encoding="utf-8")
    shutil.copytree(tiny_openpangu, stopped / "openPangu-Embedded-tiny")
    return tmp_path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--reuse", "{tmp}/missing"], "--reuse {tmp}/missing: no such folder"),
        (["--shape", "1b", "--reuse", "{tmp}/finished"],
         "--reuse {tmp}/finished: its checkpoint is not of shape 1b (vocab_size 2000, not 153376; hidden_size 64, "
         "not 1536; intermediate_size 160, not 6144; num_hidden_layers 2, not 26; num_attention_heads 4, not 12; "
         "num_key_value_heads 2, not 6)"),
        (["--train-records", "9", "--reuse", "{tmp}/finished"],
         "--reuse {tmp}/finished: its data has 8 training and 2 validation records, not 9 and 2 (--train-records, "
         "--eval-records)"),
        (["--reuse", "{tmp}/stopped"],
         "--reuse {tmp}/stopped: its checkpoint and data are unfinished (no written.json: their write was stopped)"),
    ],
    ids=["missing", "other-shape", "other-records", "stopped"],
)
def test_reuse_refuses_a_folder_that_does_not_fit_in_one_line(bench_main, earlier_workdirs, capsys, argv, message):
    argv = [argument.format(tmp=earlier_workdirs) for argument in argv]
    with pytest.raises(SystemExit) as exit_status:
        bench_main([*SMOKE_RUN, *argv])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=earlier_workdirs)}\n"


def processes_naming(folder: Path) -> set[int]:
    """The processes whose command line names ``folder`` (Linux's /proc; zombies have none)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder).encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the processes from /proc")
def test_sigterm_kills_the_run_in_progress_and_keeps_the_report(tmp_path):
    # on its own, a run's process finishes its optimizer step and saves a checkpoint on SIGTERM (preemption),
    # running on after the benchmark that started it is gone
    work, out = tmp_path / "work", tmp_path / "report.json"
    bench = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--steps", "2", "--optim", "dualadam", "--packing", "on", "--train-records", "8",
         "--eval-records", "2", "--workdir", str(work), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not processes_naming(work) - {bench.pid}:
            assert bench.poll() is None and time.monotonic() < deadline, "the run's process never started"
            time.sleep(0.2)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        bench.kill()
    assert not processes_naming(work)  # the run's process went with it
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["planned_runs"] == ["dualadam, packing on"] and report["runs"] == []
    assert not (work / "run1" / "report.json").exists()

