"""openPangu-Embedded, loaded natively: transformers' Llama with a bias on q, k, v and o.

The published checkpoints (openPangu-Embedded-1B, -1B-V1.1, -7B-V1.1) ship remote code that imports
``torch_npu`` and names removed in transformers 5, so ``trust_remote_code`` fails on every GPU and CPU.
The architecture is a Llama decoder whose attention projections all carry a bias (``bias: true`` in
``config.json``), with Llama's parameter names. Registering the published ``model_type`` and tokenizer
class here lets ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` load such a checkpoint
without running any of its Python files.

The tokenizer is the published sentencepiece ``tokenizer.model`` converted once to a ``tokenizers``
backend that encodes as the published ``PanguTokenizer`` does: text is split on the added tokens, every
piece in between goes through the sentencepiece model on its own (so each gets the dummy prefix), and
``<s>`` is prepended. Saved, it is a plain ``tokenizer.json`` that loads without sentencepiece.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub.dataclasses import strict
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    TokenizersBackend,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import is_protobuf_available, is_sentencepiece_available

SENTENCEPIECE_READERS = {"sentencepiece": is_sentencepiece_available, "protobuf": is_protobuf_available}
"""What transformers needs to read a sentencepiece ``tokenizer.model``."""

PUBLISHED_DEFAULTS = dict(
    unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>", add_bos_token=True, add_eos_token=False
)
"""``PanguTokenizer.__init__``'s defaults in the published tokenization_openpangu.py."""

MODEL_TYPE = "PanguEmbedded"
"""``model_type`` in the published ``config.json``; kept on save so vLLM and SGLang still know the model."""


@strict
class PanguEmbeddedConfig(LlamaConfig):
    """LlamaConfig under the published name and keys: ``bias`` puts a bias on q, k, v and o, never on the MLP.

    The published defaults are those of openPangu-Embedded-7B; a checkpoint's ``config.json`` sets its own.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 153376
    hidden_size: int = 4096
    intermediate_size: int = 12800
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 45892
    bias: bool = True

    def __post_init__(self, **kwargs):
        if "rope_theta" not in kwargs and self.rope_parameters is None:
            kwargs["rope_theta"] = 16_000_000.0
        # The published code reads `bias` alone; Llama's modules read these two.
        self.attention_bias = self.bias
        self.mlp_bias = False
        # The remote code this map points to is neither needed nor saved with a fine-tuned model.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("auto_map", None)
        # The published key, for readers that predate `rope_parameters` (vLLM, SGLang, llama.cpp).
        output["rope_theta"] = self.rope_parameters["rope_theta"]
        return output


class PanguEmbeddedModel(LlamaModel):
    config_class = PanguEmbeddedConfig


class PanguEmbeddedForCausalLM(LlamaForCausalLM):
    config_class = PanguEmbeddedConfig
    # Some published checkpoints (7B-V1.1) also store each layer's rotary inverse frequencies, which
    # Llama recomputes from the config.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class PanguTokenizer(TokenizersBackend):
    """The published tokenizer's name, bound to transformers' sentencepiece conversion.

    Without an ``__init__`` of its own, the backend builds the tokenizer from ``tokenizer.model`` with the
    model's normalizer spec, the ``added_tokens_decoder`` and ``legacy`` of ``tokenizer_config.json``, or
    loads ``tokenizer.json`` when one is there. ``tests/models/test_openpangu.py`` holds it to the
    published encoding rules.
    """

    model = BPE
    vocab_files_names = {"vocab_file": "tokenizer.model", "tokenizer_file": "tokenizer.json"}
    padding_side = "right"

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # The published class's own defaults: a tokenizer_config.json that transformers 4.53 saved from it
        # holds neither add_bos_token nor add_eos_token, and it prepends <s> all the same.
        for key, value in PUBLISHED_DEFAULTS.items():
            kwargs.setdefault(key, value)
        # It encodes every piece between added tokens on its own, whatever "legacy" says.
        kwargs["legacy"] = True
        # Say what is missing to read tokenizer.model: transformers would fall back to reading it as a tiktoken
        # file and report that package missing instead.
        tokenizer_json, vocab_file = kwargs.get("tokenizer_file"), kwargs.get("vocab_file")
        if not (tokenizer_json and os.path.isfile(tokenizer_json)) and vocab_file and os.path.isfile(vocab_file):
            missing = [name for name, available in SENTENCEPIECE_READERS.items() if not available()]
            if missing:
                raise ImportError(
                    f"converting {os.path.basename(vocab_file)} needs {' and '.join(missing)} "
                    f"(pip install {' '.join(missing)}); a saved tokenizer.json needs neither"
                )
        return super().convert_to_native_format(trust_remote_code=trust_remote_code, **kwargs)

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # Like the encoding, decode each stretch between added tokens on its own, so that the dummy-prefix
        # space of the piece after "[unused9]" is dropped as at the start of a text ("[unused9]助手：", not
        # "[unused9] 助手："); the added tokens are written as they are, with no spaces around them.
        if skip_special_tokens:
            return super()._decode(token_ids, skip_special_tokens=True, **kwargs)
        added = {index: token.content for index, token in self.added_tokens_decoder.items()}
        pieces: list[str] = []
        stretch: list[int] = []
        for index in [token_ids] if isinstance(token_ids, int) else token_ids:
            if index in added:
                if stretch:
                    pieces.append(super()._decode(stretch, **kwargs))
                    stretch = []
                pieces.append(added[index])
            else:
                stretch.append(index)
        if stretch:
            pieces.append(super()._decode(stretch, **kwargs))
        return "".join(pieces)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A saved copy is a plain tokenizers backend: tokenizer.json plus a config without the remote map,
        # so it loads anywhere (vLLM, transformers without this package) and never needs sentencepiece.
        kwargs.setdefault("legacy_format", False)
        self.init_kwargs.pop("auto_map", None)
        return super().save_pretrained(save_directory, *args, **kwargs)


def register() -> None:
    """Make the Auto classes load openPangu-Embedded natively. Leaves a native transformers version alone."""
    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, PanguEmbeddedConfig)
    AutoModel.register(PanguEmbeddedConfig, PanguEmbeddedModel)
    AutoModelForCausalLM.register(PanguEmbeddedConfig, PanguEmbeddedForCausalLM)
    AutoTokenizer.register(PanguEmbeddedConfig, tokenizer_class=PanguTokenizer)
