"""Flatness of a finished run: rebuild its model and a fixed set of its training batches, then measure.

Works on output directories of scripts/finetune.py (full fine-tuning; a LoRA adapter alone is refused)
and scripts/train_vision.py, from the ``run_config.json`` they write. The batches are the first
``num_batches * batch_size`` training examples, in order, so two runs on the same data are measured
on the same batches. The model is in eval mode (no dropout, no augmentation, BatchNorm on running
statistics): the loss measured is that of the model as it predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualadam_hf.analysis.compare import CompareError
from dualadam_hf.analysis.flatness import hessian_trace, loss_over_batches, top_hessian_eigenvalue
from dualadam_hf.train.records import RunRecord, RunRecordError, read_run_record


def _vision(run_dir: Path, record: RunRecord, count: int) -> tuple[torch.nn.Module, list[dict]]:
    from safetensors.torch import load_file

    from dualadam_hf.train.vision.models import build_vision_model
    from dualadam_hf.train.vision.train import VisionArguments, load_splits

    splits = load_splits(
        VisionArguments(model_name=record.detail("model"), dataset_name=record.detail("dataset"),
                        augmentation=record.detail("augmentation"), split_seed=record.detail("split_seed", 0),
                        validation_size=record.detail("validation_size", 5000))
    )
    model = build_vision_model(record.detail("model"), splits.num_classes, splits.mean, splits.std,
                               record.detail("augmentation"))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    examples = [splits.train[i] for i in range(min(count, len(splits.train)))]
    return model, examples


def _causal_lm(run_dir: Path, record: RunRecord, count: int) -> tuple[torch.nn.Module, list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dualadam_hf.train.sft_data import DataArguments, prepare_datasets

    if record.detail("use_peft", False):
        raise CompareError(f"{run_dir}: a LoRA adapter run; flatness is measured on fully fine-tuned models")
    # eager attention: fused SDPA kernels have no double backward, which Hessian-vector products need
    model = AutoModelForCausalLM.from_pretrained(
        run_dir, dtype=torch.float32, attn_implementation="eager", use_kernels=False  # no Hub code (README)
    )
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    data_args = DataArguments(
        dataset_name=record.detail("dataset"), train_split=record.detail("train_split"),
        validation_split=record.detail("validation_split"), validation_fraction=record.detail("validation_fraction"),
        split_seed=record.detail("split_seed"), max_seq_length=record.detail("max_seq_length"),
    )
    train = prepare_datasets(data_args, tokenizer).train
    return model, [train[i] for i in range(min(count, len(train)))]


def measure_run(
    run_dir: Path, num_batches: int = 4, batch_size: int = 64, iters: int = 50, samples: int = 100, seed: int = 0
) -> dict[str, Any]:
    """Top Hessian eigenvalue (power iteration) and trace (Hutchinson, with its standard error)."""
    from dualadam_hf.train.sft_data import DataError, SFTCollator

    try:
        record = read_run_record(run_dir)
        if record.kind == "vision":
            from transformers import default_data_collator as collate

            model, examples = _vision(run_dir, record, num_batches * batch_size)
        else:
            model, examples = _causal_lm(run_dir, record, num_batches * batch_size)
            collate = SFTCollator(model.config.pad_token_id)
    except RunRecordError as error:
        raise CompareError(str(error) if str(error).startswith(str(run_dir)) else f"{run_dir}/{error}") from None
    except (OSError, DataError) as error:  # no saved model, data that cannot be rebuilt
        raise CompareError(f"{run_dir}: cannot rebuild the run: {str(error).splitlines()[0]}") from None
    batches = [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_over_batches(model, batches).item()
    eigenvalue = top_hessian_eigenvalue(lambda: loss_over_batches(model, batches), params, iters=iters, seed=seed)
    trace, trace_stderr = hessian_trace(lambda: loss_over_batches(model, batches), params, samples=samples, seed=seed)
    return {
        "run": str(run_dir), "optimizer": record.optim, "seed": record.seed,
        "examples": len(examples), "loss": loss, "top_eigenvalue": eigenvalue,
        "trace": trace, "trace_stderr": trace_stderr,
    }


def group_statistics(results: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {"top_eigenvalue" | "trace" | "loss": {"mean", "std" (sample), "n"}}}."""
    from dualadam_hf.analysis.sweep import mean_std

    groups: dict[str, list[dict[str, Any]]] = {}
    for group, result in results:
        groups.setdefault(group, []).append(result)
    return {
        group: {key: mean_std([r[key] for r in runs]) for key in ("top_eigenvalue", "trace", "loss")}
        for group, runs in groups.items()
    }
