"""The headline recipe on a checkpoint in openPangu-Embedded's published format, and the data in
Alpaca-GPT4-CN's (one JSON array): it trains under ``accelerate launch`` with DualAdam, with the AdamW
recipe and with LoRA, and every way loading can fail is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualadam_hf.train.finetune import main
from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE

ROOT = Path(__file__).resolve().parents[2]
PANGU = "recipes/pangu_alpaca.yaml"
PANGU_ADAMW = "recipes/pangu_alpaca_adamw.yaml"
# The recipe's settings, sized for two CPU cores: fp32 on the CPU, a few steps, two evaluations.
CPU_SIZED = [
    "--bf16", "false", "--use_cpu", "true", "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "8",
    "--validation_fraction", "0.2", "--train_eval_samples", "8", "--max_seq_length", "256", "--save_strategy", "no",
    "--report_to", "none", "--disable_tqdm", "true", "--generation_eval_samples", "4", "--generation_max_new_tokens", "8",
]


@pytest.fixture(scope="module")
def alpaca_gpt4_zh(tmp_path_factory) -> Path:
    """The dataset repo's layout: a folder with alpaca_gpt4_data_zh.json, one indented JSON array."""
    records = [json.loads(line) for line in ALPACA_ZH_SAMPLE.read_text(encoding="utf-8").splitlines()[:60]]
    path = tmp_path_factory.mktemp("alpaca-gpt4-data-zh") / "alpaca_gpt4_data_zh.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    return path


