"""Load a causal LM and its tokenizer by hub id or directory, with one-line errors for everything a user can hit.

transformers reports a missing file, a missing optional package or an unknown architecture with
several exception types and many-line messages, some only after the weights are read. Here a local
directory is checked for its files first, so the message names the file that is missing; anything
transformers raises after that is cut to its first line, prefixed with what was being loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dualadam_hf.models.openpangu import MODEL_TYPE

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")

NATIVE_ONLY = {
    MODEL_TYPE: "openPangu-Embedded's published remote code imports torch_npu and names removed in transformers 5; "
    "dualadam_hf loads it natively: set trust_remote_code: false",
}
"""Model types whose remote code is refused, with the reason."""


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the one-line message names it and what is missing."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_config_dict(name: str) -> dict[str, Any]:
    """config.json as published, without running any of the checkpoint's code."""
    from transformers import PreTrainedConfig

    try:
        return PreTrainedConfig.get_config_dict(name)[0]
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the config of {name!r}: {first_line(error)}") from None


def _check_local_directory(directory: Path, config: dict[str, Any]) -> None:
    present = {path.name for path in directory.iterdir()}
    if not present & set(WEIGHT_FILES):
        raise ModelLoadError(f"{directory}: no weights (none of {', '.join(WEIGHT_FILES)})")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in present:
            try:
                shards = set(json.loads((directory / index_name).read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, TypeError) as error:
                raise ModelLoadError(f"{directory / index_name}: not a weight index ({first_line(error)})") from None
            missing = sorted(shards - present)
            if missing:
                raise ModelLoadError(f"{directory}: weight shard {missing[0]} named in {index_name} is missing")
    if not present & set(TOKENIZER_FILES):
        raise ModelLoadError(f"{directory}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")


def check_loadable(name: str, trust_remote_code: bool) -> dict[str, Any]:
    """Refuse, before any weights are read, what cannot load: returns the published config.json."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    directory = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not directory.exists():
        raise ModelLoadError(f"{name}: no such directory")
    if directory.is_dir() and not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory}: no config.json (not a model directory)")
    config = read_config_dict(name)
    model_type = config.get("model_type")
    if trust_remote_code and model_type in NATIVE_ONLY:
        raise ModelLoadError(f"{name}: trust_remote_code is refused for model type {model_type!r}: {NATIVE_ONLY[model_type]}")
    remote = trust_remote_code and "AutoModelForCausalLM" in config.get("auto_map", {})
    if model_type not in CONFIG_MAPPING and not remote:
        import transformers

        raise ModelLoadError(
            f"{name}: model type {model_type!r} is not supported by transformers {transformers.__version__}"
            + (" (its own code needs trust_remote_code: true)" if "auto_map" in config else "")
        )
    if directory.is_dir():
        _check_local_directory(directory, config)
    return config


def check_hub_kernels(use_kernels: bool) -> None:
    """Refuse ``use_kernels`` where the Hub is offline: transformers would fetch the kernels at the first
    training step on a GPU (``model.train()`` "kernelizes" the model) and fail there with a traceback."""
    import huggingface_hub

    if use_kernels and huggingface_hub.is_offline_mode():
        raise ModelLoadError(
            "use_kernels: true has transformers replace layers with compiled kernels fetched from the Hugging Face "
            "Hub (kernels-community/..., at the first training step on a GPU), and the Hub is offline "
            "(HF_HUB_OFFLINE); set use_kernels: false to train with the model's own PyTorch layers"
        )


def load_causal_lm(
    name: str,
    *,
    trust_remote_code: bool,
    dtype: Any = "auto",
    attn_implementation: str | None = None,
    use_kernels: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a hub id or a directory; a tokenizer without a pad token gets eos as pad.

    ``use_kernels`` is passed to transformers explicitly: left unset, transformers >= 5.2 turns the Hub's
    kernels on for every model (``USE_HUB_KERNELS`` defaults to yes), which downloads and runs compiled code
    the recipe did not ask for, and fails offline at the first training step on a GPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_loadable(name, trust_remote_code)
    check_hub_kernels(use_kernels)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {first_line(error)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, dtype=dtype, attn_implementation=attn_implementation,
            use_kernels=use_kernels,
        )
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise ModelLoadError(f"cannot load the model {name!r}: {first_line(error)}") from None
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and the attention, so any existing token serves.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
