import copy
import dataclasses
import json
import math

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainingArguments

from dualadam_hf.train import sft_data
from dualadam_hf.train.sft_data import (
    IGNORE_INDEX,
    DataArguments,
    DataError,
    SFTCollator,
    build_prompt,
    format_alpaca_prompt,
    load_records,
    prepare_datasets,
    tokenize_record,
)
from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE, load_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def numbered_records(count):
    return [{"instruction": f"第{i}题：说一个数。", "input": "", "output": f"答案是{i}。"} for i in range(count)]


def test_alpaca_prompt_is_the_documented_format():
    assert format_alpaca_prompt("翻译", "你好") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n翻译\n\n### Input:\n你好\n\n### Response:\n"
    )
    assert format_alpaca_prompt("讲个笑话", "") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n讲个笑话\n\n### Response:\n"
    )


def test_tokenize_record_ignores_every_prompt_token_and_keeps_response_and_eos(tokenizer):
    record = {"instruction": "把下面的句子翻译成英文。", "input": "你好", "output": "Hello!"}
    prompt_ids = tokenizer.encode(format_alpaca_prompt("把下面的句子翻译成英文。", "你好"), add_special_tokens=False)
    response_ids = tokenizer.encode("Hello!", add_special_tokens=False)
    expected_prompt = [tokenizer.bos_token_id, *prompt_ids]
    expected_response = [*response_ids, tokenizer.eos_token_id]

    example = tokenize_record(tokenizer, record, max_seq_length=512)

    assert example["input_ids"] == expected_prompt + expected_response
    assert example["labels"] == [IGNORE_INDEX] * len(expected_prompt) + expected_response
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert example["truncated"] is False
    learnt = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(learnt) == "Hello!</s>"


def test_tokenize_record_accepts_a_record_without_input(tokenizer):
    example = tokenize_record(tokenizer, {"instruction": "讲个笑话", "output": "好的。"}, max_seq_length=512)
    prompt_length = example["labels"].count(IGNORE_INDEX)
    assert tokenizer.decode(example["input_ids"][:prompt_length]) == "<s>" + format_alpaca_prompt("讲个笑话", "")


def test_long_example_is_cut_from_the_right_and_marked_truncated(tokenizer):
    record = {"instruction": "写一段话。", "input": "", "output": "春天来了，花开了，鸟儿在枝头唱歌。" * 5}
    full = tokenize_record(tokenizer, record, max_seq_length=10_000)
    prompt_length = full["labels"].count(IGNORE_INDEX)
    budget = prompt_length + 3

    cut = tokenize_record(tokenizer, record, max_seq_length=budget)

    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][:budget]
    assert cut["labels"] == full["labels"][:budget]
    assert len(cut["attention_mask"]) == budget


def test_example_that_fits_exactly_is_not_truncated(tokenizer):
    record = {"instruction": "写一句话。", "input": "", "output": "春天来了。"}
    full = tokenize_record(tokenizer, record, max_seq_length=10_000)

    exact = tokenize_record(tokenizer, record, max_seq_length=len(full["input_ids"]))

    assert exact == full
    assert exact["truncated"] is False


def test_prompt_longer_than_budget_keeps_one_response_token(tokenizer):
    record = {"instruction": "很长的指令。" * 50, "input": "", "output": "好。"}
    full = tokenize_record(tokenizer, record, max_seq_length=10_000)

    cut = tokenize_record(tokenizer, record, max_seq_length=16)

    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][:15] + [tokenizer.encode("好。", add_special_tokens=False)[0]]
    assert cut["labels"][:15] == [IGNORE_INDEX] * 15
    assert cut["labels"][15] == cut["input_ids"][15]


