"""Fine-tune a causal LM on Alpaca-schema instructions with DualAdam (or any HF optimizer).

Usage:
    accelerate launch scripts/finetune.py RECIPE.yaml [--key value ...]
    python scripts/finetune.py recipes/tiny_alpaca.yaml --optim adamw_torch --output_dir outputs/adamw
    python scripts/finetune.py recipes/pangu_alpaca.yaml --dry_run true

The recipe's keys are field names of the model, data, LoRA and TrainingArguments dataclasses
(run with --help to list them); flags given on the command line win over the recipe.
"""

import sys

try:
    from dualadam_hf.train.finetune import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load (seconds): nothing has started, nothing to say
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(prog="finetune.py", description=__doc__))
