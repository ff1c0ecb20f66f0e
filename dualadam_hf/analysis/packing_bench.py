"""Training throughput padded against packed: non-pad tokens per second, side by side in one process.

Two copies of one model (the same weights), each with its own DualAdam, train on the same batches of
the same examples. A round times ``steps`` training steps (forward, backward, optimizer step) of each
layout, in an order that rotates every round, and the median round is kept, so that a noisy, shared
machine slows both alike. Padded: each batch right-padded to its longest example, SDPA with the padding
mask (``SFTCollator``). Packed: the batch in one row, ``packed_sdpa`` (SDPA on each example on a CPU, torch's
varlen FlashAttention kernel on a CUDA card in bf16/fp16).

Two cases:
- ``tiny``: ``recipes/tiny_alpaca.yaml``'s model and data (the shipped sample, batch 16, 192 tokens).
- ``openpangu``: the openPangu-format fixture with Alpaca-GPT4-CN's length distribution, batch 4 as
  ``recipes/pangu_alpaca.yaml``. The fixture's tokenizer is tiny, so the lengths are not taken from its
  tokens: each example has the prompt and response lengths of one record of
  ``assets/alpaca_gpt4_zh_lengths.json`` (characters), mapped to tokens by one affine map whose mean and
  standard deviation are the published full-set statistics (164.1 +- 93.9 tokens; the asset says where
  each comes from), with random token ids.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dualadam_hf.hf.packing import PACKED_SDPA, packed_collator, register
from dualadam_hf.optim import DualAdam
from dualadam_hf.train.sft_data import IGNORE_INDEX, SFTCollator

LENGTHS_ASSET = Path(__file__).resolve().parents[1] / "assets" / "alpaca_gpt4_zh_lengths.json"
# Published tokens per Alpaca-GPT4-CN record, chat template included (see the asset).
TOKENS_MEAN, TOKENS_STD = 164.1, 93.9
CASES = ("tiny", "openpangu")
PACKED_ATTENTIONS = (PACKED_SDPA, "sdpa", "eager")


@dataclass(frozen=True)
class PackingResult:
    case: str
    packed_attention: str
    batch_size: int
    steps: int
    rounds: int
    nonpad_tokens: int  # per round
    padding_share: float  # pad tokens / all tokens of the padded layout
    padded_tokens_per_second: float
    packed_tokens_per_second: float

    @property
    def speedup(self) -> float:
        return self.packed_tokens_per_second / self.padded_tokens_per_second

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), speedup=self.speedup)


def alpaca_gpt4_like_examples(count: int, vocab_size: int, max_seq_length: int, seed: int = 0) -> list[dict]:
    """``count`` examples whose prompt and response lengths follow Alpaca-GPT4-CN's (module docstring);
    prompt tokens are masked out of the labels, as the fine-tuning data does."""
    records = json.loads(LENGTHS_ASSET.read_text(encoding="utf-8"))["prompt_and_output_chars"]
    chars = [prompt + output for prompt, output in records]
    scale = TOKENS_STD / statistics.stdev(chars)
    template = TOKENS_MEAN - scale * statistics.mean(chars)  # the tokens of the template, put in the prompt
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(records), (count,), generator=generator).tolist()
    examples = []
    for pick in picks:
        prompt_chars, output_chars = records[pick]
        prompt = min(max(1, round(scale * prompt_chars + template)), max_seq_length - 1)
        response = min(max(1, round(scale * output_chars)), max_seq_length - prompt)
        ids = torch.randint(3, vocab_size, (prompt + response,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def tiny_case() -> tuple[Callable[[], torch.nn.Module], list[dict], int, int]:
    """The tiny recipe: (model factory, examples, batch size, pad id)."""
    from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE, build_tiny_llama, load_tiny_tokenizer
    from dualadam_hf.train.sft_data import DataArguments, prepare_datasets

    tokenizer = load_tiny_tokenizer()
    data = prepare_datasets(DataArguments(dataset_name=str(ALPACA_ZH_SAMPLE), max_seq_length=192), tokenizer)
    examples = [dict(input_ids=row["input_ids"], labels=row["labels"]) for row in data.train]
    return (lambda: build_tiny_llama(tokenizer, seed=0)), examples, 16, tokenizer.pad_token_id


def openpangu_case(directory: Path) -> tuple[Callable[[], torch.nn.Module], list[dict], int, int]:
    """The openPangu-format fixture with Alpaca-GPT4-CN lengths, 1024 tokens at most (the recipe's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dualadam_hf.models.openpangu_fixture import write_tiny_openpangu

    checkpoint = write_tiny_openpangu(directory / "tiny-openPangu-Embedded")
    vocab_size = AutoConfig.from_pretrained(checkpoint).vocab_size
    examples = alpaca_gpt4_like_examples(256, vocab_size, max_seq_length=1024)

    def load() -> Any:  # no Hub kernels: see use_kernels in the README
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, use_kernels=False)

    return load, examples, 4, 0


