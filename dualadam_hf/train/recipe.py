"""Recipes: a flat YAML file of dataclass field names sets defaults; command-line flags win.

``parse_recipe`` turns ``RECIPE.yaml [--key value ...]`` into the given dataclasses. Every user
mistake (a missing file, an unknown or misspelt key, a value of the wrong type, a value a dataclass
refuses) raises ``RecipeError`` with one line that names the culprit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


class RecipeError(ValueError):
    """A problem with the recipe or the command line; the message is one line naming the culprit."""


class _RecipeParser(HfArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit 2
        raise RecipeError(message)


def _known_keys(dataclass_types: Sequence[type]) -> list[str]:
    return [f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init]


def _unknown_key_message(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown key {key!r}{hint}"


def recipe_argv(values: dict[str, Any], single: Collection[str] = ()) -> list[str]:
    """YAML values as command-line tokens, so argparse converts and checks both sources alike.

    A list is given item by item, except for the keys in ``single``, whose option takes one value: there it
    is joined with commas, the form ``report_to`` and ``optim_args`` take on the command line.
    """
    argv: list[str] = []
    for key, value in values.items():
        if value is None:  # null keeps the field's default
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, list) and key in single:
            argv += [f"--{key}", ",".join(str(item) for item in value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *(str(item) for item in value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def load_recipe_file(path: Path, known: list[str] | None) -> dict[str, Any]:
    """The recipe's key: value mapping; with ``known``, an unknown key is refused by name."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if path.suffix not in (".yaml", ".yml"):
        raise RecipeError(f"{path}: a recipe is a .yaml file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: expected a flat mapping of key: value")
    for key in values:
        if known is not None and key not in known:
            raise RecipeError(_unknown_key_message(str(key), known, str(path)))
    return values


def _single_valued(parser: argparse.ArgumentParser) -> set[str]:
    """The keys whose option takes one value (``report_to``: ``str | list[str]`` becomes a plain string)."""
    return {
        action.option_strings[0][2:]
        for action in parser._actions
        if action.option_strings and action.nargs in (None, "?")
    }


def parse_recipe(
    dataclass_types: Sequence[type], argv: Sequence[str], *, prog: str, description: str
) -> tuple[Any, ...]:
    """``argv`` = ``[RECIPE.yaml, --key, value, ...]`` -> one instance of each dataclass.

    ``--help`` (or no argument) prints the usage and every field's help and exits 0.
    """
    parser = _RecipeParser(
        dataclass_types,
        prog=prog,
        description=description,
        usage=f"{prog} RECIPE.yaml [--key value ...]",
        allow_abbrev=False,  # a misspelt prefix must not silently pick a field
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0)
    known = _known_keys(dataclass_types)
    recipe_path = Path(argv[0])
    values = load_recipe_file(recipe_path, known)
    command_line = list(argv[1:])
    for token in command_line:
        if token.startswith("--") and token[2:].split("=", 1)[0] not in known and token not in ("--help",):
            raise RecipeError(_unknown_key_message(token[2:].split("=", 1)[0], known, "command line"))
    try:
        return parser.parse_args_into_dataclasses(
            args=recipe_argv(values, _single_valued(parser)) + command_line, look_for_args_file=False
        )
    except RecipeError:
        raise
    except (ValueError, TypeError) as error:  # a dataclass's __post_init__ refusing a value
        raise RecipeError(str(error).strip().splitlines()[0]) from None


def parse_for_this_machine(
    argument_types: Sequence[type], argv: Sequence[str], *, prog: str, description: str
) -> tuple[tuple[Any, ...], str]:
    """parse_recipe, except that a dry run of a bf16 GPU recipe also works on a machine without one.

    TrainingArguments refuses bf16 where no GPU supports it; a dry run loads nothing and trains
    nothing, so it checks the recipe as if on the CPU and says so.
    """
    try:
        return parse_recipe(argument_types, argv, prog=prog, description=description), ""
    except RecipeError as error:
        if "bf16/gpu" not in str(error) or not wants_dry_run(argv):
            raise
    parsed = parse_recipe(argument_types, [*argv, "--use_cpu", "true"], prog=prog, description=description)
    return parsed, "\nnote:            bf16 needs a GPU that supports it; this machine has none (dry run checked on CPU)"


def wants_dry_run(argv: Sequence[str]) -> bool:
    """Whether the recipe or the command line sets dry_run (read without the other fields' checks)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dry_run", type=string_to_bool, nargs="?", const=True, default=False)
    recipe_value = load_recipe_file(Path(argv[0]), None).get("dry_run")
    known, _ = parser.parse_known_args(recipe_argv({"dry_run": recipe_value}) + list(argv[1:]))
    return bool(known.dry_run)
