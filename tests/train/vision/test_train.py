import json
from pathlib import Path

import datasets
import pytest

from dualadam_hf.analysis.compare import compare
from dualadam_hf.train.vision.train import main

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
DIGITS = str(RECIPES / "vision_digits.yaml")
# Chance is 0.10 on ten balanced classes; 40 steps of the digits recipe reach 0.885 (validation) here.
WELL_ABOVE_CHANCE = 0.6
SHORT_RUN = ["--max_steps", "40", "--logging_steps", "10", "--eval_steps", "10"]


def log_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Two short runs of the digits recipe: DualAdam as reciped, and AdamW with the paper's weight decay."""
    root = tmp_path_factory.mktemp("digits")
    runs = {"dualadam": root / "dualadam", "adamw": root / "adamw"}
    codes = {
        "dualadam": main([DIGITS, *SHORT_RUN, "--output_dir", str(runs["dualadam"])]),
        "adamw": main([DIGITS, *SHORT_RUN, "--optim", "adamw_torch", "--optim_args", "", "--weight_decay", "0.01",
                       "--output_dir", str(runs["adamw"])]),
    }
    return runs, codes


def test_digits_recipe_learns_and_reports_every_metric(digits_runs):
    runs, codes = digits_runs
    assert codes["dualadam"] == 0
    history = log_history(runs["dualadam"])
    evals = [entry for entry in history if "eval_loss" in entry]
    # the run's final evaluation is the Trainer's own at step 40, not a second one of the same model
    assert [entry["step"] for entry in evals] == [10, 20, 30, 40]
    for entry in evals:
        assert {"eval_accuracy", "eval_loss", "eval_train_loss", "eval_gen_gap"} <= entry.keys()
        assert entry["eval_gen_gap"] == pytest.approx(entry["eval_loss"] - entry["eval_train_loss"])
    assert evals[-1]["eval_accuracy"] > WELL_ABOVE_CHANCE
    train_logs = [entry for entry in history if "loss" in entry]
    assert len(train_logs) == 4 and all("dualadam_alpha" in entry for entry in train_logs)
    assert train_logs[-1]["dualadam_alpha"] == 0.0  # switch_ratio 0.3 of 40 steps: alpha is 0 from step 12 on

    results = json.loads((runs["dualadam"] / "all_results.json").read_text())
    assert results["test_accuracy"] > WELL_ABOVE_CHANCE and results["test_loss"] > 0
    assert results["eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert any("test_accuracy" in entry for entry in history)
    config = json.loads((runs["dualadam"] / "run_config.json").read_text())
    assert config["optim"] == "dualadam" and config["dataset"] == "sklearn:digits" and config["num_classes"] == 10
    assert (runs["dualadam"] / "model.safetensors").is_file()


def test_compare_plots_accuracy_and_summarizes_both_optimizers(digits_runs, tmp_path):
    runs, codes = digits_runs
    assert codes == {"dualadam": 0, "adamw": 0}
    summaries = compare([runs["dualadam"], runs["adamw"]], tmp_path / "compare")
    assert (tmp_path / "compare" / "accuracy.png").is_file()
    assert not (tmp_path / "compare" / "ppl.png").exists()
    written = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert written == summaries
    for summary, (optimizer, run_dir) in zip(written, [("dualadam", runs["dualadam"]), ("adamw_torch", runs["adamw"])]):
        history = log_history(run_dir)
        accuracies = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
        assert summary["optimizer"] == optimizer
        assert summary["final_eval_accuracy"] == accuracies[-1]
        assert summary["best_eval_accuracy"] == max(accuracies)
        assert summary["final_gen_gap"] == [entry["eval_gen_gap"] for entry in history if "eval_gen_gap" in entry][-1]
        assert summary["final_train_loss"] == [entry["loss"] for entry in history if "loss" in entry][-1]
        assert summary["test_accuracy"] == [entry["test_accuracy"] for entry in history if "test_accuracy" in entry][-1]


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub must not be touched")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize(
    "recipe, extra, expected",
    [
        ("vision_cifar.yaml", [], ["uoft-cs/cifar100, 100 classes", "optimizer:       dualadam",
                                   "xi = 8e-05: alpha reaches 0 at step 12500"]),
        ("vision_cifar.yaml", ["--dataset_name", "uoft-cs/cifar10"], ["uoft-cs/cifar10, 10 classes"]),
        ("vision_cifar_adamw.yaml", [], ["uoft-cs/cifar100, 100 classes", "optimizer:       adamw_torch_fused",
                                         "weight decay 0.01"]),
    ],
)
def test_cifar_dry_run_describes_the_paper_settings_offline(recipe, extra, expected, no_hub, tmp_path, capsys):
    output_dir = tmp_path / "never_written"
    assert main([str(RECIPES / recipe), "--dry_run", "true", "--output_dir", str(output_dir), *extra]) == 0
    printed = capsys.readouterr().out
    for text in [
        "resnet18_cifar",
        "lr 0.01, betas (0.9, 0.999), eps 1e-08",
        "cosine_with_min_lr min_lr_rate 0.001",
        "128 per device",
        "200 epochs",
        "bf16 mixed",
        str(output_dir),
        *expected,
    ]:
        assert text in printed
    assert not output_dir.exists()


def test_cifar_run_without_the_hub_fails_in_one_line(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar100' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    output_dir = tmp_path / "run"
    code = main([str(RECIPES / "vision_cifar.yaml"), "--bf16", "false", "--use_cpu", "true",
                 "--output_dir", str(output_dir)])
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert error == "error: cannot load dataset 'uoft-cs/cifar100': Couldn't reach 'uoft-cs/cifar100' on the Hub " \
                    "(OfflineModeIsEnabled)"
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "argv_tail, recipe_text, named",
    [
        (["--learning_rat", "0.1"], None, "'learning_rat' (did you mean 'learning_rate'?)"),
        ([], "model_name: digits_net\nmodle_name: resnet18_cifar\n", "'modle_name'"),
        (["--model_name", "vgg16"], None, "model_name must be one of resnet18_cifar, digits_net, got 'vgg16'"),
        (["--model_name", "digits_net", "--dataset_name", "uoft-cs/cifar10"], None, "digits_net takes 8x8"),
        (["--dataset_name", "sklearn:iris"], None, "the only built-in dataset is 'sklearn:digits'"),
    ],
)
def test_bad_configuration_is_refused_in_one_line(argv_tail, recipe_text, named, no_hub, tmp_path, capsys):
    recipe = DIGITS
    if recipe_text is not None:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(recipe_text)
    assert main([str(recipe), *argv_tail, "--output_dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