def launch(recipe: str, model: Path, dataset: Path, output_dir: Path, *flags: str,
           launcher: tuple[str, ...] = ("--num_processes", "1")) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--mixed_precision", "no",
        *(["tests/fsdp_on_cpu.py"] if "recipes/accelerate/fsdp.yaml" in launcher else []),
        "scripts/finetune.py", recipe, "--model_name_or_path", str(model), "--dataset_name", str(dataset),
        *CPU_SIZED, "--output_dir", str(output_dir), *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,flags,optimizer",
    [
        (PANGU, [], "DualAdam"),
        (PANGU_ADAMW, [], "AdamW"),
        (PANGU, ["--use_peft", "true", "--lora_r", "4"], "DualAdam"),
    ],
    ids=["dualadam", "adamw", "dualadam-lora"],
)
def test_the_recipe_trains_the_published_format_under_accelerate_launch(
    tiny_openpangu, alpaca_gpt4_zh, tmp_path, recipe, flags, optimizer
):
    result = launch(recipe, tiny_openpangu, alpaca_gpt4_zh, tmp_path / "run", *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "trust_remote_code=False" in result.stdout

    metrics = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert 1.0 < metrics["eval_ppl"] < float("inf")
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_ppl" in entry]
    assert [entry["step"] for entry in evaluations][:2] == [2, 4]
    assert all("dualadam_alpha" in entry for entry in history if "loss" in entry) == (optimizer == "DualAdam")
    # the answers to the chat-formatted prompts: each prompt ends with the assistant's opening
    samples = [json.loads(line) for line in (tmp_path / "run" / "generations" / "step_4.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(sample["prompt"].endswith("[unused9]助手：") for sample in samples)
    saved = json.loads((tmp_path / "run" / "config.json").read_text()) if not flags else None
    if saved is not None:  # a full fine-tune saves the model in the published config's terms
        assert saved["model_type"] == "PanguEmbedded" and saved["bias"] is True
    else:
        assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_the_recipe_shards_the_published_format_over_two_processes(tiny_openpangu, alpaca_gpt4_zh, tmp_path, engine):
    # ZeRO-3 and FSDP2 partition every parameter, the q/k/v/o biases included; on CPU over gloo
    launcher = ("--config_file", f"recipes/accelerate/{engine}.yaml", "--num_processes", "2", "--main_process_port", "0")
    result = launch(PANGU, tiny_openpangu, alpaca_gpt4_zh, tmp_path / "run", "--per_device_train_batch_size", "2",
                    launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 2 processes = 4 examples per optimizer step" in result.stdout
    assert 1.0 < json.loads((tmp_path / "run" / "all_results.json").read_text())["eval_ppl"] < float("inf")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_type"] == "PanguEmbedded"
    # the gathered model reloads natively, every parameter of it
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    original = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=reloaded.dtype)
    assert reloaded.state_dict().keys() == original.state_dict().keys()
    assert not torch.equal(reloaded.model.layers[0].self_attn.o_proj.bias, original.model.layers[0].self_attn.o_proj.bias)


def test_the_dataset_folder_of_the_hub_repo_works_as_dataset_name(tiny_openpangu, alpaca_gpt4_zh, tmp_path):
    assert main([PANGU, "--model_name_or_path", str(tiny_openpangu), "--dataset_name", str(alpaca_gpt4_zh.parent),
                 *CPU_SIZED, "--max_steps", "1", "--eval_strategy", "no", "--output_dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["eval_ppl"] > 1.0


def broken_copy(source: Path, destination: Path, *, remove=(), config_changes=None) -> Path:
    shutil.copytree(source, destination)
    for name in remove:
        (destination / name).unlink()
    if config_changes is not None:
        config = json.loads((destination / "config.json").read_text())
        config_changes(config)
        (destination / "config.json").write_text(json.dumps(config))
    return destination


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json")


def unknown_architecture(config: dict) -> None:
    config.update(model_type="NoSuchDecoder", architectures=["NoSuchDecoderForCausalLM"])
    config.pop("auto_map")


@pytest.mark.parametrize(
    "case,message",
    [
        (dict(remove=SHARDS), "no weights (none of model.safetensors, model.safetensors.index.json"),
        (dict(remove=SHARDS[:1]), "weight shard model-00001-of-00002.safetensors named in model.safetensors.index.json is missing"),
        (dict(remove=["tokenizer.model"]), "no tokenizer files (none of tokenizer.json, tokenizer.model"),
        (dict(remove=["config.json"]), "no config.json (not a model directory)"),
        (dict(config_changes=unknown_architecture), "model type 'NoSuchDecoder' is not supported by transformers"),
    ],
    ids=["no weights", "a missing shard", "no tokenizer", "no config", "unknown architecture"],
)
def test_a_broken_checkpoint_is_one_line_naming_the_directory(tiny_openpangu, alpaca_gpt4_zh, tmp_path, capsys, case, message):
    model = broken_copy(tiny_openpangu, tmp_path / "model", **case)
    out = tmp_path / "run"
    assert main([PANGU, "--model_name_or_path", str(model), "--dataset_name", str(alpaca_gpt4_zh), *CPU_SIZED,
                 "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and str(model) in err, err
    assert not out.exists()


def test_a_missing_directory_and_remote_code_for_openpangu_are_refused_in_one_line(tiny_openpangu, alpaca_gpt4_zh, tmp_path, capsys):
    common = ["--dataset_name", str(alpaca_gpt4_zh), *CPU_SIZED, "--output_dir", str(tmp_path / "run")]
    assert main([PANGU, "--model_name_or_path", str(tmp_path / "nowhere"), *common]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such directory\n"
    assert main([PANGU, "--model_name_or_path", str(tiny_openpangu), "--trust_remote_code", "true", *common]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trust_remote_code is refused for model type 'PanguEmbedded'" in err
    assert "set trust_remote_code: false" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_optional_package_is_one_line_naming_it(tiny_openpangu, alpaca_gpt4_zh, tmp_path):
    # a machine without sentencepiece, where the tokenizer must be built from tokenizer.model
    script = "import sys; sys.modules['sentencepiece'] = None\nfrom dualadam_hf.train.finetune import main\nsys.exit(main())"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", script, PANGU, "--model_name_or_path", str(tiny_openpangu),
         "--dataset_name", str(alpaca_gpt4_zh), *CPU_SIZED, "--output_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr == (
        f"error: cannot load the tokenizer of {str(tiny_openpangu)!r}: "
        "converting tokenizer.model needs sentencepiece (pip install sentencepiece); a saved tokenizer.json needs neither\n"
    )
    assert not out.exists()
