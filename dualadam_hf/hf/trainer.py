"""DualAdamTrainer: the HF Trainer plus the measures that tell whether a run generalizes.

At every evaluation: ``eval_loss`` (token-weighted NLL over the whole validation set), ``eval_ppl``,
``eval_train_loss`` (the same measure, in eval mode, on a fixed subset of the training set) and
``eval_gen_gap`` = eval_loss - eval_train_loss; classifiers get ``eval_accuracy`` instead of a
perplexity. At every training log: ``dualadam_alpha`` whenever DualAdam or InvAdam does the steps.
Everything goes through ``Trainer.log``, so every ``report_to`` reporter sees it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import speed_metrics

from dualadam_hf.diagnostics import inv_share, inv_share_sums
from dualadam_hf.hf.metrics import per_example_stats, safe_perplexity, summarize
from dualadam_hf.hf.optim_args import parse_optim_args
from dualadam_hf.hf.registration import is_ours, run_length
from dualadam_hf.hf.unwrap import find_dualadam, unwrap_optimizer
from dualadam_hf.optimizer import DualAdam

logger = logging.getLogger(__name__)

# Default size of the training subset measured at each evaluation: the validation set's size, capped,
# so that evaluation costs at most about twice a plain HF evaluation.
TRAIN_EVAL_CAP = 2048


@dataclass
class DualAdamTrainingArguments(TrainingArguments):
    train_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Training examples measured in eval mode at each evaluation for eval_train_loss and "
            f"eval_gen_gap (a fixed subset drawn with `seed`). Default: the validation set's size, at most "
            f"{TRAIN_EVAL_CAP}. 0 turns the measurement off."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_eval_samples is not None and self.train_eval_samples < 0:
            raise ValueError(f"train_eval_samples must be >= 0, got {self.train_eval_samples}")


class DualAdamTrainer(Trainer):
    """A ``transformers.Trainer`` that builds DualAdam/InvAdam when ``optim`` names them (any other
    optimizer otherwise) and reports validation perplexity and the generalization gap.

    It computes its own evaluation measures from the model's logits, so ``compute_metrics`` and
    ``preprocess_logits_for_metrics`` are not supported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("compute_metrics") is not None or kwargs.get("preprocess_logits_for_metrics") is not None:
            raise ValueError(
                "DualAdamTrainer computes its own metrics (loss, ppl, accuracy, gen_gap); "
                "compute_metrics and preprocess_logits_for_metrics are not supported"
            )
        super().__init__(*args, **kwargs)
        if is_ours(self.args.optim):
            # refuse a misspelt optim_args key now, not after the model is loaded and wrapped
            parse_optim_args(str(self.args.optim.value), self.args.optim_args)
        self._train_eval_subset: Dataset | None = None
        self._eval_task: str | None = None

    # ---- optimizer ----

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        # state.max_steps is the run's total optimizer steps once training has started: switch_ratio needs it
        with run_length(self.state.max_steps or None):
            optimizer = super().create_optimizer(model)
        logger.info("optimizer: %s", type(unwrap_optimizer(optimizer)).__name__)
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            optimizer = find_dualadam(self.optimizer)
            alpha = optimizer.latest_alpha() if optimizer is not None else None
            if alpha is not None:
                logs["dualadam_alpha"] = alpha
                share = self._inv_share(optimizer)
                if share is not None:
                    logs["dualadam_inv_share"] = share
        super().log(logs, start_time)

    def _inv_share(self, optimizer: DualAdam) -> float | None:
        """‖α·ũ‖ / ‖ū‖ of the latest step over all parameters (computed only here, at logging steps).

        ZeRO and FSDP2 partition the optimizer state, so each process's sums are added up; under
        DDP every process holds the whole state and its own sums are the total. Every process calls
        log(), so the reduction is collective.
        """
        sums = inv_share_sums(optimizer)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            totals = self.accelerator.reduce(torch.tensor(sums, dtype=torch.float64, device=self.args.device), "sum")
            sums = tuple(totals.tolist())
        return inv_share(*sums)

    # ---- evaluation ----

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[None, torch.Tensor, None]:
        """Per-example [nll_sum, label_count, correct] rows; the evaluation loop gathers them."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DualAdamTrainer evaluates losses: evaluation batches need a 'labels' field")
        features = {key: value for key, value in inputs.items() if key != "labels"}
        with torch.no_grad():
            outputs = model(**features)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        self._eval_task = "causal_lm" if logits.dim() == 3 else "classification"
        return None, per_example_stats(logits, labels), None

    def _measure(self, dataset: Dataset, description: str, prefix: str) -> tuple[dict[str, float], Any]:
        dataloader = self.get_eval_dataloader(dataset)
        output = self.evaluation_loop(
            dataloader, description=description, prediction_loss_only=False, metric_key_prefix=prefix
        )
        stats = torch.as_tensor(output.predictions) if output.predictions is not None else torch.empty(0, 3)
        return summarize(stats), output

    def _train_subset(self, eval_size: int | None) -> Dataset | None:
        if self._train_eval_subset is not None:
            return self._train_eval_subset
        requested = getattr(self.args, "train_eval_samples", None)
        if requested == 0 or self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            return None
        size = requested if requested is not None else min(eval_size or TRAIN_EVAL_CAP, TRAIN_EVAL_CAP)
        size = min(size, len(self.train_dataset))
        generator = torch.Generator().manual_seed(self.args.seed)
        indices = sorted(torch.randperm(len(self.train_dataset), generator=generator)[:size].tolist())
        if hasattr(self.train_dataset, "select"):
            self._train_eval_subset = self.train_dataset.select(indices)
        else:
            self._train_eval_subset = Subset(self.train_dataset, indices)
        return self._train_eval_subset

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Evaluate on the validation set(s) and on the fixed training subset, then log.

        A dict of validation sets gives ``{prefix}_{name}_loss`` / ``_ppl`` / ``_gen_gap`` for each,
        against one ``{prefix}_train_loss`` measured once per call.
        """
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        named = list(eval_dataset.items()) if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
        first_size = len(named[0][1]) if hasattr(named[0][1], "__len__") else None

        train_loss = None
        train_subset = self._train_subset(first_size)
        if train_subset is not None:
            train_summary, _ = self._measure(train_subset, "Evaluation on the training subset", metric_key_prefix)
            train_loss = train_summary["loss"]

        metrics: dict[str, float] = {}
        for index, (name, dataset) in enumerate(named):
            prefix = metric_key_prefix if name is None else f"{metric_key_prefix}_{name}"
            report_train_loss = train_loss if index == 0 else None
            metrics.update(self._evaluate_one(dataset, prefix, metric_key_prefix, train_loss, report_train_loss))
        return metrics

    def _evaluate_one(
        self,
        dataset: Dataset,
        prefix: str,
        metric_key_prefix: str,
        train_loss: float | None,
        report_train_loss: float | None,
    ) -> dict[str, float]:
        self._memory_tracker.start()
        start_time = time.time()
        summary, output = self._measure(dataset, "Evaluation", prefix)
        metrics = {f"{prefix}_loss": summary["loss"]}
        if self._eval_task == "classification":
            metrics[f"{prefix}_accuracy"] = summary["accuracy"]
        else:
            metrics[f"{prefix}_ppl"] = safe_perplexity(summary["loss"])
        if report_train_loss is not None:
            metrics[f"{metric_key_prefix}_train_loss"] = report_train_loss
        if train_loss is not None:
            metrics[f"{prefix}_gen_gap"] = summary["loss"] - train_loss
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        metrics.update(
            speed_metrics(
                prefix,
                start_time,
                num_samples=output.num_samples,
                num_steps=math.ceil(output.num_samples / total_batch_size),
            )
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics
