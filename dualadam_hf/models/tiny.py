"""The built-in tiny model: a few-layer Llama with a small byte-level BPE tokenizer, both shipped offline.

It lets the whole fine-tuning pipeline run in seconds on a CPU with no Hub access: pass
``TINY_LLAMA`` where a model id is expected. The tokenizer is trained on the shipped Chinese
Alpaca sample (``ALPACA_ZH_SAMPLE``); ``scripts/build_tiny_tokenizer.py`` rebuilds it.
"""

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_LLAMA = "builtin:tiny-llama"

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
ALPACA_ZH_SAMPLE = ASSETS_DIR / "alpaca_zh_sample.jsonl"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"

TINY_VOCAB_SIZE = 3000
# Order fixes the ids: unk 0, bos 1, eos 2, pad 3, as in Llama's tokenizer plus a pad token.
_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def is_builtin(name: str) -> bool:
    """Whether ``name`` is the built-in tiny model rather than a Hub id or a local path."""
    return name == TINY_LLAMA


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Load the shipped tokenizer (no chat template, so the pipeline uses the Alpaca prompt)."""
    return PreTrainedTokenizerFast.from_pretrained(TINY_TOKENIZER_DIR)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on ``texts`` (the shipped one: ``alpaca_texts`` of the sample).

    Byte-level: the 256 byte symbols are in the vocabulary, so any UTF-8 text encodes with no
    unknown token. Like Llama's tokenizer it prepends bos when asked for special tokens.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = _SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    # Byte-level decoding restores the text exactly; the default clean-up would drop spaces before punctuation.
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **_SPECIAL_TOKENS)


def tiny_llama_config(
    vocab_size: int,
    *,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 176,
    max_position_embeddings: int = 512,
    **overrides,
) -> LlamaConfig:
    """A Llama configuration small enough to train in seconds on a CPU; ``overrides`` go to LlamaConfig.

    The token ids are keyword-only and required: Llama's defaults (bos 1, eos 2, no pad) would
    silently disagree with a tokenizer whose ids differ.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **overrides,
    )


def build_tiny_llama(tokenizer, seed: int, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama sized to ``tokenizer``; the same seed gives the same weights.

    ``overrides`` go to ``tiny_llama_config``.
    """
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    # A forked generator keeps the caller's random stream (data order, dropout) independent of model creation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
