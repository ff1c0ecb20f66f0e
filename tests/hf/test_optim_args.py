from __future__ import annotations

import pytest
from tiny_lm import tiny_llama, training_kwargs

from dualadam_hf import DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.hf.optim_args import check_optimizer_settings, parse_optim_args, resolve_switch_ratio
from dualadam_hf.hf.registration import optimizer_kwargs


def test_each_key_is_parsed_to_its_type():
    assert parse_optim_args("dualadam", "switch_rate=1e-3") == dict(switch_rate=1e-3)
    assert parse_optim_args("dualadam", "schedule=exponential, switch_base=0.99") == dict(
        schedule="exponential", switch_base=0.99
    )
    parsed = parse_optim_args("dualadam", "schedule=step,switch_step=100")
    assert parsed == dict(schedule="step", switch_step=100) and isinstance(parsed["switch_step"], int)
    assert parse_optim_args("dualadam", "switch_ratio=0.25") == dict(switch_ratio=0.25)
    assert parse_optim_args("dualadam", "inv_scale=adam_rms") == dict(inv_scale="adam_rms")


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key 'swich_rate' for optim=dualadam; valid keys: inv_scale, "
                                         r"schedule, switch_base, switch_rate, switch_ratio, switch_step"):
        parse_optim_args("dualadam", "swich_rate=1e-3")


@pytest.mark.parametrize(
    "text,message",
    [
        ("switch_rate=fast", r"switch_rate='fast' is not a float >= 0"),
        ("switch_step=1.5", r"switch_step='1.5' is not an integer >= 0"),
        ("schedule=cosine", r"schedule='cosine' is not one of linear, exponential, step"),
        ("inv_scale=rms", r"inv_scale='rms' is not one of none, adam_rms"),
        ("switch_ratio=1.5", r"switch_ratio=1.5 is not a float in \(0, 1\]"),
        ("switch_rate=1e-3,switch_ratio=0.5", "give switch_rate or switch_ratio, not both"),
        ("switch_rate", r"'switch_rate' is not of the form key=value"),
    ],
)
def test_bad_values_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_optim_args("dualadam", text)


def test_invadam_takes_no_switch_keys():
    with pytest.raises(ValueError, match="unknown key 'switch_rate' for optim=invadam; valid keys: none"):
        parse_optim_args("invadam", "switch_rate=0.1")


def test_switch_ratio_resolves_against_the_run_length():
    assert resolve_switch_ratio(dict(switch_ratio=0.5), 20) == dict(switch_rate=0.1)
    with pytest.raises(ValueError, match="switch_ratio needs the run's total number of optimizer steps"):
        resolve_switch_ratio(dict(switch_ratio=0.5), None)


def test_trainer_refuses_a_misspelt_key_before_training(tmp_path, train_set):
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="switch_rat=0.1"))
    with pytest.raises(ValueError, match="unknown key 'switch_rat'"):
        DualAdamTrainer(model=tiny_llama(), args=args, train_dataset=train_set)


@pytest.mark.parametrize("how", ["deepspeed_argument", "accelerate_deepspeed", "accelerate_fsdp"])
def test_rescaled_invadam_term_is_refused_where_the_optimizer_holds_shards(how, tmp_path, monkeypatch):
    # each shard would be rescaled to its own norm: not the same optimizer as on one process
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="inv_scale=adam_rms"))
    check_optimizer_settings("dualadam", args)  # one process, or DDP: fine
    sharding = "FSDP" if how == "accelerate_fsdp" else "DeepSpeed"
    if how == "deepspeed_argument":
        monkeypatch.setattr(args, "deepspeed", "ds_config.json")
    else:
        monkeypatch.setenv(f"ACCELERATE_USE_{sharding.upper()}", "true")
    for check in (check_optimizer_settings, optimizer_kwargs):  # DualAdamTrainer's check; the stock Trainer's handler
        with pytest.raises(ValueError, match=f"inv_scale=adam_rms rescales per whole tensor, but {sharding} hands"):
            check("dualadam", args)
    args.optim_args = "switch_rate=0.1"
    check_optimizer_settings("dualadam", args)  # sharding itself is fine
