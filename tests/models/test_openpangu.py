"""openPangu-Embedded loads natively: config, weights, tokenizer, chat format, save and reload.

Everything runs on the tiny checkpoint that ``write_tiny_openpangu`` lays out in the published format.
The tokenizer is held to the published ``PanguTokenizer``'s rules, written here from its source: the
text is split on the added tokens, every other piece is encoded by the sentencepiece model on its own,
and ``<s>`` comes first (``add_bos_token: true``, ``add_eos_token: false``).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import dualadam_hf  # noqa: F401  (registers the model type)
from dualadam_hf.models.openpangu import PanguEmbeddedConfig, PanguEmbeddedForCausalLM, PanguTokenizer
from dualadam_hf.models.openpangu_fixture import (
    CHAT_TEMPLATE,
    EOS_PIECE,
    SPECIAL_PIECES,
    train_sentencepiece,
    write_tokenizer_files,
)
from dualadam_hf.train.sft_data import IGNORE_INDEX, tokenize_record
from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = [json.loads(line) for line in ALPACA_ZH_SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
TEXTS = {
    "chinese": "甲骨文是商朝人刻在龟甲和兽骨上的文字。",
    "english": "The quick brown fox jumps over the lazy dog.",
    "mixed": "用 DualAdam 微调 openPangu-Embedded-1B，学习率 2e-5。",
    "special": "[unused9]系统：[unused10][unused9]用户：你好[unused10][unused9]助手：",
    "special inside words": "a[unused10]b <s>x</s> <|User|>:hi<|Bot|>:",
    "byte fallback": "罕见字：龘 𪚥 emoji 😀 and ℵ",
    "spaces": "  two  leading,  double  inside, trailing  ",
    "whitespace only": "   ",
    "newlines and tabs": "第一行\n\n\t第二行\r\n",
    "empty": "",
    "already escaped": "▁starts with the escape piece",
}


def published_ids(processor, added: dict[str, int], text: str) -> list[int]:
    """What the published tokenizer gives ``text`` with its defaults."""
    pattern = "(" + "|".join(re.escape(token) for token in sorted(added, key=len, reverse=True)) + ")"
    ids = [processor.bos_id()]
    for piece in re.split(pattern, text):
        if piece:
            ids += [added[piece]] if piece in added else processor.encode(piece)
    return ids


def added_tokens(directory: Path) -> dict[str, int]:
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {entry["content"]: int(index) for index, entry in config["added_tokens_decoder"].items()}


REMOTE_FILES = {"configuration_openpangu_dense", "modeling_openpangu_dense", "tokenization_openpangu"}


def remote_code_modules() -> list[str]:
    return [name for name in sys.modules if name.startswith("transformers_modules") or name.split(".")[-1] in REMOTE_FILES]


@pytest.mark.parametrize("trust_remote_code", [None, False])
def test_the_published_checkpoint_loads_natively(tiny_openpangu, trust_remote_code):
    config = AutoConfig.from_pretrained(tiny_openpangu, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(tiny_openpangu, trust_remote_code=trust_remote_code, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu, trust_remote_code=trust_remote_code)

    assert type(config) is PanguEmbeddedConfig and type(model) is PanguEmbeddedForCausalLM
    assert type(tokenizer) is PanguTokenizer
    assert remote_code_modules() == []  # the stand-ins raise on import: none was imported
    assert (config.attention_bias, config.mlp_bias, config.rope_parameters["rope_theta"]) == (True, False, 1.6e7)
    assert tokenizer.eos_token == EOS_PIECE and tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token == "<unk>"


def test_every_published_weight_lands_and_q_k_v_o_carry_their_bias(tiny_openpangu):
    model = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.bfloat16)
    published = {}
    for shard in sorted(tiny_openpangu.glob("model-*.safetensors")):
        published.update(load_file(shard))
    published = {name: tensor for name, tensor in published.items() if not name.endswith("rotary_emb.inv_freq")}

    state = model.state_dict()
    assert set(state) == set(published)
    for name, tensor in published.items():
        assert torch.equal(state[name], tensor), name
    attention = model.model.layers[0].self_attn
    assert all(getattr(attention, f"{name}_proj").bias is not None for name in "qkvo")
    assert all(getattr(model.model.layers[0].mlp, f"{name}_proj").bias is None for name in ("gate", "up", "down"))


def test_the_attention_bias_changes_the_logits(tiny_openpangu):
    """The bias is not dead weight: zeroing o_proj's changes what the model predicts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_eager_and_sdpa_attention_give_the_same_logits(tiny_openpangu):
    ids = torch.tensor([[1, 14, 728, 1168, 15, 14, 375, 1331, 776, 1025]])
    logits = {
        implementation: AutoModelForCausalLM.from_pretrained(
            tiny_openpangu, dtype=torch.float32, attn_implementation=implementation
        )(ids).logits
        for implementation in ("eager", "sdpa")
    }
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_openpangu):
    ids = torch.tensor([[1, 14, 728, 1168, 15, 14, 375, 1331, 776, 1025]])
    gradients = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.float32)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        gradients.append(model.model.layers[0].self_attn.o_proj.bias.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=1e-7)


