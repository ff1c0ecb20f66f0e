"""What the fine-tuned model answers: greedy generations for fixed held-out prompts at each evaluation.

The prompts come from the tokenized evaluation set itself (an example's tokens before its first learnt
label are the prompt, its learnt tokens the reference), chosen once with the run's seed, so every run on
the same data answers the same prompts. Each process generates its share, left-padded, stopping at the
tokenizer's eos and the model's eos ids (the end-of-turn token of a chat template); under ZeRO-3 and FSDP
every process takes part in every forward (``synced_gpus``). The answers are gathered, scored with
``generation_metric`` (BLEU-4, ROUGE-L) and written by the main process.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualadam_hf.hf.metrics import IGNORE_INDEX

METRIC_DIR = Path(__file__).parent / "generation_metric"


def generation_metric() -> Any:
    """The package's BLEU-4 / ROUGE-L ``evaluate`` module, loaded offline from its folder."""
    import evaluate

    return evaluate.load(str(METRIC_DIR))


@dataclass(frozen=True)
class Prompt:
    index: int  # in the evaluation set
    prompt_ids: list[int]
    reference_ids: list[int]


def _learnt_mask(example: dict) -> list[bool] | None:
    if "labels" in example:
        return [label != IGNORE_INDEX for label in example["labels"]]
    if "completion_mask" in example:  # TRL's prompt-completion examples
        return [bool(flag) for flag in example["completion_mask"]]
    return None


def select_prompts(dataset: Any, count: int, seed: int) -> list[Prompt]:
    """``count`` examples of ``dataset`` (drawn once with ``seed``), split into prompt and reference ids."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    prompts = []
    for index in order:
        example = dataset[index]
        learnt = _learnt_mask(example)
        if learnt is None:
            raise ValueError("generation_eval_samples: evaluation examples need 'labels' (or 'completion_mask')")
        if True not in learnt or learnt.index(True) == 0:
            continue  # nothing to answer, or no prompt to answer from
        first = learnt.index(True)
        ids = list(example["input_ids"])
        prompts.append(Prompt(index, ids[:first], [token for token, keep in zip(ids, learnt) if keep]))
        if len(prompts) == count:
            break
    return sorted(prompts, key=lambda prompt: prompt.index)


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[Prompt], *, max_new_tokens: int, batch_size: int, synced_gpus: bool
) -> list[tuple[list[int], bool]]:
    """Greedy answers (ids without padding, up to and with the eos) and whether each ended with an eos."""
    from transformers import GenerationConfig

    stop = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop,
                              pad_token_id=pad, use_cache=True)
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(prompt.prompt_ids) for prompt in batch)
        input_ids = torch.tensor([[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in batch], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config, synced_gpus=synced_gpus)
        for row in output[:, width:].tolist():
            ended = next((position for position, token in enumerate(row) if token in stop), None)
            answers.append((row if ended is None else row[: ended + 1], ended is not None))
    return answers


def summarize(records: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    scores = generation_metric().compute(predictions=[r["answer"] for r in records],
                                         references=[r["reference"] for r in records])
    return {
        f"{prefix}_bleu": scores["bleu"],
        f"{prefix}_rouge_l": scores["rouge_l"],
        f"{prefix}_gen_len": sum(r["generated_tokens"] for r in records) / len(records),
        f"{prefix}_gen_eos_rate": sum(r["ended_with_eos"] for r in records) / len(records),
    }


def write_samples(records: list[dict[str, Any]], output_dir: str, step: int) -> Path:
    folder = Path(output_dir) / "generations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step}.jsonl"
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def markdown_cell(text: str) -> str:
    """Text that stays in one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown_table(records: list[dict[str, Any]], limit: int = 8) -> str:
    rows = ["| prompt | reference | answer |", "|---|---|---|"]
    for record in records[:limit]:
        rows.append("| " + " | ".join(markdown_cell(record[key]) for key in ("prompt", "reference", "answer")) + " |")
    return "\n".join(rows)


def shard(prompts: list[Prompt], rank: int, world: int) -> list[Prompt | None]:
    """This process's prompts, padded with None to the same count on every process (synced forwards)."""
    mine: list[Prompt | None] = list(prompts[rank::world])
    return mine + [None] * (math.ceil(len(prompts) / world) - len(mine))
