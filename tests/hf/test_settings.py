from __future__ import annotations

import re

import pytest
from tiny_lm import tiny_llama, training_kwargs
from tiny_runs import dry_run_in
from transformers import TrainingArguments

from dualadam_hf import DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.hf.registration import optimizer_kwargs
from dualadam_hf.hf import settings as settings_module
from dualadam_hf.hf.settings import OptimSettings, settings_of


def parse(optim_args: str, optimizer: str = "dualadam") -> OptimSettings:
    return OptimSettings.parse(optimizer, optim_args)


def test_each_key_is_parsed_to_its_type():
    assert parse("switch_rate=1e-3").switch_rate == 1e-3
    exponential = parse("schedule=exponential, switch_base=0.99")
    assert (exponential.schedule, exponential.switch_base) == ("exponential", 0.99)
    step = parse("schedule=step,switch_step=100")
    assert step.switch_step == 100 and isinstance(step.switch_step, int)
    assert parse("switch_ratio=0.25").switch_ratio == 0.25
    assert parse("inv_scale=adam_rms").inv_scale == "adam_rms"
    assert parse("") == OptimSettings("dualadam", "")  # every key at the optimizer's default


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        parse("switch_rate=1e-3").switch_rate = 0.5


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key 'swich_rate' for optim=dualadam; valid keys: inv_scale, "
                                         r"schedule, switch_base, switch_rate, switch_ratio, switch_step"):
        parse("swich_rate=1e-3")


@pytest.mark.parametrize(
    "text,message",
    [
        ("switch_rate=fast", r"switch_rate='fast' is not a finite float >= 0"),
        ("switch_rate=inf", r"switch_rate='inf' is not a finite float >= 0"),
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
        parse(text)


def test_invadam_takes_no_switch_keys():
    with pytest.raises(ValueError, match="unknown key 'switch_rate' for optim=invadam; valid keys: none"):
        parse("switch_rate=0.1", "invadam")


def test_switch_ratio_resolves_against_the_run_length():
    assert parse("switch_ratio=0.5").optimizer_kwargs(20) == dict(schedule="linear", inv_scale="none", switch_rate=0.1)
    with pytest.raises(ValueError, match="switch_ratio needs the run's total number of optimizer steps"):
        parse("switch_ratio=0.5").optimizer_kwargs(None)
    assert parse("", "invadam").optimizer_kwargs(None) == {}


def test_training_arguments_parse_once_and_everything_reads_that(tmp_path, monkeypatch):
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="switch_rate=1e-3"))
    assert args.optim_settings == OptimSettings("dualadam", "switch_rate=1e-3", switch_rate=1e-3)

    def no_second_parse(*arguments, **keywords):
        raise AssertionError("optim_args parsed again")

    monkeypatch.setattr(OptimSettings, "parse", no_second_parse)
    assert settings_of(args) is args.optim_settings
    assert optimizer_kwargs("dualadam", args)["switch_rate"] == 1e-3
    DualAdamTrainer(model=tiny_llama(), args=args)


def test_a_dualadam_recipe_run_with_another_optimizer_drops_its_keys_and_says_so(tmp_path):
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="switch_ratio=0.3", optim="invadam"))
    assert args.optim_args is None and args.optim_settings == OptimSettings("invadam", None)
    assert args.optim_args_note == "optim_args 'switch_ratio=0.3' are DualAdam's; not used by invadam"
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="switch_ratio=0.3", optim="adamw_torch"))
    assert args.optim_args is None and args.optim_settings is None


def test_a_misspelt_key_is_refused_before_training(tmp_path, train_set):
    with pytest.raises(ValueError, match="unknown key 'switch_rat'"):  # at construction
        DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="switch_rat=0.1"))
    stock = TrainingArguments(**training_kwargs(tmp_path, optim_args="switch_rat=0.1"))
    with pytest.raises(ValueError, match="unknown key 'switch_rat'"):  # a stock TrainingArguments: by the Trainer
        DualAdamTrainer(model=tiny_llama(), args=stock, train_dataset=train_set)


@pytest.mark.parametrize("how", ["deepspeed_argument", "accelerate_deepspeed", "accelerate_fsdp"])
def test_rescaled_invadam_term_is_refused_where_the_optimizer_holds_shards(how, tmp_path, monkeypatch):
    # each shard would be rescaled to its own norm: not the same optimizer as on one process
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="inv_scale=adam_rms"))
    check_settings = OptimSettings.from_training_args
    check_settings(args)  # one process, or DDP: fine
    sharding = "FSDP" if how == "accelerate_fsdp" else "DeepSpeed"
    if how == "deepspeed_argument":
        monkeypatch.setattr(args, "deepspeed", "ds_config.json")
    else:
        monkeypatch.setenv(f"ACCELERATE_USE_{sharding.upper()}", "true")
    with pytest.raises(ValueError, match=f"inv_scale=adam_rms rescales per whole tensor, but {sharding} hands"):
        check_settings(args)  # what DualAdamTrainingArguments does at construction
    args.optim_settings = None  # a stock TrainingArguments: the handler parses and checks
    with pytest.raises(ValueError, match=f"inv_scale=adam_rms rescales per whole tensor, but {sharding} hands"):
        optimizer_kwargs("dualadam", args)
    args.optim_args = "switch_rate=0.1"
    check_settings(args)  # sharding itself is fine


