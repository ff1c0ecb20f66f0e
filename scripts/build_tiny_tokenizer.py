"""Rebuild the built-in tiny tokenizer from the shipped Chinese Alpaca sample.

Usage: python scripts/build_tiny_tokenizer.py [--sample PATH] [--vocab-size N] [--output-dir DIR]

Training is deterministic, so running it on the unchanged sample reproduces the shipped files.
"""

import argparse
from pathlib import Path

from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE, TINY_TOKENIZER_DIR, TINY_VOCAB_SIZE, train_tiny_tokenizer
from dualadam_hf.train.sft_data import alpaca_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=ALPACA_ZH_SAMPLE, help="Alpaca JSONL file to train on.")
    parser.add_argument("--vocab-size", type=int, default=TINY_VOCAB_SIZE, help="Target vocabulary size.")
    parser.add_argument("--output-dir", type=Path, default=TINY_TOKENIZER_DIR, help="Where to save the tokenizer.")
    args = parser.parse_args()

    tokenizer = train_tiny_tokenizer(alpaca_texts(args.sample), args.vocab_size)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
