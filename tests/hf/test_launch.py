"""The launch configuration's precision is checked against the recipe's before anything loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dualadam_hf.hf.launch import check_deepspeed_precision


def recipe(bf16=False, fp16=False, deepspeed=None):
    return SimpleNamespace(bf16=bf16, fp16=fp16, deepspeed=deepspeed)


@pytest.mark.parametrize(
    "launched,args,refused",
    [
        ("bf16", recipe(), "sets mixed_precision=bf16 but the recipe trains in fp32"),
        ("fp16", recipe(bf16=True), "sets mixed_precision=fp16 but the recipe trains in bf16"),
        ("no", recipe(bf16=True), "launch with --mixed_precision bf16, or remove bf16/fp16 from the recipe"),
        ("bf16", recipe(bf16=True), None),
        ("no", recipe(), None),
    ],
)
def test_accelerate_launch_precision_under_deepspeed(monkeypatch, launched, args, refused):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    if refused is None:
        check_deepspeed_precision(args)
        return
    with pytest.raises(ValueError, match=refused):
        check_deepspeed_precision(args)


def test_without_deepspeed_the_recipe_decides(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    check_deepspeed_precision(recipe())


@pytest.mark.parametrize(
    "block,refused",
    [({"bf16": {"enabled": True}}, "the DeepSpeed config sets mixed_precision=bf16"), ({"bf16": {"enabled": "auto"}}, None)],
)
def test_an_explicit_precision_in_the_deepspeed_json(tmp_path, monkeypatch, block, refused):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **block}))
    if refused is None:
        check_deepspeed_precision(recipe(deepspeed=str(path)))
        return
    with pytest.raises(ValueError, match=refused):
        check_deepspeed_precision(recipe(deepspeed=str(path)))
