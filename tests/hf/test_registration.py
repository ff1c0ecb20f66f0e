"""optim="dualadam" in stock transformers: TrainingArguments, HfArgumentParser, JSON, Trainer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers
from tiny_lm import tiny_llama, training_kwargs
from transformers import HfArgumentParser, Trainer, TrainingArguments

from dualadam_hf import DualAdam, DualAdam4bit, DualAdam8bit, InvAdam, InvAdam4bit, InvAdam8bit
from dualadam_hf.hf import registration


def test_internals_are_where_registration_expects():
    # If this fails after a transformers upgrade, its message says what moved and what to do instead.
    registration.check_internals()


def test_training_arguments_accept_our_names(tmp_path):
    for name in ("dualadam", "invadam", "dualadam_8bit", "dualadam_4bit", "invadam_8bit", "invadam_4bit"):
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, report_to="none")
        assert args.optim.value == name


def test_unknown_optimizer_names_are_still_refused(tmp_path):
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):
        TrainingArguments(output_dir=str(tmp_path), optim="dualadamm", report_to="none")


def test_hf_argument_parser_takes_optim_dualadam(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "dualadam", "--optim_args", "switch_rate=1e-3", "--report_to", "none"]
    )
    assert args.optim.value == "dualadam" and args.optim_args == "switch_rate=1e-3"


def test_json_round_trip(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="dualadam", report_to="none")
    as_json = json.loads(args.to_json_string())
    assert as_json["optim"] == "dualadam" and args.to_dict()["optim"] == "dualadam"
    init_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    again = TrainingArguments(**{k: v for k, v in as_json.items() if k in init_fields})
    assert again.optim == args.optim


def test_stock_trainer_builds_dualadam_with_hf_groups(tmp_path, train_set):
    args = TrainingArguments(
        **training_kwargs(tmp_path, learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                          weight_decay=0.1, optim_args="switch_rate=0.002")
    )
    model = tiny_llama()
    trainer = Trainer(model=model, args=args, train_dataset=train_set)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is DualAdam
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-3 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
        assert group["switch_rate"] == 0.002
        for p in group["params"]:
            no_decay = "norm" in names[id(p)] or names[id(p)].endswith("bias")
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), names[id(p)]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}


def test_stock_trainer_builds_invadam(tmp_path, train_set):
    args = TrainingArguments(**training_kwargs(tmp_path, optim="invadam"))
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=train_set)
    assert type(trainer.create_optimizer()) is InvAdam


def test_moved_internals_give_a_plain_message(monkeypatch):
    monkeypatch.delattr(transformers.trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(registration.TransformersInternalsChanged, match=r"_OPTIMIZER_HANDLERS is missing.*tested with"):
        registration.check_internals()


def test_registration_is_idempotent():
    registration.register()
    registration.register()
    from transformers.training_args import OptimizerNames

    assert [m.value for m in OptimizerNames].count("dualadam") == 1


LOW_BIT = {"dualadam_8bit": DualAdam8bit, "dualadam_4bit": DualAdam4bit, "invadam_8bit": InvAdam8bit,
           "invadam_4bit": InvAdam4bit}


@pytest.mark.parametrize("name", LOW_BIT)
def test_stock_trainer_builds_the_low_bit_optimizers_with_hf_groups(name, tmp_path, train_set):
    optim_args = "block_size=64" + (",switch_rate=0.002" if name.startswith("dualadam") else "")
    args = TrainingArguments(**training_kwargs(tmp_path, optim=name, weight_decay=0.1, optim_args=optim_args))
    optimizer = Trainer(model=tiny_llama(), args=args, train_dataset=train_set).create_optimizer()
    assert type(optimizer) is LOW_BIT[name] and optimizer.block_size == 64
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}  # HF's no-decay group
    assert {g["switch_rate"] for g in optimizer.param_groups} == {0.002 if name.startswith("dualadam") else 0.0}
