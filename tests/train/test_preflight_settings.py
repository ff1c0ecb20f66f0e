"""Settings refused before anything is loaded, dry run included, and data checked when it is prepared."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers.integrations import integration_utils

from dualadam_hf.models.tiny import TINY_LLAMA
from dualadam_hf.train.finetune import ModelArguments, load_model_and_tokenizer, main
from dualadam_hf.train.sft_data import DataArguments, DataError, load_records, prepare_datasets
from tiny_runs import TINY, dry_run_in, one_error_line


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--report_to", "wandb"], "report_to wandb: not installed or not set up here (transformers' is_wandb_avail"),
        (["--report_to", "tensorboard,wandb"], "report_to wandb: not installed"),
        (["--report_to", "tensorbord"], "report_to 'tensorbord': unknown; known: azure_ml, clearml,"),
        (["--report_to", "tensorboard,none"], "report_to 'none' stands alone; it cannot be listed with other reporters"),
        (["--max_steps", "0"], "max_steps 0 trains nothing; set max_steps to the number of optimizer steps, or -1"),
        (["--max_steps", "0", "--optim", "adamw_torch"], "max_steps 0 trains nothing"),
        (["--num_train_epochs", "0"], "num_train_epochs 0 trains nothing; set num_train_epochs above 0"),
        (["--fp16", "true"], "fp16 needs a GPU: on the CPU the run would train in fp32; set bf16: true"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_settings_the_trainer_would_fail_on_or_ignore_are_refused_first(tmp_path, capsys, monkeypatch, no_loading,
                                                                         flags, message, dry_run):
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)  # whatever this machine has
    before = sorted(os.listdir(tmp_path))
    assert main([TINY, "--output_dir", str(tmp_path / "run"), *flags, "--dry_run", str(dry_run).lower()]) == 2
    assert message in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_comma_joined_report_to_is_a_list_of_reporters(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    assert main([TINY, *dry_run_in(tmp_path), "--report_to", "tensorboard, wandb"]) == 0
    assert "reporting to:    tensorboard, wandb\n" in capsys.readouterr().out


def test_yaml_lists_for_single_valued_keys_are_comma_joined(tmp_path, capsys, monkeypatch):
    # report_to is str | list[str] in TrainingArguments, one value on the command line: a YAML list used to
    # leave its second item over, refused as "not used by the HfArgumentParser"
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    recipe = Path(TINY).read_text(encoding="utf-8").splitlines()
    kept = [line for line in recipe if not line.startswith(("report_to:", "optim_args:"))]
    lists = ["report_to:", "  - tensorboard", "  - wandb", "optim_args: [switch_ratio=0.3, inv_scale=adam_rms]"]
    listed = tmp_path / "listed.yaml"
    listed.write_text("\n".join(kept + lists) + "\n", encoding="utf-8")
    assert main([str(listed), *dry_run_in(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reporting to:    tensorboard, wandb\n" in out and "inv_scale adam_rms: the InvAdam term" in out


def test_a_dry_run_of_an_fp16_recipe_says_what_a_run_here_would_do(tmp_path, capsys):
    assert main([TINY, *dry_run_in(tmp_path), "--fp16", "true", "--use_cpu", "false"]) == 0
    out = capsys.readouterr().out
    note = "fp16 needs a GPU; this machine has none, and a run here is refused"
    assert (note in out) != torch.cuda.is_available() and "precision:       fp16 mixed" in out


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("auto", torch.float32)])
def test_the_built_in_tiny_model_takes_the_recipe_dtype(dtype, expected):
    model, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=TINY_LLAMA, dtype=dtype), seed=0)
    assert {parameter.dtype for parameter in model.parameters()} == {expected}


# ---- data, checked when it is prepared ----

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


def records(count, output="答案。"):
    return [{"instruction": f"第{i}题", "input": "", "output": output} for i in range(count)]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_split_file_in_a_dataset_folder_is_refused_naming_it(tmp_path, content):
    write_jsonl(tmp_path / "train.jsonl", records(8))
    (tmp_path / "validation.jsonl").write_text(content)
    with pytest.raises(DataError, match=f"^{tmp_path / 'validation.jsonl'}: an empty file \\(no records\\) in the "
                                        f"dataset folder {tmp_path}$"):
        load_records(DataArguments(dataset_name=str(tmp_path), validation_split="validation"))


def test_the_script_refuses_an_empty_split_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", records(8))
    (data / "validation.jsonl").write_text("")
    out = tmp_path / "run"
    assert main([TINY, "--dataset_name", str(data), "--validation_split", "validation", "--output_dir", str(out)]) == 1
    expected = f"error: {data / 'validation.jsonl'}: an empty file (no records) in the dataset folder {data}"
    assert one_error_line(capsys) == expected
    assert not out.exists()


def test_records_with_an_empty_output_are_counted_in_one_warning(tmp_path, caplog):
    from dualadam_hf.models.tiny import load_tiny_tokenizer

    write_jsonl(tmp_path / "data.jsonl", records(6, output="") + records(4) + records(2, output=" "))
    arguments = DataArguments(dataset_name=str(tmp_path / "data.jsonl"), validation_fraction=0.25, split_seed=0)
    with caplog.at_level(logging.WARNING, logger="dualadam_hf.train.sft_data"):
        data = prepare_datasets(arguments, load_tiny_tokenizer())
    warnings = [record.getMessage() for record in caplog.records if record.name == "dualadam_hf.train.sft_data"]
    assert len(warnings) == 1 and "have an empty output (they teach only the end of an answer)" in warnings[0]
    train_empty, eval_empty = (int(warnings[0].split(" of ")[i].split()[-1]) for i in (0, 1))
    assert train_empty + eval_empty == 8 and f"of {len(data.train)} training" in warnings[0]

    caplog.clear()
    write_jsonl(tmp_path / "data.jsonl", records(12))
    with caplog.at_level(logging.WARNING, logger="dualadam_hf.train.sft_data"):
        prepare_datasets(arguments, load_tiny_tokenizer())
    assert not [record for record in caplog.records if record.name == "dualadam_hf.train.sft_data"]