UNKNOWN = "unknown key 'switch_rat' for optim=dualadam; valid keys: inv_scale, schedule"


def test_every_entry_point_names_the_misspelt_key_with_the_one_parser(tmp_path, capsys):
    from transformers import Trainer

    from dualadam_hf.train.finetune import main as finetune
    from dualadam_hf.train.vision.train import main as train_vision

    for script, recipe in ((finetune, "recipes/tiny_alpaca.yaml"), (train_vision, "recipes/vision_digits.yaml")):
        assert script([recipe, *dry_run_in(tmp_path), "--optim_args", "switch_rat=0.1"]) == 2
        assert UNKNOWN in capsys.readouterr().err
    with pytest.raises(ValueError, match=UNKNOWN):
        DualAdamTrainingArguments(**training_kwargs(tmp_path, optim_args="switch_rat=0.1"))
    stock = TrainingArguments(**training_kwargs(tmp_path, optim_args="switch_rat=0.1"))
    with pytest.raises(ValueError, match=UNKNOWN):
        DualAdamTrainer(model=tiny_llama(), args=stock)
    with pytest.raises(ValueError, match=UNKNOWN):  # the stock Trainer, through the registered handler
        Trainer(model=tiny_llama(), args=stock).create_optimizer()


def test_low_bit_optimizers_take_dualadams_keys_and_torchaos():
    settings = parse("switch_ratio=0.3, block_size=64, bf16_stochastic_round=true", "dualadam_4bit")
    assert (settings.switch_ratio, settings.block_size, settings.bf16_stochastic_round) == (0.3, 64, True)
    assert settings.optimizer_kwargs(total_steps=10) == dict(
        schedule="linear", inv_scale="none", switch_rate=1.0 / 3.0, block_size=64, bf16_stochastic_round=True
    )
    assert parse("block_size=64", "invadam_8bit").optimizer_kwargs(None) == dict(block_size=64)


@pytest.mark.parametrize(
    "optimizer,text,message",
    [
        ("dualadam_8bit", "block_size=0", "optim_args: block_size=0 is not a positive integer (even for 4-bit state)"),
        ("dualadam_4bit", "block_size=63", "optim_args: block_size=63 is not a positive integer (even for 4-bit state)"),
        ("dualadam_8bit", "bf16_stochastic_round=yes", "optim_args: bf16_stochastic_round='yes' is not true or false"),
        ("dualadam", "block_size=64", "optim_args: unknown key 'block_size' for optim=dualadam"),
        ("invadam_4bit", "switch_rate=0.1", "optim_args: unknown key 'switch_rate' for optim=invadam_4bit"),
    ],
)
def test_bad_low_bit_values_are_named(optimizer, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text, optimizer)


def test_an_invadam_twin_on_a_dualadam_recipe_drops_the_switch_keys(tmp_path):
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim="invadam_8bit", optim_args="switch_ratio=0.3"))
    assert args.optim_args is None and "not used by invadam_8bit" in args.optim_args_note


@pytest.mark.parametrize("how", ["deepspeed_argument", "accelerate_deepspeed"])
def test_low_bit_state_is_refused_under_deepspeed_in_one_line(how, tmp_path, monkeypatch):
    if how == "deepspeed_argument":
        args = DualAdamTrainingArguments(**training_kwargs(tmp_path, optim="dualadam_8bit"))
        monkeypatch.setattr(args, "deepspeed", "ds_config.json")
    else:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        args = None
    message = ("optim: dualadam_8bit keeps its state quantized per tensor, but DeepSpeed ZeRO hands the optimizer "
               "flat partitions of many tensors; use DDP or FSDP2")
    with pytest.raises(ValueError, match=re.escape(message)):
        if args is None:
            DualAdamTrainingArguments(**training_kwargs(tmp_path, optim="dualadam_8bit"))
        else:
            OptimSettings.from_training_args(args)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    DualAdamTrainingArguments(**training_kwargs(tmp_path, optim="dualadam_8bit"))  # FSDP2: fine


def test_a_missing_torchao_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    from dualadam_hf.train.finetune import main as finetune

    monkeypatch.setattr(settings_module, "missing_dependency", lambda: "torchao is not installed")
    out = tmp_path / "run"
    assert finetune(["recipes/tiny_alpaca.yaml", "--dry_run", "true", "--optim", "dualadam_8bit",
                     "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: optim: dualadam_8bit needs torchao: torchao is not installed" and not out.exists()
