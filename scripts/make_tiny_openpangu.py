"""Write a tiny openPangu-Embedded checkpoint in the published on-disk format, offline.

    python scripts/make_tiny_openpangu.py DIR [--seed 0]

The checkpoint has random weights and a sentencepiece tokenizer trained on the shipped Chinese sample,
laid out as the published model repositories are (config.json with auto_map, sharded safetensors,
tokenizer.model, tokenizer_config.json with the chat template, and the remote-code files, here stand-ins
that fail on import). Use it to try the openPangu recipes without the Hub:

    python scripts/finetune.py recipes/pangu_alpaca.yaml --model_name_or_path DIR --bf16 false --use_cpu true ...
"""

from __future__ import annotations

import argparse
import sys

from dualadam_hf.models.openpangu_fixture import write_tiny_openpangu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_tiny_openpangu.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", help="where to write the checkpoint (created; an existing folder must be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_openpangu(args.directory, seed=args.seed)
    except (FileExistsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote a tiny openPangu-Embedded checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
