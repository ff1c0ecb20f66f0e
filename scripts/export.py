"""Export a fine-tuned model as a standalone checkpoint for the tools that serve models (vLLM, llama.cpp, ...).

Usage:
    python scripts/export.py RUN_DIR --out DIR [--format openpangu|llama] [--dtype auto|bf16|fp32] [--overwrite]
    python scripts/export.py outputs/tiny_alpaca --out outputs/tiny_alpaca-export
    python scripts/export.py outputs/pangu_alpaca --out exports/pangu --format llama --dtype bf16

RUN_DIR is a run's output_dir (a LoRA adapter is merged into the base model the run recorded), one of its
checkpoint-N folders, a model folder or a Hub id. DIR gets safetensors shards, the tokenizer, the generation
config and a model card (README.md). --format openpangu (the default for openPangu-Embedded) writes the
published layout; --format llama (the default for Llama) writes LlamaForCausalLM and a plain tokenizer.json
that stock transformers loads without dualadam_hf.
"""

import sys

from dualadam_hf.serve.export import main

if __name__ == "__main__":
    sys.exit(main(prog="export.py", description=__doc__))
