"""scripts/export.py: the published openPangu layout reloads with the run's logits; the Llama layout loads in a
Python that cannot import dualadam_hf, with the run's logits and token ids; a LoRA run exports merge_and_unload's
weights; the model card says what the run was; and nothing is written where it must not be, or half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualadam_hf.models.openpangu_fixture import train_sentencepiece
from dualadam_hf.models.tiny import build_tiny_llama, load_tiny_tokenizer
from dualadam_hf.serve import export as export_module
from dualadam_hf.serve.export import build_parser, main

TEXTS = {
    "chinese": "你好，世界。今天天气很好，我们去长城吧！",
    "english": "Hello world, the model answers in English: 42 apples.",
    "pangu specials": "[unused9]用户：写一首诗[unused10][unused9]助手：好的<s></s>",
    "tiny specials": "<s>混合 mixed 文本</s><pad> 结束",
}
# Run with -I -S: the standard library only, then site-packages through a folder of links that leaves out
# dualadam_hf and its editable-install hook, whichever way it was installed.
PROBE = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("dualadam_hf") is None, "dualadam_hf is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
texts = json.loads(sys.argv[2])
results = {}
for folder in sys.argv[4:]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = {name: tokenizer(text)["input_ids"] for name, text in texts.items()}
    with torch.no_grad():
        logits = model(torch.tensor([ids["chinese"]])).logits
    results[folder] = dict(ids=ids, logits=logits, model=type(model).__name__, tokenizer=type(tokenizer).__name__,
                           template=tokenizer.chat_template)
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def site_packages_without_us(tmp_path_factory) -> Path:
    links = tmp_path_factory.mktemp("site-packages-without-dualadam_hf")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("dualadam_hf", "__editable__")) and entry.suffix != ".pth":
            (links / entry.name).symlink_to(entry)
    return links


def plain_transformers(folders: list[Path], site_packages: Path, tmp_path: Path) -> dict:
    """Load each folder with stock transformers in a Python that cannot import dualadam_hf."""
    texts = {name: text for name, text in TEXTS.items()}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE, str(site_packages), json.dumps(texts), str(tmp_path / "probe.pt"),
         *map(str, folders)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {Path(folder): value for folder, value in torch.load(tmp_path / "probe.pt", weights_only=True).items()}


def run_logits(run: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def export(*argv: str) -> int:
    return main([str(arg) for arg in argv])


def test_the_openpangu_format_is_the_published_layout_and_reloads_with_the_runs_logits(pangu_run, tiny_openpangu, tmp_path, capsys):
    out = tmp_path / "export"
    assert export(pangu_run, "--out", out, "--max_shard_size", "200KB") == 0
    assert capsys.readouterr().out.splitlines()[1] == "format:  openpangu, float32"

    published = json.loads((tiny_openpangu / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert set(published) <= set(config)  # every published key, auto_map included
    for key in ("model_type", "architectures", "bias", "auto_map", "rope_theta", "vocab_size", "hidden_size",
                "num_hidden_layers", "num_key_value_heads", "eos_token_id", "tie_word_embeddings"):
        assert config[key] == published[key], key
    assert config["torch_dtype"] == "float32" and config["use_cache"] is True
    for name in ("tokenizer.model", "special_tokens_map.json", "configuration_openpangu_dense.py",
                 "modeling_openpangu_dense.py", "tokenization_openpangu.py"):
        assert (out / name).read_bytes() == (tiny_openpangu / name).read_bytes(), name
    published_tokenizer = json.loads((tiny_openpangu / "tokenizer_config.json").read_text())
    assert json.loads((out / "tokenizer_config.json").read_text()) == published_tokenizer
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and all((out / shard).is_file() for shard in index["weight_map"].values())

    tokenizer, run_tokenizer = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(pangu_run)
    assert type(tokenizer).__name__ == "PanguTokenizer"
    assert all(tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"] for text in TEXTS.values())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "PanguEmbeddedForCausalLM"
    ids = run_tokenizer(TEXTS["chinese"])["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, run_logits(pangu_run, ids))


def test_the_llama_format_loads_with_plain_transformers_with_the_runs_logits_and_ids(
    pangu_run, tiny_run, tmp_path, site_packages_without_us, capsys
):
    pangu, tiny = tmp_path / "pangu-llama", tmp_path / "tiny-llama"
    assert export(pangu_run, "--out", pangu, "--format", "llama") == 0
    assert export(tiny_run, "--out", tiny) == 0  # Llama's default format
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("format:")] == [
        "format:  llama, float32", "format:  llama, float32"]
    config = json.loads((pangu / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["attention_bias"] is True and config["mlp_bias"] is False and "bias" not in config
    assert not list(pangu.glob("*.py")) and "auto_map" not in (pangu / "tokenizer_config.json").read_text()
    # every added special token is a named one: llama.cpp's converter marks only those CONTROL, and llama.cpp
    # then parses the chat template's [unused9] as one token (checked by hand: docs/after-training.md)
    settings = json.loads((pangu / "tokenizer_config.json").read_text())
    named = {settings[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    added = [token["content"] for token in json.loads((pangu / "tokenizer.json").read_text())["added_tokens"]
             if token["special"]]
    assert "[unused9]" in added and set(added) <= named | set(settings["extra_special_tokens"])

    loaded = plain_transformers([pangu, tiny], site_packages_without_us, tmp_path)
    for folder, run in ((pangu, pangu_run), (tiny, tiny_run)):
        result = loaded[folder]
        assert result["model"] == "LlamaForCausalLM" and result["tokenizer"] == "TokenizersBackend"
        run_tokenizer = AutoTokenizer.from_pretrained(run)
        assert result["ids"] == {name: run_tokenizer(text)["input_ids"] for name, text in TEXTS.items()}
        assert result["template"] == run_tokenizer.chat_template
        assert torch.equal(result["logits"], run_logits(run, result["ids"]["chinese"]))
    # the special tokens are single ids in both vocabularies
    assert loaded[pangu]["ids"]["pangu specials"][1] == AutoTokenizer.from_pretrained(pangu_run).convert_tokens_to_ids("[unused9]")
    assert loaded[tiny]["ids"]["tiny specials"][:2] == [1, 1]  # bos added, then the <s> of the text


def merged_reference(lora_run: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    seed = json.loads((lora_run / "run_config.json").read_text())["seed"]
    tokenizer = load_tiny_tokenizer()
    merged = PeftModel.from_pretrained(build_tiny_llama(tokenizer, seed=seed), lora_run).merge_and_unload()
    return merged.state_dict()


def test_a_lora_run_exports_the_weights_merge_and_unload_gives(tiny_lora_run, tmp_path):
    reference = merged_reference(tiny_lora_run)
    base = build_tiny_llama(load_tiny_tokenizer(), seed=42).state_dict()
    assert not torch.equal(reference["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / dtype
        assert export(tiny_lora_run, "--out", out, "--dtype", dtype) == 0
        weights = load_file(out / "model.safetensors")
        assert set(weights) == set(reference)
        assert all(torch.equal(weights[name], reference[name].to(torch_dtype)) for name in reference), dtype
        assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
        assert not list(out.glob("adapter_*"))


def test_the_model_card_says_what_the_run_was(tiny_run, tmp_path):
    out = tmp_path / "export"
    assert export(tiny_run, "--out", out) == 0
    card = (out / "README.md").read_text()
    record = json.loads((tiny_run / "run_config.json").read_text())
    evaluations = [e for e in json.loads((tiny_run / "trainer_state.json").read_text())["log_history"] if "eval_ppl" in e]
    best = min(evaluations, key=lambda entry: entry["eval_ppl"])
    assert "| base model | `builtin:tiny-llama` |" in card
    assert f"`{record['dataset']}`, split `train`, validation: 0.15 of the training split held out (seed 42)" in card
    assert "| optimizer | `dualadam` (`switch_ratio=0.3`), learning rate 0.003, weight decay 0, seed 42 |" in card
    assert (f"| final evaluation | eval_ppl {evaluations[-1]['eval_ppl']:.4g}, eval_gen_gap "
            f"{evaluations[-1]['eval_gen_gap']:.4f} (step {evaluations[-1]['step']}) |") in card
    assert f"| best evaluation | eval_ppl {best['eval_ppl']:.4g}, eval_gen_gap {best['eval_gen_gap']:.4f} (step {best['step']}) |" in card
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_alpaca.yaml"
    trained_with = record["command"]  # the fixture's command line, as the run was given it
    assert trained_with.startswith(f"scripts/finetune.py {recipe} --output_dir {tiny_run} --max_steps 4 ")
    assert record["processes"] == 1 and f"| trained with | `python {trained_with}` |" in card
    assert f"| made by | `python scripts/export.py {tiny_run} --out {out}` |" in card


def copy_with_record(run: Path, destination: Path, **changes) -> Path:
    shutil.copytree(run, destination)
    record = json.loads((destination / "run_config.json").read_text())
    (destination / "run_config.json").write_text(json.dumps(dict(record, **changes)))
    return destination


@pytest.mark.parametrize("case", ["not empty", "overwrite a non-model", "a file", "the run itself", "wrong format",
                                  "missing run", "no published tokenizer", "another vocabulary"])
def test_each_refusal_is_one_line_and_writes_nothing(case, tiny_run, pangu_run, tiny_openpangu, tmp_path, capsys):
    out, argv, status = tmp_path / "out", None, 2
    if case == "not empty":
        out.mkdir()
        (out / "config.json").write_text("{}")
        argv, message = [tiny_run, "--out", out], f"--out {out}: not empty (pass --overwrite to replace it)"
    elif case == "overwrite a non-model":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        argv = [tiny_run, "--out", out, "--overwrite"]
        message = f"--out {out}: not empty and holds no config.json (not a model folder)"
    elif case == "a file":
        out.write_text("mine")
        argv, message = [tiny_run, "--out", out], f"--out {out}: a file, not a folder"
    elif case == "the run itself":
        argv, message = [tiny_run, "--out", tiny_run.parent, "--overwrite"], f"--out {tiny_run.parent}: would replace the run"
    elif case == "wrong format":
        argv, message = [tiny_run, "--out", out, "--format", "openpangu"], "--format openpangu: takes PanguEmbedded models"
    elif case == "missing run":
        argv, status, message = [tmp_path / "nowhere", "--out", out], 1, f"{tmp_path / 'nowhere'}: no such directory"
    elif case == "no published tokenizer":
        run = copy_with_record(pangu_run, tmp_path / "run", model=str(tmp_path / "gone"))
        argv, status = [run, "--out", out], 1
        message = "--format openpangu: the published tokenizer.model (the vocabulary llama.cpp and vLLM read"
    else:
        base = tmp_path / "base"
        shutil.copytree(tiny_openpangu, base)
        (base / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size=2500))
        run = copy_with_record(pangu_run, tmp_path / "run", model=str(base))
        argv, status, message = [run, "--out", out], 1, f"{base / 'tokenizer.model'}: 2500 pieces, the run's tokenizer has 2000"
    before = sorted(path.name for path in tmp_path.iterdir())
    contents = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and "run" not in path.parts}
    assert export(*argv) == status
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1, captured.err
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no export, no staging folder left
    assert all(path.read_bytes() == data for path, data in contents.items())


def test_overwrite_replaces_an_export_and_a_failed_write_leaves_the_old_one(tiny_run, tiny_lora_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    assert export(tiny_run, "--out", out) == 0
    first = (out / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "write_llama", disk_full)
        assert export(tiny_lora_run, "--out", out, "--overwrite") == 1
    assert capsys.readouterr().err == f"error: --out {out}: writing the export failed: No space left on device\n"
    assert (out / "model.safetensors").read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["export"]

    assert export(tiny_lora_run, "--out", out, "--overwrite") == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert "LoRA r=4" in (out / "README.md").read_text() and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_help_explains_every_flag():
    parser = build_parser("export.py", "")
    assert all(action.help for action in parser._actions)
    assert {"--out", "--format", "--dtype", "--max_shard_size", "--overwrite"} <= {
        option for action in parser._actions for option in action.option_strings}
