"""scripts/compare.py: summaries equal the runs' logs, plots are written, bad directories are named."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dualadam_hf.analysis.compare import CompareError, compare, load_run, summarize_run
from dualadam_hf.train.records import write_run_record


def make_run(directory, optim, evals, train_losses, accuracy=False):
    directory.mkdir(parents=True)
    history = [{"loss": loss, "step": step, "dualadam_alpha": 0.5} for step, loss in train_losses]
    for step, loss, train_loss in evals:
        entry = {"eval_loss": loss, "eval_train_loss": train_loss, "eval_gen_gap": loss - train_loss, "step": step}
        entry.update({"eval_accuracy": 1 / (1 + loss)} if accuracy else {"eval_ppl": math.exp(loss)})
        history.append(entry)
    (directory / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    args = SimpleNamespace(optim=SimpleNamespace(value=optim), optim_args=None, learning_rate=1e-3, weight_decay=0.0,
                           seed=0, output_dir=str(directory))
    write_run_record(args, "vision" if accuracy else "causal_lm")
    return directory


def test_summary_values_equal_the_logs(tmp_path):
    dual = make_run(tmp_path / "dual", "dualadam", [(10, 3.0, 2.9), (20, 2.5, 2.4), (30, 2.6, 2.3)],
                    [(10, 3.1), (20, 2.6), (30, 2.2)])
    adamw = make_run(tmp_path / "adamw", "adamw_torch", [(10, 2.8, 2.5), (20, 2.9, 1.9)], [(10, 2.9), (20, 1.8)])
    summaries = compare([dual, adamw], tmp_path / "out")
    assert [s["run"] for s in summaries] == ["dual", "adamw"]
    assert summaries[0] == {
        "run": "dual", "optimizer": "dualadam", "final_eval_ppl": pytest.approx(math.exp(2.6)),
        "best_eval_ppl": pytest.approx(math.exp(2.5)), "best_step": 20,
        "final_gen_gap": pytest.approx(0.3), "final_train_loss": 2.2,
    }
    assert summaries[1]["best_step"] == 10 and summaries[1]["optimizer"] == "adamw_torch"
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summaries))
    for name in ("ppl.png", "gen_gap.png", "train_loss.png", "summary.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not (tmp_path / "out" / "accuracy.png").exists()


def test_classifier_runs_get_an_accuracy_plot(tmp_path):
    run = make_run(tmp_path / "digits", "dualadam", [(10, 1.0, 0.9), (20, 0.5, 0.4)], [(10, 1.2)], accuracy=True)
    summary = compare([run], tmp_path / "out")[0]
    assert summary["final_eval_accuracy"] == pytest.approx(1 / 1.5) and summary["final_eval_ppl"] is None
    assert (tmp_path / "out" / "accuracy.png").is_file() and not (tmp_path / "out" / "ppl.png").exists()


def test_the_final_evaluation_repeating_the_last_step_counts_once(tmp_path):
    run = make_run(tmp_path / "r", "dualadam", [(10, 3.0, 2.0), (10, 3.0, 2.0)], [(10, 3.0)])
    assert load_run(run).series("eval_ppl") == [(10, math.exp(3.0))] * 2
    assert summarize_run(load_run(run))["best_step"] == 10


def test_a_directory_without_trainer_state_is_refused_by_name_and_nothing_is_written(tmp_path):
    good = make_run(tmp_path / "good", "dualadam", [(10, 3.0, 2.0)], [(10, 3.0)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match=r"empty: no trainer_state.json"):
        compare([good, tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_script_exit_code_and_message(tmp_path):
    result = subprocess.run([sys.executable, "scripts/compare.py", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("nope: no trainer_state.json (not a finished run directory?)")


def test_runs_of_one_variant_share_a_color_and_differ_by_line_style():
    from dualadam_hf.analysis.plots import line_styles

    styles = line_styles(["dualadam/seed0", "adamw/seed0", "dualadam/seed1", "adamw/seed1", "dualadam/seed2"])
    assert {styles[f"dualadam/seed{seed}"][0] for seed in range(3)} == {"C0"}
    assert {styles[f"adamw/seed{seed}"][0] for seed in range(2)} == {"C1"}
    assert [styles[f"dualadam/seed{seed}"][1] for seed in range(3)] == ["-", "--", ":"]
    plain = line_styles(["run_a", "run_b"])
    assert plain == {"run_a": ("C0", "-"), "run_b": ("C1", "-")}


def test_a_sweeps_legend_names_each_variant_once():
    from dualadam_hf.analysis.plots import legend_labels

    names = ["dualadam/seed0", "adamw/seed0 (adamw_torch)", "dualadam/seed1", "adamw/seed1 (adamw_torch)"]
    assert legend_labels(names) == {
        "dualadam/seed0": "dualadam", "adamw/seed0 (adamw_torch)": "adamw (adamw_torch)",
        "dualadam/seed1": "_nolegend_", "adamw/seed1 (adamw_torch)": "_nolegend_",
    }
    single = ["dualadam/seed0", "adamw/seed0 (adamw_torch)"]  # one run per variant: every run is named
    assert legend_labels(single) == {name: name for name in single}
