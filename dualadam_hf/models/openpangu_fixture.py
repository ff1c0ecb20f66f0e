"""A tiny openPangu-Embedded checkpoint in the published on-disk format, written offline.

The real checkpoints cannot be downloaded here, in CI or on the GPU machine, so the loading path is
exercised on this: the published ``config.json`` keys (``model_type: PanguEmbedded``, ``bias: true``,
``auto_map`` into the remote code), sharded safetensors under the published names (with the per-layer
``rotary_emb.inv_freq`` buffers 7B-V1.1 stores), a sentencepiece BPE ``tokenizer.model`` with byte
fallback and the published special pieces, the published ``tokenizer_config.json`` fields and chat
template, and the three remote-code files. Those are stand-ins that fail on import the way the
published ones do on any machine without ``torch_npu``: loading must never touch them.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '[unused9]系统：[unused10]' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '[unused9]系统：' + message['content'] + '[unused10]' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{'[unused9]助手：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'tool' %}{{'[unused9]工具：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'function' %}{{'[unused9]方法：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'user' %}{{'[unused9]用户：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)
"""The published chat template, character for character."""

SPECIAL_PIECES = ("<|User|>:", "<|Bot|>:", *(f"[unused{index}]" for index in range(34)))
"""The published added tokens besides ``<unk>``, ``<s>`` and ``</s>``; ``[unused10]`` is the eos."""

EOS_PIECE = "[unused10]"

# English lines of our own, so that the tokenizer also learns Latin merges for mixed-text tests.
_ENGLISH_LINES = (
    "The model answers the question in a few clear sentences.",
    "Fine-tuning with DualAdam explores early and converges late.",
    "Write a short poem about the sea and the wind.",
    "Hello world, this is a mixed English and 中文 sentence.",
)

# Published: 26 layers, hidden 1536, 12 query / 6 key-value heads for 1B. Tiny here, same ratios.
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

_REMOTE_CODE_STAND_IN = '''"""Stand-in for the published {name}: fails on import, as the original does without torch_npu."""

raise ImportError("{name} needs torch_npu (Ascend NPU); dualadam_hf must load this checkpoint natively")
'''


def _training_texts() -> list[str]:
    texts = list(_ENGLISH_LINES) * 4
    with ALPACA_ZH_SAMPLE.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                texts += [record[key] for key in ("instruction", "input", "output") if record.get(key)]
    return texts


def train_sentencepiece(**options) -> bytes:
    """A BPE sentencepiece model with byte fallback and the published special pieces, trained on the sample.

    ``character_coverage`` below 1 leaves rare characters to the byte pieces, so byte fallback is exercised.
    ``options`` override the trainer's settings (tests train variants with other normalizer specs).
    """
    import sentencepiece

    settings = dict(
        model_type="bpe",
        vocab_size=2000,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=list(SPECIAL_PIECES),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    settings.update(options)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_training_texts()), model_writer=model, **settings)
    return model.getvalue()


def _tokenizer_config(piece_to_id) -> dict:
    added = {
        str(piece_to_id(piece)): dict(
            content=piece, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True
        )
        for piece in ("<unk>", "<s>", "</s>", *SPECIAL_PIECES)
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_openpangu.PanguTokenizer", None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_PIECE,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<unk>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PanguTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _special_tokens_map() -> dict:
    def entry(content: str) -> dict:
        return dict(content=content, lstrip=False, normalized=False, rstrip=False, single_word=False)

    return dict(bos_token=entry("<s>"), eos_token=entry(EOS_PIECE), pad_token=entry("<unk>"), unk_token=entry("<unk>"))


def _model_config(vocab_size: int, eos_id: int, shape: dict) -> dict:
    return {
        "architectures": ["PanguEmbeddedForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig",
            "AutoModel": "modeling_openpangu_dense.PanguEmbeddedModel",
            "AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM",
        },
        "bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "pad_token_id": 0,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": 32768,
        "model_type": "PanguEmbedded",
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 16000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.2",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The parameters' published names and shapes for a ``config.json``'s sizes (untied lm_head, bias on q/k/v/o)."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim), ("o", hidden)):
            columns = hidden if name != "o" else heads * head_dim
            shapes[f"{prefix}.self_attn.{name}_proj.weight"] = (rows, columns)
            shapes[f"{prefix}.self_attn.{name}_proj.bias"] = (rows,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (config["intermediate_size"], hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (config["intermediate_size"], hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, config["intermediate_size"])
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the published names; biases non-zero so that a dropped bias changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = config["initializer_range"] * torch.randn(shape, generator=generator)
        weights[name] = tensor.to(torch.bfloat16)
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for layer in range(config["num_hidden_layers"]):
        weights[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return weights


def _save_sharded(weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Two shards and an index, as the published multi-file checkpoints are laid out."""
    names = list(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for index, shard_names in enumerate(halves, start=1):
        shard = f"model-{index:05d}-of-{len(halves):05d}.safetensors"
        save_file({name: weights[name].contiguous() for name in shard_names}, directory / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in shard_names})
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(directory: Path, sp_model: bytes) -> None:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json, as published."""
    import sentencepiece

    (directory / "tokenizer.model").write_bytes(sp_model)
    processor = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(processor.piece_to_id))
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())


def write_tiny_openpangu(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into ``directory``, which must not exist or be empty.

    The files are written into a sibling folder that is renamed at the end, so an interrupted write
    leaves no half-written checkpoint behind.
    """
    import sentencepiece

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory}: exists and is not an empty folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as scratch:
        staging = Path(scratch)
        sp_model = train_sentencepiece()
        write_tokenizer_files(staging, sp_model)
        processor = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
        eos_id = processor.piece_to_id(EOS_PIECE)
        config = _model_config(processor.get_piece_size(), eos_id, TINY_SHAPE)
        _write_json(staging / "config.json", config)
        generation = dict(
            do_sample=True, temperature=1.0, top_k=0, top_p=0.8, bos_token_id=1, pad_token_id=0, eos_token_id=eos_id
        )
        _write_json(staging / "generation_config.json", {**generation, "transformers_version": "4.53.2"})
        _save_sharded(_weights(config, seed), staging)
        for name in ("configuration_openpangu_dense.py", "modeling_openpangu_dense.py", "tokenization_openpangu.py"):
            (staging / name).write_text(_REMOTE_CODE_STAND_IN.format(name=name), encoding="utf-8")
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
        staging.mkdir()  # for TemporaryDirectory's cleanup
    return directory