def test_a_saved_model_reloads_with_identical_logits_and_the_published_config_keys(tiny_openpangu, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    published = json.loads((tiny_openpangu / "config.json").read_text())
    assert saved["model_type"] == "PanguEmbedded" and saved["architectures"] == ["PanguEmbeddedForCausalLM"]
    assert "auto_map" not in saved  # the remote code is not saved with the model
    for key in set(published) - {"auto_map", "torch_dtype", "transformers_version"}:
        assert saved[key] == published[key], key

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = tokenizer(TEXTS["mixed"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert type(reloaded) is PanguEmbeddedForCausalLM


def test_a_saved_tokenizer_is_a_plain_tokenizer_json_that_loads_without_sentencepiece(tiny_openpangu, tmp_path):
    AutoTokenizer.from_pretrained(tiny_openpangu).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.model").exists()
    assert "auto_map" not in json.loads((tmp_path / "tokenizer_config.json").read_text())

    # A fresh interpreter where sentencepiece cannot be imported, and without dualadam_hf.
    script = (
        "import sys, json; sys.modules['sentencepiece'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
        "print(json.dumps([tokenizer(text)['input_ids'] for text in json.loads(sys.argv[1])]))\n"
    )
    texts = list(TEXTS.values())
    result = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    original = AutoTokenizer.from_pretrained(tiny_openpangu)
    assert json.loads(result.stdout.splitlines()[-1]) == [original(text)["input_ids"] for text in texts]


def random_texts(count: int, seed: int) -> list[str]:
    """Random strings over the sample's characters, spaces, newlines, the escape piece and the added tokens."""
    rng = random.Random(seed)
    alphabet = sorted(set("".join(record["output"] for record in SAMPLE[:40])) | set("abcXYZ012 \n\t▁　é"))
    specials = ["[unused9]", "[unused10]", "<s>", "</s>", "<unk>", "<|User|>:"]
    texts = []
    for _ in range(count):
        parts = [rng.choice(specials) if rng.random() < 0.1 else rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        texts.append("".join(parts))
    return texts


def tokenizer_dir(directory: Path, **options) -> Path:
    directory.mkdir()
    write_tokenizer_files(directory, train_sentencepiece(**options))
    return directory


@pytest.mark.parametrize(
    "variant",
    ["published fixture", "sentencepiece defaults (nmt_nfkc, extra whitespace removed)", "special pieces as control"],
)
def test_tokenizer_ids_equal_the_published_rules(tiny_openpangu, tmp_path, variant):
    """Under three normalizer specs a real tokenizer.model may have, not only the fixture's."""
    if variant == "published fixture":
        directory = tiny_openpangu
    elif variant.startswith("sentencepiece defaults"):
        directory = tokenizer_dir(tmp_path / "defaults", normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True)
    else:
        directory = tokenizer_dir(tmp_path / "control", user_defined_symbols=[], control_symbols=list(SPECIAL_PIECES))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    added = added_tokens(directory)

    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}],
            tokenize=False,
        )
        for record in SAMPLE[:50]
    ]
    for text in [*TEXTS.values(), *rendered, *random_texts(400, seed=len(variant))]:
        assert tokenizer(text)["input_ids"] == published_ids(processor, added, text), repr(text)


