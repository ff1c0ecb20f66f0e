"""Recipe parsing: YAML sets defaults, the command line wins, mistakes are named in one line."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dualadam_hf.hf.trainer import DualAdamTrainingArguments
from dualadam_hf.train.recipe import RecipeError, parse_recipe, wants_dry_run


@dataclass
class Model:
    model_name_or_path: str = "tiny"
    trust_remote_code: bool = False
    target_modules: list[str] | None = field(default=None)


TYPES = (Model, DualAdamTrainingArguments)


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def parse(argv):
    return parse_recipe(TYPES, argv, prog="test", description="")


BASE = "output_dir: {out}\nreport_to: none\nuse_cpu: true\n"


def test_yaml_sets_values_and_the_command_line_wins(tmp_path):
    recipe = write(tmp_path, BASE.format(out=tmp_path) + "learning_rate: 1.0e-4\ntrust_remote_code: true\n"
                   "optim: dualadam\nlr_scheduler_kwargs: {min_lr_rate: 0.001}\ntarget_modules: [q_proj, v_proj]\n")
    model, args = parse([recipe, "--learning_rate", "3e-3"])
    assert args.learning_rate == 3e-3
    assert model.trust_remote_code is True and model.target_modules == ["q_proj", "v_proj"]
    assert args.optim.value == "dualadam" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.001}
    model, args = parse([recipe, "--trust_remote_code", "false"])
    assert model.trust_remote_code is False and args.learning_rate == 1e-4


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-5 as a string; the value still reaches the field as a float
    _, args = parse([write(tmp_path, BASE.format(out=tmp_path) + "learning_rate: 1e-5\n")])
    assert args.learning_rate == 1e-5


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    recipe = write(tmp_path, BASE.format(out=tmp_path) + "learnig_rate: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\)"):
        parse([recipe])


def test_unknown_flag_is_named(tmp_path):
    recipe = write(tmp_path, BASE.format(out=tmp_path))
    with pytest.raises(RecipeError, match="command line: unknown key 'trust_remote'"):
        parse([recipe, "--trust_remote", "true"])


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    recipe = write(tmp_path, BASE.format(out=tmp_path) + "learning_rate: fast\n")
    with pytest.raises(RecipeError, match=r"--learning_rate.*invalid float value: 'fast'"):
        parse([recipe])
    with pytest.raises(RecipeError, match=r"--per_device_train_batch_size.*invalid int value: '8.5'"):
        parse([write(tmp_path, BASE.format(out=tmp_path)), "--per_device_train_batch_size", "8.5"])


def test_a_value_a_dataclass_refuses_is_one_line(tmp_path):
    recipe = write(tmp_path, BASE.format(out=tmp_path) + "train_eval_samples: -1\n")
    with pytest.raises(RecipeError, match="train_eval_samples must be >= 0, got -1") as error:
        parse([recipe])
    assert "\n" not in str(error.value)


def test_a_misspelt_optimizer_is_named_with_ours_among_the_choices(tmp_path):
    recipe = write(tmp_path, BASE.format(out=tmp_path) + "optim: dualadamm\n")
    with pytest.raises(RecipeError, match=r"--optim: invalid choice: 'dualadamm' \(choose from .*'dualadam', 'invadam'"):
        parse([recipe])


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("missing.yaml", None, "recipe file not found"),
        ("recipe.json", "{}", "a recipe is a .yaml file"),
        ("recipe.yaml", "- a\n- b\n", "expected a flat mapping"),
        ("recipe.yaml", "a: [\n", "not valid YAML at line"),
    ],
)
def test_bad_recipe_files(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        parse([str(path)])


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    assert "RECIPE.yaml [--key value ...]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "recipe_line,flags,expected",
    [("", [], False), ("dry_run: true\n", [], True), ("", ["--dry_run"], True),
     ("dry_run: true\n", ["--dry_run", "false"], False), ("", ["--dry_run", "true", "--seed", "1"], True)],
)
def test_wants_dry_run(tmp_path, recipe_line, flags, expected):
    assert wants_dry_run([write(tmp_path, recipe_line), *flags]) is expected
