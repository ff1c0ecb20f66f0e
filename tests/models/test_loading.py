"""Loading a causal LM: what reaches transformers' from_pretrained, and the one-line refusals before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_runs import dry_run_in

from dualadam_hf.models import loading
from dualadam_hf.models.loading import ModelLoadError, load_causal_lm
from dualadam_hf.train.finetune import ModelArguments, load_model_and_tokenizer
from dualadam_hf.train.finetune import main as finetune

RECIPES = sorted(Path("recipes").glob("pangu_alpaca*.yaml"))


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """The keyword arguments of every AutoModelForCausalLM.from_pretrained call, which then runs as usual."""
    from transformers import AutoModelForCausalLM

    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


def test_hub_kernels_are_off_unless_asked_and_transformers_is_told_so(tiny_openpangu, from_pretrained_calls):
    """transformers >= 5.2 turns the Hub's kernels on when use_kernels is not given: ours always gives it."""
    model, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_openpangu)), seed=0)
    assert from_pretrained_calls[-1]["use_kernels"] is False
    assert not model.use_kernels
    model.train()  # where transformers would kernelize for training
    assert not model.use_kernels


def test_use_kernels_from_the_recipe_reaches_from_pretrained(tiny_openpangu, monkeypatch, from_pretrained_calls):
    monkeypatch.setattr(loading, "check_hub_kernels", lambda use_kernels: None)  # the Hub's state does not matter here
    model_args = ModelArguments(model_name_or_path=str(tiny_openpangu), use_kernels=True)
    model, _ = load_model_and_tokenizer(model_args, seed=0)  # on the CPU no Hub kernel applies: nothing is fetched
    assert from_pretrained_calls[-1]["use_kernels"] is True and model.use_kernels


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_the_openpangu_recipes_say_use_kernels_false(recipe):
    assert yaml.safe_load(recipe.read_text(encoding="utf-8"))["use_kernels"] is False


def test_use_kernels_offline_is_refused_in_one_line_before_loading(tiny_openpangu, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    with pytest.raises(ModelLoadError, match="^use_kernels: true .* the Hub is offline .* set use_kernels: false"):
        load_causal_lm(str(tiny_openpangu), trust_remote_code=False, use_kernels=True)
    assert finetune([str(RECIPES[0]), "--model_name_or_path", str(tiny_openpangu), *dry_run_in(tmp_path),
                     "--use_kernels", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: use_kernels: true") and err.count("\n") == 1 and "Traceback" not in err
    assert finetune([str(RECIPES[0]), "--model_name_or_path", str(tiny_openpangu), *dry_run_in(tmp_path)]) == 0
    assert "hub kernels off" in capsys.readouterr().out