def test_prepare_datasets_counts_truncated_examples_and_drops_text(tmp_path, tokenizer):
    records = numbered_records(9) + [{"instruction": "写长文。", "input": "", "output": "很长的回答。" * 40}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", records)

    prepared = prepare_datasets(DataArguments(dataset_name=str(path), max_seq_length=64), tokenizer)

    assert prepared.num_truncated_train + prepared.num_truncated_eval == 1
    assert len(prepared.train) + len(prepared.eval) == 10
    assert prepared.train.column_names == ["input_ids", "labels", "attention_mask"]
    assert max(len(ids) for ids in [*prepared.train["input_ids"], *prepared.eval["input_ids"]]) == 64
    assert "1 truncated" in prepared.summary()


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        ({"instruction": "没有输出"}, "output"),
        ({"instruction": "输出为空值", "output": None}, "output"),
        ({"input": "没有指令", "output": "回答"}, "instruction"),
        ({"instruction": None, "output": "回答"}, "instruction"),
    ],
)
def test_missing_or_null_field_is_refused_with_file_field_and_index(tmp_path, broken, field):
    records = numbered_records(20)
    records[17] = broken
    path = write_jsonl(tmp_path / "alpaca.jsonl", records)

    with pytest.raises(DataError, match=rf"alpaca\.jsonl: record 17 has no field '{field}'"):
        load_records(DataArguments(dataset_name=str(path)))


def test_field_absent_from_every_record_is_refused_at_record_0(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "问", "response": "答"}] * 3)
    with pytest.raises(DataError, match=r"alpaca\.jsonl: record 0 has no field 'output'"):
        load_records(DataArguments(dataset_name=str(path)))


def test_non_text_field_is_refused(tmp_path):
    records = numbered_records(5)
    records[3]["output"] = 42
    path = write_jsonl(tmp_path / "alpaca.jsonl", records)
    with pytest.raises(DataError, match=r"record 3 field 'output' is int"):
        load_records(DataArguments(dataset_name=str(path)))


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_file_without_records_is_refused_by_name(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=name):
        load_records(DataArguments(dataset_name=str(path)))


def test_malformed_json_is_refused_by_name(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "问", "output": "答"}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        load_records(DataArguments(dataset_name=str(path)))


@pytest.mark.parametrize("name", ["nowhere.jsonl", "nowhere", "empty"])
def test_a_local_dataset_that_names_nothing_is_refused_before_loading(tmp_path, name):
    (tmp_path / "empty").mkdir()
    path = tmp_path / name
    expected = "an empty folder" if name == "empty" else "no such file or folder"
    with pytest.raises(ValueError, match=f"dataset_name {path}: {expected}"):
        DataArguments(dataset_name=str(path))


