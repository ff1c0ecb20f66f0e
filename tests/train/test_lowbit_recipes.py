"""The 8-bit recipes are their base recipes with another optimizer, and stay so when the base changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dualadam_hf.train.finetune import main as finetune

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# recipe -> (its base, the optimizer it trains with)
LOW_BIT_RECIPES = {
    "pangu_alpaca_8bit.yaml": ("pangu_alpaca.yaml", "dualadam_8bit"),
    "pangu_alpaca_adamw_8bit.yaml": ("pangu_alpaca_adamw.yaml", "adamw_torch_8bit"),
}


def load(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("recipe", LOW_BIT_RECIPES)
def test_differs_from_its_base_recipe_in_the_optimizer_only(recipe):
    base_name, optimizer = LOW_BIT_RECIPES[recipe]
    low_bit, base = load(recipe), load(base_name)
    differing = {key for key in low_bit.keys() | base.keys() if low_bit.get(key) != base.get(key)}
    assert differing == {"optim", "output_dir"}, f"{recipe} and {base_name} also differ in {differing - {'optim', 'output_dir'}}"
    assert low_bit["optim"] == optimizer


@pytest.mark.parametrize("recipe", LOW_BIT_RECIPES)
def test_dry_run(recipe, capsys, tmp_path):
    assert finetune([str(RECIPES / recipe), "--dry_run", "true", "--output_dir", str(tmp_path / "run")]) == 0
    assert f"optimizer:       {LOW_BIT_RECIPES[recipe][1]}" in capsys.readouterr().out