def measure(
    case: str,
    make_model: Callable[[], torch.nn.Module],
    examples: list[dict],
    *,
    batch_size: int,
    pad_token_id: int,
    steps: int,
    rounds: int,
    packed_attention: str = PACKED_SDPA,
    seed: int = 0,
) -> PackingResult:
    """``packed_attention``: how the packed copy keeps examples apart (eager and sdpa: by transformers'
    block-diagonal mask)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [[examples[order[(step * batch_size + k) % len(order)]] for k in range(batch_size)] for step in range(steps)]
    pad = SFTCollator(pad_token_id)
    collated = {
        "padded": [pad([dict(example, attention_mask=[1] * len(example["input_ids"])) for example in batch])
                   for batch in batches],
        "packed": [packed_collator()(batch) for batch in batches],
    }
    register()
    trainers = {}
    for layout in collated:
        model = make_model().train()
        model.set_attn_implementation(packed_attention if layout == "packed" else "sdpa")
        model.config.use_cache = False  # as prepare_for_packing does; padded batches take no cache either
        trainers[layout] = (model, DualAdam(model.parameters(), lr=1e-4))

    def train(layout: str) -> float:
        model, optimizer = trainers[layout]
        start = time.perf_counter()
        for batch in collated[layout]:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for layout in collated:  # warm-up: allocations and the optimizer's state
        train(layout)
    seconds: dict[str, list[float]] = {layout: [] for layout in collated}
    layouts = list(collated)
    for round_index in range(rounds):
        for layout in layouts[round_index % 2 :] + layouts[: round_index % 2]:
            seconds[layout].append(train(layout))
    lengths = [[len(example["input_ids"]) for example in batch] for batch in batches]
    nonpad = sum(sum(batch) for batch in lengths)
    layout_tokens = sum(len(batch) * max(batch) for batch in lengths)
    return PackingResult(
        case=case,
        packed_attention=packed_attention,
        batch_size=batch_size,
        steps=steps,
        rounds=rounds,
        nonpad_tokens=nonpad,
        padding_share=(layout_tokens - nonpad) / layout_tokens,
        padded_tokens_per_second=nonpad / statistics.median(seconds["padded"]),
        packed_tokens_per_second=nonpad / statistics.median(seconds["packed"]),
    )


def run_cases(cases: list[str], *, steps: int, rounds: int, packed_attention: str = PACKED_SDPA) -> list[PackingResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_packing.") as scratch:
        for case in cases:
            make_model, examples, batch_size, pad_token_id = (
                tiny_case() if case == "tiny" else openpangu_case(Path(scratch))
            )
            results.append(measure(case, make_model, examples, batch_size=batch_size, pad_token_id=pad_token_id,
                                   steps=steps, rounds=rounds, packed_attention=packed_attention))
    return results


def format_table(results: list[PackingResult]) -> str:
    lines = [
        "| case | packed attention | batch | padding share | padded non-pad tokens/s | packed non-pad tokens/s "
        "| packed / padded |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result.case} | {result.packed_attention} | {result.batch_size} | {result.padding_share:.3f} | "
            f"{result.padded_tokens_per_second:,.0f} | {result.packed_tokens_per_second:,.0f} | {result.speedup:.2f} |"
        )
    return "\n".join(lines)
