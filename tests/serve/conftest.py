"""Finished runs shared by the serve tests (one of each per session): the tiny recipe with all weights and with
LoRA, and the openPangu recipe on the fixture checkpoint in the published layout. A few steps each: what is
tested is how their output is loaded, rendered and written, not what they learnt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE
from dualadam_hf.train.finetune import main as finetune

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--max_train_samples", "32",
         "--max_eval_samples", "8", "--per_device_train_batch_size", "4", "--generation_eval_samples", "2",
         "--generation_max_new_tokens", "8", "--disable_tqdm", "true", "--report_to", "none"]


def train(recipe: str, output_dir: Path, *flags: str) -> Path:
    assert finetune([str(ROOT / recipe), "--output_dir", str(output_dir), *SHORT, *flags]) == 0
    return output_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return train("recipes/tiny_alpaca.yaml", tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory) -> Path:
    return train("recipes/tiny_alpaca.yaml", tmp_path_factory.mktemp("tiny_lora") / "run",
                 "--use_peft", "true", "--lora_r", "4")


@pytest.fixture(scope="session")
def pangu_run(tmp_path_factory, tiny_openpangu) -> Path:
    records = [json.loads(line) for line in ALPACA_ZH_SAMPLE.read_text(encoding="utf-8").splitlines()[:40]]
    data = tmp_path_factory.mktemp("alpaca") / "alpaca_gpt4_data_zh.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return train("recipes/pangu_alpaca.yaml", tmp_path_factory.mktemp("pangu") / "run",
                 "--model_name_or_path", str(tiny_openpangu), "--dataset_name", str(data), "--bf16", "false",
                 "--use_cpu", "true", "--gradient_accumulation_steps", "1", "--validation_fraction", "0.2",
                 "--max_seq_length", "256", "--save_strategy", "no", "--learning_rate", "0.01")
