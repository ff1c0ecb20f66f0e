"""Compare dualadam_hf's native openPangu-Embedded with the published remote code, ids and logits.

The published code needs transformers 4.53 (and imports torch_npu), so the check has two halves run in
two environments; the JSON file between them holds the texts, the published ids and logits:

    # 1. in a venv with transformers==4.53.2, torch, sentencepiece, protobuf, where `import torch_npu`
    #    works (a stand-in module on CPU machines); CHECKPOINT holds the published remote-code files
    python scripts/check_openpangu_parity.py published CHECKPOINT parity.json
    # 2. in this project's venv
    python scripts/check_openpangu_parity.py native CHECKPOINT parity.json

The published half loads CHECKPOINT with trust_remote_code and also builds a second checkpoint with the
remote code's own classes and saves it under 4.53 (CHECKPOINT-saved-by-4.53); the native half loads both
with transformers 5 and dualadam_hf, and prints the id mismatches and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXTS = [
    "甲骨文是什么？", "Hello  world, mixed 中文 text", "罕见字：龘 😀", "  spaces  ", "", "a[unused10]b <s>x</s>",
    "[unused9]系统：[unused10][unused9]用户：你好[unused10][unused9]助手：", "\n\ttab and newline\n",
]
LOGIT_TEXTS = 6


# Read by path: the published half runs where dualadam_hf (transformers 5) cannot be imported.
SAMPLE = Path(__file__).resolve().parents[1] / "dualadam_hf" / "assets" / "alpaca_zh_sample.jsonl"


def _texts() -> list[str]:
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return TEXTS + [f"{record['instruction']}\n\n{record['output']}" for record in records[:100]]


def published(checkpoint: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    texts = json.loads(out.read_text())["texts"] if out.exists() else _texts()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True, use_fast=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, torch_dtype=torch.float32)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    probes = [row for row in ids if len(row) > 1][:LOGIT_TEXTS]
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    torch.manual_seed(0)
    built = type(model)(config)
    with torch.no_grad():
        for parameter in built.parameters():
            parameter.normal_(0.0, 0.05)
        logits = {name: [m(torch.tensor([row])).logits[0].tolist() for row in probes] for name, m in
                  (("checkpoint", model), ("saved-by-4.53", built))}
    saved = checkpoint.parent / f"{checkpoint.name}-saved-by-4.53"
    built.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    out.write_text(json.dumps({"texts": texts, "ids": ids, "probes": probes, "logits": logits}))
    print(f"published: {type(tokenizer).__name__}, {type(model).__name__}; wrote {out} and {saved}")


def native(checkpoint: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dualadam_hf  # noqa: F401  (registers the model type)

    reference = json.loads(out.read_text())
    for name in ("checkpoint", "saved-by-4.53"):
        directory = checkpoint if name == "checkpoint" else checkpoint.parent / f"{checkpoint.name}-saved-by-4.53"
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        mismatches = sum(tokenizer(text)["input_ids"] != ids for text, ids in zip(reference["texts"], reference["ids"]))
        with torch.no_grad():
            worst = max(
                (model(torch.tensor([row])).logits[0] - torch.tensor(logits)).abs().max().item()
                for row, logits in zip(reference["probes"], reference["logits"][name])
            )
        print(f"{name}: {type(tokenizer).__name__}, {type(model).__name__}; token ids differ on {mismatches} of "
              f"{len(reference['texts'])} texts; largest |logit difference| {worst:.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_openpangu_parity.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("side", choices=("published", "native"), help="which half to run in this environment")
    parser.add_argument("checkpoint", type=Path, help="an openPangu-Embedded checkpoint folder with the remote-code files")
    parser.add_argument("out", type=Path, help="the JSON file the published half writes and the native half reads")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        print(f"error: {args.checkpoint}: no config.json (not a checkpoint folder)", file=sys.stderr)
        return 2
    if args.side == "native" and not args.out.is_file():
        print(f"error: {args.out}: not found; run the published half first", file=sys.stderr)
        return 2
    (published if args.side == "published" else native)(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