def test_unsupported_file_type_is_refused(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,output\n问,答\n")
    with pytest.raises(DataError, match=r"alpaca\.csv: unsupported file type '\.csv'"):
        load_records(DataArguments(dataset_name=str(path)))


def test_parquet_file_is_read(tmp_path):
    path = tmp_path / "alpaca.parquet"
    Dataset.from_list(numbered_records(10)).to_parquet(str(path))
    train, evaluation = load_records(DataArguments(dataset_name=str(path)))
    assert len(train) + len(evaluation) == 10


def test_held_out_split_is_sized_by_fraction_and_fixed_by_seed(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", numbered_records(50))

    def held_out(seed):
        train, evaluation = load_records(
            DataArguments(dataset_name=str(path), validation_fraction=0.2, split_seed=seed)
        )
        return list(train["instruction"]), list(evaluation["instruction"])

    train, evaluation = held_out(seed=1)
    assert len(evaluation) == 10
    assert sorted(train + evaluation) == sorted(r["instruction"] for r in numbered_records(50))
    assert held_out(seed=1) == (train, evaluation)
    assert held_out(seed=2)[1] != evaluation


def test_held_out_size_rounds_up(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", numbered_records(11))
    _, evaluation = load_records(DataArguments(dataset_name=str(path), validation_fraction=0.1))
    assert len(evaluation) == math.ceil(0.1 * 11)


def test_single_record_cannot_be_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", numbered_records(1))
    with pytest.raises(DataError, match=r"one\.jsonl: cannot hold out validation_fraction=0.1 of 1 records"):
        load_records(DataArguments(dataset_name=str(path)))


def test_named_validation_split_is_used(tmp_path):
    folder = tmp_path / "alpaca_dir"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", numbered_records(6))
    validation = [{"instruction": f"验证{i}", "input": "", "output": "好"} for i in range(3)]
    write_jsonl(folder / "validation.jsonl", validation)

    train, evaluation = load_records(DataArguments(dataset_name=str(folder), validation_split="validation"))

    assert len(train) == 6
    assert list(evaluation["instruction"]) == ["验证0", "验证1", "验证2"]


def test_bad_record_in_named_split_names_the_split(tmp_path):
    folder = tmp_path / "alpaca_dir"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", numbered_records(6))
    write_jsonl(folder / "validation.jsonl", [{"instruction": "验证", "output": "好"}, {"instruction": "缺输出"}])
    with pytest.raises(DataError, match=r"\(split 'validation'\): record 1 has no field 'output'"):
        load_records(DataArguments(dataset_name=str(folder), validation_split="validation"))


def test_empty_hub_split_is_refused_by_dataset_and_split(monkeypatch):
    splits = DatasetDict(
        train=Dataset.from_list(numbered_records(4)),
        test=Dataset.from_dict({"instruction": [], "input": [], "output": []}),
    )
    monkeypatch.setattr(sft_data, "load_dataset", lambda name: splits)
    with pytest.raises(DataError, match=r"^someone/alpaca \(split 'test'\): no records$"):
        load_records(DataArguments(dataset_name="someone/alpaca", validation_split="test"))


def test_unknown_split_is_named_with_the_available_ones(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", numbered_records(4))
    with pytest.raises(DataError, match=r"no split 'dev'; available: train"):
        load_records(DataArguments(dataset_name=str(path), validation_split="dev"))


def test_max_samples_cap_each_split(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", numbered_records(40))
    train, evaluation = load_records(
        DataArguments(dataset_name=str(path), validation_fraction=0.5, max_train_samples=5, max_eval_samples=3)
    )
    assert (len(train), len(evaluation)) == (5, 3)


def test_collator_pads_right_with_pad_ignore_and_zero():
    examples = [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2], "attention_mask": [1, 1, 1, 1]},
        {"input_ids": [1, 7, 2], "labels": [-100, 7, 2], "attention_mask": [1, 1, 1]},
    ]

    batch = SFTCollator(pad_token_id=3)(examples)

    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 2], [1, 7, 2, 3]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 6, 2], [-100, 7, 2, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_needs_a_pad_id():
    with pytest.raises(ValueError, match="pad"):
        SFTCollator(pad_token_id=None)


def test_chat_template_replaces_the_alpaca_prompt(tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )

    prompt = build_prompt(chat_tokenizer, "翻译", "你好")
    example = tokenize_record(chat_tokenizer, {"instruction": "翻译", "input": "你好", "output": "Hi"}, 512)

    assert prompt == "<|user|>翻译\n\n你好<|assistant|>"
    # the rendered conversation, tokenized whole with the tokenizer's defaults (its bos included)
    assert example["input_ids"] == chat_tokenizer(prompt + "Hi")["input_ids"]
    prompt_length = len(chat_tokenizer(prompt)["input_ids"])
    assert example["labels"] == [IGNORE_INDEX] * prompt_length + example["input_ids"][prompt_length:]
    assert build_prompt(tokenizer, "翻译", "你好") == format_alpaca_prompt("翻译", "你好")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset_name": None}, "dataset_name is required"),
        ({"validation_fraction": 0.0}, "validation_fraction must be in \\(0, 1\\), got 0.0"),
        ({"validation_fraction": 1.5}, "validation_fraction must be in \\(0, 1\\), got 1.5"),
        ({"max_seq_length": 4}, "max_seq_length must be at least 8, got 4"),
        ({"max_train_samples": 0}, "max_train_samples must be at least 1 or None, got 0"),
        ({"validation_split": "train"}, "validation_split must differ from train_split"),
    ],
)
def test_data_arguments_refuse_bad_values_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        DataArguments(**{"dataset_name": "alpaca.jsonl", **overrides})


def test_data_arguments_do_not_clash_with_training_arguments():
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert data_fields.isdisjoint(training_fields)


def test_shipped_sample_has_at_least_300_valid_distinct_records():
    train, evaluation = load_records(DataArguments(dataset_name=str(ALPACA_ZH_SAMPLE)))
    records = list(train) + list(evaluation)
    assert len(records) >= 300
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)
    assert all(r["instruction"].strip() and r["output"].strip() for r in records)
    assert 0.2 < sum(bool(r["input"]) for r in records) / len(records) < 0.4