def test_a_tokenizer_config_as_transformers_4_53_saves_it_still_prepends_bos(tiny_openpangu, tmp_path):
    """Saved by the published class under 4.53 (seen there): no add_bos_token / add_eos_token keys, the
    chat template in chat_template.jinja. The published class prepends <s> by its own default."""
    directory = tmp_path / "saved-by-4.53"
    shutil.copytree(tiny_openpangu, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("add_bos_token", "add_eos_token", "sp_model_kwargs", "legacy"):
        del config[key]
    (directory / "chat_template.jinja").write_text(config.pop("chat_template"), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": {}}), encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    for text in TEXTS.values():
        assert tokenizer(text)["input_ids"] == published_ids(processor, added_tokens(directory), text), repr(text)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_byte_fallback_is_exercised_by_the_fixture(tiny_openpangu):
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(TEXTS["byte fallback"])["input_ids"])
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", piece) for piece in pieces)
    assert tokenizer.decode(tokenizer(TEXTS["byte fallback"])["input_ids"], skip_special_tokens=True) == TEXTS["byte fallback"]


def test_the_chat_template_is_the_published_one(tiny_openpangu):
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "[unused9]系统：[unused10][unused9]用户：你好[unused10][unused9]助手："


@pytest.mark.parametrize("record", [SAMPLE[0], next(record for record in SAMPLE if record["input"])], ids=["no input", "input"])
def test_the_sft_example_is_the_rendered_conversation_with_the_prompt_masked(tiny_openpangu, record):
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_openpangu / "tokenizer.model"))
    added = added_tokens(tiny_openpangu)
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    prompt = f"[unused9]系统：[unused10][unused9]用户：{user}[unused10][unused9]助手："
    conversation = f"{prompt}{record['output']}[unused10]"

    example = tokenize_record(tokenizer, record, max_seq_length=4096)

    expected = published_ids(processor, added, conversation)
    prompt_length = len(published_ids(processor, added, prompt))
    assert example["input_ids"] == expected and expected[0] == processor.bos_id()
    assert example["labels"] == [IGNORE_INDEX] * prompt_length + expected[prompt_length:]
    assert example["labels"][-1] == added[EOS_PIECE]  # the closing [unused10] is learnt
    # the first learnt token is the response's, with no dummy-prefix piece of its own
    response_start = processor.encode(record["output"], out_type=str)
    assert tokenizer.convert_ids_to_tokens(expected[prompt_length])[0] != "▁" or response_start[0] == "▁"
    assert not example["truncated"]


def test_the_fixture_script_writes_a_checkpoint_and_refuses_to_overwrite_one(tmp_path):
    def make() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/make_tiny_openpangu.py", str(tmp_path / "pangu")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)

    assert make().returncode == 0
    assert {"config.json", "tokenizer.model", "model.safetensors.index.json"} <= {p.name for p in (tmp_path / "pangu").iterdir()}
    again = make()
    assert again.returncode == 2 and again.stderr == f"error: {tmp_path / 'pangu'}: exists and is not an empty folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pangu"]  # no staging folder left behind


def test_decoding_gives_the_text_back_with_the_added_tokens_in_place(tiny_openpangu):
    tokenizer = AutoTokenizer.from_pretrained(tiny_openpangu)
    for key in ("special", "special inside words", "chinese", "english", "mixed", "byte fallback", "spaces"):
        text = TEXTS[key]
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == "<s>" + text, key
