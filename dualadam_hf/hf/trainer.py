"""DualAdamTrainer (and DualAdamMetricsMixin, the same for any Trainer subclass): the HF Trainer plus the
measures that tell whether a run generalizes.

At every evaluation: ``eval_loss`` (token-weighted NLL over the whole validation set), ``eval_ppl``,
``eval_train_loss`` (the same measure, in eval mode, on a fixed subset of the training set) and
``eval_gen_gap`` = eval_loss - eval_train_loss; classifiers get ``eval_accuracy`` instead of a
perplexity. At every training log: ``dualadam_alpha`` whenever DualAdam or InvAdam does the steps.
Everything goes through ``Trainer.log``, so every ``report_to`` reporter sees it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from accelerate.utils import gather_object
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints, speed_metrics

from dualadam_hf.hf.checkpoints import (TRAINER_STATE, SaveError, latest_complete, partial_dirs, publish,
                                        save_failures_in_one_line, skipped_note, staging_dir, write_manifest)
from dualadam_hf.hf.collective import max_over_processes
from dualadam_hf.hf.generation import Prompt, generate, markdown_table, select_prompts, shard, write_samples
from dualadam_hf.hf.generation import summarize as summarize_generations
from dualadam_hf.hf.launch import check_deepspeed_precision
from dualadam_hf.hf.metrics import per_example_stats, safe_perplexity, summarize
from dualadam_hf.hf.packing import batch_token_counts, segment_bounds, token_metrics
from dualadam_hf.hf.preemption import PreemptionWatch, RunPreempted
from dualadam_hf.hf.registration import OPTIMIZERS, is_ours, run_length
from dualadam_hf.hf.resume import apply_accepted_changes, group_settings, write_run_settings
from dualadam_hf.hf.settings import inv_scale_on_shards, settings_of, settle
from dualadam_hf.hf.unwrap import find_dualadam, unwrap_optimizer
from dualadam_hf.optim import DualAdam
from dualadam_hf.optim.diagnostics import inv_share, inv_share_sums

logger = logging.getLogger(__name__)

# Default size of the training subset measured at each evaluation: the validation set's size, capped,
# so that evaluation costs at most about twice a plain HF evaluation.
TRAIN_EVAL_CAP = 2048
# TrainingArguments' float fields; inf or NaN in any of them is a typo, refused at construction
LOWER_IS_BETTER = ("loss", "ppl", "gen_gap")
FINITE_FIELDS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                 "warmup_steps", "num_train_epochs")


class LaunchConfigError(ValueError):
    """The launcher's configuration (DeepSpeed, FSDP), read once the Trainer exists, does not fit the optimizer."""


class DeepSpeedConfigError(LaunchConfigError):
    """The DeepSpeed config would make another optimizer train while ``optim`` names ours."""


@contextmanager
def zero3_partitions_in_groups(optimizer: Any) -> Iterator[None]:
    """Let DualAdam's param groups show the tensors it steps under DeepSpeed ZeRO-3.

    ZeRO-3 steps the base optimizer once per sub-group, putting that sub-group's flat fp32 partition
    into ``param_groups[i]["params"]`` only for the step and leaving the list empty afterwards, so
    reading alpha or the state between steps would find nothing. Elsewhere this does nothing.
    """
    zero3 = optimizer
    while zero3 is not None and not hasattr(zero3, "fp32_partitioned_groups_flat"):
        zero3 = getattr(zero3, "optimizer", None)
    if zero3 is None:
        yield
        return
    groups = zero3.optimizer.param_groups
    saved = [group["params"] for group in groups]
    visible: list[list[torch.Tensor]] = [[] for _ in groups]
    for sub_group, group_index in zero3.sub_group_to_group_id.items():
        visible[group_index].append(zero3.fp32_partitioned_groups_flat[sub_group])
    try:
        for group, params in zip(groups, visible):
            group["params"] = params
        yield
    finally:
        for group, params in zip(groups, saved):
            group["params"] = params


@dataclass
class DualAdamTrainingArguments(TrainingArguments):
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace a NaN/inf training loss by the running average in the logs (transformers' default is "
            "true). Off here: a non-finite step stops the run instead, and logs never hide one."
        },
    )
    train_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Training examples measured in eval mode at each evaluation for eval_train_loss and "
            f"eval_gen_gap (a fixed subset drawn with `seed`). Default: the validation set's size, at most "
            f"{TRAIN_EVAL_CAP}. 0 turns the measurement off."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let a run replace the run already in output_dir: everything in it is moved into "
            "output_dir/.previous-run when the run starts, put back if the run stops before its first save, and "
            "removed once it has saved. Without it, the scripts refuse an output_dir that holds a finished run or "
            "checkpoints, unless they resume from it."
        },
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "With resume_from_checkpoint: take the checkpoint's weights and trainer state but a fresh optimizer "
            "and learning-rate schedule (alpha restarts at 1). Without it a checkpoint lacking optimizer state is refused."
        },
    )
    resume_accept_changes: list[str] | None = field(
        default=None,
        metadata={
            "help": "Settings a resume may change from the checkpoint's recipe (comma-separated names, e.g. "
            "learning_rate,switch_rate); each is applied from the resumed step and recorded in run_config.json. "
            "Without it a resume that changes any recorded setting is refused, naming each change."
        },
    )
    save_on_preemption: bool = field(
        default=True,
        metadata={
            "help": "On SIGTERM, SIGINT or SIGUSR1 (SLURM's --signal): finish the optimizer step, save a checkpoint, "
            "stop with exit code 128 + the signal's number. A second signal stops at once."
        },
    )

    generation_eval_samples: int = field(
        default=0,
        metadata={
            "help": "At every evaluation, greedy answers to this many fixed held-out prompts (chosen once with `seed`): "
            "eval_bleu, eval_rouge_l, eval_gen_len, eval_gen_eos_rate, and output_dir/generations/step_N.jsonl. "
            "0 turns it off."
        },
    )
    generation_max_new_tokens: int = field(
        default=128, metadata={"help": "Length cap of each generated answer, in tokens (an answer stops at eos first)."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improving metric_for_best_model (default eval_ppl, "
            "lower is better). None: off."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "How much metric_for_best_model must improve to count as an improvement."}
    )

    def __post_init__(self) -> None:
        save, evaluation = (str(getattr(value, "value", value)) for value in (self.save_strategy, self.eval_strategy))
        if self.load_best_model_at_end and save not in (evaluation, "best"):
            # transformers says so too, over two lines; one, naming both settings
            raise ValueError(
                f"load_best_model_at_end needs checkpoints where it evaluates: save_strategy is {save}, eval_strategy "
                f"{evaluation}; make them equal (and save_steps a multiple of eval_steps) or set save_strategy: best"
            )
        if (self.load_best_model_at_end or self.early_stopping_patience) and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_ppl"
        if self.greater_is_better is None and str(self.metric_for_best_model).endswith(LOWER_IS_BETTER):
            self.greater_is_better = False  # transformers would take any name but *loss for higher-is-better
        if isinstance(self.report_to, str) and "," in self.report_to:  # "wandb,tensorboard": transformers takes
            # it for one reporter's name
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        super().__post_init__()
        if self.generation_eval_samples < 0 or self.generation_max_new_tokens < 1:
            raise ValueError(
                f"generation_eval_samples must be >= 0 and generation_max_new_tokens >= 1, got "
                f"{self.generation_eval_samples} and {self.generation_max_new_tokens}"
            )
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ValueError(f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience}")
            if self.eval_strategy.value == "no":
                raise ValueError("early_stopping_patience needs evaluations: set eval_strategy to steps or epoch")
        for name in FINITE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.train_eval_samples is not None and self.train_eval_samples < 0:
            raise ValueError(f"train_eval_samples must be >= 0, got {self.train_eval_samples}")
        if isinstance(self.lr_scheduler_kwargs, str):  # TrainingArguments keeps a string that is not JSON
            raise ValueError(f"lr_scheduler_kwargs must be a JSON object, got {self.lr_scheduler_kwargs!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_deepspeed_precision(self)
        # optim_args parsed and checked once, here; everything after reads optim_settings
        self.optim_settings, self.optim_args_note = settle(self)


class NonFiniteError(RuntimeError):
    """A training step whose loss or gradient norm is NaN or infinite; the run stops before that step."""


class DualAdamMetricsMixin:
    """What DualAdamTrainer adds to a Trainer, for any ``transformers.Trainer`` subclass (put it first):
    ``class MySFT(DualAdamMetricsMixin, trl.SFTTrainer)``.

    It builds DualAdam/InvAdam when ``optim`` names them, knowing the run's length (``switch_ratio``),
    refuses DeepSpeed settings that would replace them, logs ``dualadam_alpha`` and
    ``dualadam_inv_share`` with the training loss, and evaluates to ``eval_loss``, ``eval_ppl``,
    ``eval_train_loss`` and ``eval_gen_gap``. It computes these measures from the model's logits, so
    ``compute_metrics`` and ``preprocess_logits_for_metrics`` are not supported.

    And it keeps runs whole: the first step whose loss or gradient norm is not finite raises
    ``NonFiniteError`` before the optimizer applies it (one scalar read per optimizer step), and each
    checkpoint appears by one rename once every process has written it (``dualadam_hf.hf.checkpoints``).
    """

    _step_loss: torch.Tensor | None = None
    _evaluation_seconds = 0.0  # spent in evaluate() since train() began
    # [non-pad tokens, tokens of the padded layout] trained on by this process since train() began
    _token_counts: torch.Tensor | None = None
    _checkpoint_staging: str | None = None
    _preemption: PreemptionWatch | None = None
    _fresh_groups: list[dict[str, Any]] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("compute_metrics") is not None or kwargs.get("preprocess_logits_for_metrics") is not None:
            raise ValueError(
                f"{type(self).__name__} computes its own metrics (loss, ppl, accuracy, gen_gap); "
                "compute_metrics and preprocess_logits_for_metrics are not supported"
            )
        super().__init__(*args, **kwargs)
        if is_ours(self.args.optim):
            # refuse what DualAdam would refuse (a misspelt optim_args key, a beta >= 1, ...) now, not after
            # the model is wrapped and the optimizer is built (DualAdamTrainingArguments did it already)
            settings_of(self.args)
            self._refuse_replaced_optimizer()
        self._train_eval_subset: Dataset | None = None
        self._eval_task: str | None = None
        self._generation_prompts: list[Prompt] | None = None
        if getattr(self.args, "generation_eval_samples", 0) and self.processing_class is None:
            raise ValueError("generation_eval_samples needs the tokenizer: pass processing_class=tokenizer")
        patience = getattr(self.args, "early_stopping_patience", None)
        if patience is not None:
            self.add_callback(EarlyStoppingCallback(patience, getattr(self.args, "early_stopping_threshold", 0.0)))

    # ---- whole runs: non-finite steps, atomic checkpoints ----

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        counts = batch_token_counts(inputs)
        if counts is not None:
            self._token_counts = counts if self._token_counts is None else self._token_counts + counts
        loss = super().training_step(model, inputs, num_items_in_batch)
        step_loss = loss.detach().float().sum()
        self._step_loss = step_loss if self._step_loss is None else self._step_loss + step_loss
        return loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        # called once per optimizer step, after the backward passes and before optimizer.step()
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss, self._step_loss = self._step_loss, None
        if loss is not None:
            norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=loss.device)
            if not bool(torch.isfinite(torch.stack([loss, norm])).all()):
                self._stop_on_non_finite(loss.item(), norm.item())
        return grad_norm

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's run, whose metrics add what padding cost, summed over processes and logged (every
        reporter sees them): ``train_padding_share`` (pad tokens / all tokens of the padded layout: computed
        without packing, removed with it) and ``train_nonpad_tokens_per_second`` (over ``train_runtime``
        less the evaluations run during training)."""
        self._token_counts, self._evaluation_seconds = None, 0.0
        if getattr(self.args, "save_on_preemption", False):
            with PreemptionWatch() as self._preemption:
                result = super().train(*args, **kwargs)
        else:
            result = super().train(*args, **kwargs)
        counts = self._token_counts
        if counts is None:
            counts = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        runtime = result.metrics.get("train_runtime")
        metrics = token_metrics(counts, runtime - self._evaluation_seconds if runtime else None)
        result.metrics.update(metrics)
        if metrics:
            self.log(metrics)
        return result

    def _stop_on_non_finite(self, loss: float, grad_norm: float) -> None:
        step = self.state.global_step + 1
        which = "the training loss" if not math.isfinite(loss) else "the gradient norm"
        value = loss if not math.isfinite(loss) else grad_norm
        last, skipped = latest_complete(self.args.output_dir)  # complete and matching its manifest
        kept = f"the last good checkpoint is {last}" if last is not None else "no good checkpoint was saved before it"
        kept += f" ({skipped_note(skipped)})" if skipped else ""
        raise NonFiniteError(
            f"step {step}: {which} is {value} (loss {loss:.6g}, gradient norm {grad_norm:.6g}); stopped before the "
            f"optimizer applied it, no final model saved; {kept}"
        )

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        """After each optimizer step: on a signal any process received, save a checkpoint (no evaluation: a
        preempted job has seconds) and stop the run with ``RunPreempted``."""
        signum = None if self._preemption is None else self._preemption.agreed(self.args.device, self.args.world_size)
        if signum is not None:
            self.control.should_evaluate, self.control.should_save = False, True
        super()._maybe_log_save_evaluate(*args, **kwargs)
        if signum is not None:
            step = self.state.global_step
            raise RunPreempted(signum, step, Path(super()._get_output_dir(None)) / f"checkpoint-{step}")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and getattr(self.args, "resume_weights_only", False):
            logger.warning("resume_weights_only: %s's weights and trainer state, a fresh optimizer and learning-rate "
                           "schedule (alpha restarts at 1)", checkpoint)
            return
        super()._load_optimizer_and_scheduler(checkpoint)
        changes = [change for change in getattr(self.args, "resume_changes", None) or []
                   if change["step"] == self.state.global_step]
        if checkpoint is not None and changes:
            apply_accepted_changes(unwrap_optimizer(self.optimizer), self.lr_scheduler, self._fresh_groups, changes)
            logger.warning("resume: %s", "; ".join(f"{c['key']} {c['old']} -> {c['new']}" for c in changes))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            write_run_settings(output_dir, self.args)

    def _get_output_dir(self, trial: Any) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written into a hidden staging folder, listed with its checksums in its manifest
        and renamed into place. A save the OS refuses raises ``SaveError``, the staging folder removed."""
        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        staging = staging_dir(run_dir, step)
        final = Path(run_dir) / f"checkpoint-{step}"
        if self.args.should_save:
            for stale in partial_dirs(run_dir):  # left by a crash, this run's or an earlier one's
                logger.warning("removing %s, a checkpoint a crashed save left unfinished", stale)
                shutil.rmtree(stale)
        self.accelerator.wait_for_everyone()
        kept = "earlier checkpoints are kept"
        # the staging folder is removed on a failure only once every process has stopped writing into it
        with save_failures_in_one_line(final, partial=staging, kept=kept):
            with self._every_process_or_none(final, kept):  # every process has written its part
                self._checkpoint_staging = str(staging)
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self._checkpoint_staging = None
            with self._every_process_or_none(final, kept):  # the checkpoint is published
                if self.args.should_save:
                    written = staging / final.name
                    if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(str(staging)):
                        self.state.best_model_checkpoint = str(final)
                        self.state.save_to_json(str(written / TRAINER_STATE))
                    write_manifest(written)  # last: the manifest vouches for the files as they are published
                    publish(run_dir, step)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    @contextmanager
    def _every_process_or_none(self, final: Path, kept: str) -> Iterator[None]:
        """Run a part of a checkpoint's save on every process, then agree (a collective, in place of a barrier)
        on whether each did it: a process that failed raises its own error, and every other one ``SaveError``
        naming it, instead of waiting at a barrier for a process that has left. A failure inside a collective
        of the save itself (DeepSpeed's, FSDP's) still leaves the others in it. The failed process removes the
        staging folder as its error leaves ``save_failures_in_one_line`` around this, once no process writes
        into it any more."""
        failure: Exception | None = None
        try:
            yield
        except Exception as error:
            failure = error
        process = self.args.process_index
        failed = max_over_processes(process + 1 if failure is not None else 0, self.args.device, self.args.world_size)
        if failure is not None:
            raise failure
        if failed:  # the failed process removes the staging folder (save_failures_in_one_line lets this one by)
            raise SaveError(f"could not save {final}: process {failed - 1} could not write its part (its own error "
                            f"line says why); {kept}")

    # ---- optimizer ----

    def _refuse_replaced_optimizer(self) -> None:
        """Two DeepSpeed settings train another optimizer than the one ``optim`` names, silently: an
        ``optimizer`` block (the Trainer hands DeepSpeed a placeholder and DeepSpeed builds its own;
        transformers issues 11749, 38753), and optimizer offload without
        ``"zero_force_ds_cpu_optimizer": false`` (Accelerate swaps ours for DeepSpeedCPUAdam;
        accelerate PRs 1208, 3255). The config is the launcher's or ``--deepspeed``'s, as merged here."""
        if not self.is_deepspeed_enabled:
            return
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        name = str(self.args.optim.value)
        ours = f"{OPTIMIZERS[name].__name__} (optim={name})"
        if "optimizer" in config:
            raise DeepSpeedConfigError(
                f"DeepSpeed config has an 'optimizer' block: it would replace {ours}; remove the block"
            )
        offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
        if offload.get("device", "none") != "none" and config.get("zero_force_ds_cpu_optimizer", True):
            raise DeepSpeedConfigError(
                f"DeepSpeed config offloads the optimizer to {offload['device']}: Accelerate would replace {ours} "
                'with DeepSpeedCPUAdam; add "zero_force_ds_cpu_optimizer": false to the DeepSpeed config'
            )

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        # state.max_steps is the run's total optimizer steps once training has started: switch_ratio needs it
        with run_length(self.state.max_steps or None):
            optimizer = super().create_optimizer(model)
        self._refuse_rescaling_shards(optimizer)
        self._fresh_groups = group_settings(unwrap_optimizer(optimizer))  # before a checkpoint's are loaded
        logger.info("optimizer: %s", type(unwrap_optimizer(optimizer)).__name__)
        return optimizer

    def _refuse_rescaling_shards(self, optimizer: torch.optim.Optimizer) -> None:
        """inv_scale="adam_rms" takes norms per tensor, and DeepSpeed and FSDP hand the optimizer shards
        (ZeRO: flat partitions, which no DualAdam check can tell apart from whole tensors). Catches the
        optimizer a ``optimizer_cls_and_kwargs`` built too, which the optim_args check never sees."""
        dualadam = find_dualadam(optimizer)
        if dualadam is None:
            return
        sharding = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP" if self.is_fsdp_enabled else None
        for group in dualadam.param_groups:
            refusal = inv_scale_on_shards(group["inv_scale"], sharding)
            if refusal is not None:
                raise LaunchConfigError(f"{type(dualadam).__name__}: {refusal}")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP with sharded checkpoints the Trainer's save_model writes no model at all: the
        model a run hands over is gathered into one loadable file instead (the final save that
        accelerate's ``set_state_dict_type`` is meant for); checkpoints stay sharded.

        A final save the OS refuses (disk full, file-size limit, ...) raises ``SaveError``, the files it wrote
        removed; a checkpoint's part (``_internal_call``) leaves that to ``_save_checkpoint``."""
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            return
        with save_failures_in_one_line(Path(output_dir or self.args.output_dir), kept="the run's checkpoints are kept"):
            plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
            if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
                super().save_model(output_dir, _internal_call)
                return
            sharded = plugin.state_dict_type
            plugin.set_state_dict_type("FULL_STATE_DICT")
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                plugin.set_state_dict_type(sharded)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            optimizer = find_dualadam(self.optimizer)
            with zero3_partitions_in_groups(self.optimizer):
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
        return None, per_example_stats(logits, labels, segment_bounds(inputs)), None

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
        started = time.perf_counter()
        try:
            return self._evaluate_all(eval_dataset, metric_key_prefix)
        finally:
            self._evaluation_seconds += time.perf_counter() - started

    def _evaluate_all(self, eval_dataset: Dataset | dict[str, Dataset], metric_key_prefix: str) -> dict[str, float]:
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

    # ---- generation ----

    def _generation_metrics(self, dataset: Dataset, prefix: str) -> dict[str, float]:
        """Greedy answers to the fixed prompts, gathered from every process; their scores, and the samples
        written (main process) and shown to the reporters that take text."""
        count = getattr(self.args, "generation_eval_samples", 0)
        if not count:
            return {}
        if self._generation_prompts is None:
            self._generation_prompts = select_prompts(dataset, count, self.args.seed)
        prompts = self._generation_prompts
        mine = shard(prompts, self.args.process_index, self.args.world_size)
        # a process with fewer prompts repeats its first one, so every process runs as many forwards
        padded = [prompt if prompt is not None else prompts[0] for prompt in mine]
        synced = self.is_deepspeed_enabled or self.is_fsdp_enabled
        model = self.model
        was_training = model.training
        model.eval()
        try:
            answers = generate(model, self.processing_class, padded, max_new_tokens=self.args.generation_max_new_tokens,
                               batch_size=self.args.per_device_eval_batch_size, synced_gpus=synced)
        finally:
            model.train(was_training)
        tokenizer = self.processing_class
        local = [
            dict(index=prompt.index, prompt=tokenizer.decode(prompt.prompt_ids),
                 reference=tokenizer.decode(prompt.reference_ids, skip_special_tokens=True),
                 answer=tokenizer.decode(ids, skip_special_tokens=True), generated_tokens=len(ids), ended_with_eos=ended)
            for prompt, (ids, ended) in zip(mine, answers) if prompt is not None
        ]
        records = sorted(gather_object(local) if self.args.world_size > 1 else local, key=lambda r: r["index"])
        metrics = summarize_generations(records, prefix)
        if self.args.should_save:
            write_samples(records, self.args.output_dir, self.state.global_step)
            self._show_samples(records, prefix)
        return metrics

    def _show_samples(self, records: list[dict[str, Any]], prefix: str) -> None:
        """A text entry for TensorBoard, a table for W&B; the other reporters take none."""
        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text(f"{prefix}/generations", markdown_table(records), self.state.global_step)
            run = getattr(getattr(callback, "_wandb", None), "run", None)
            if run is not None:
                table = callback._wandb.Table(columns=["prompt", "reference", "answer"],
                                              data=[[r["prompt"], r["reference"], r["answer"]] for r in records])
                run.log({f"{prefix}/generations": table}, commit=False)

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
        if prefix == metric_key_prefix == "eval" and self._eval_task == "causal_lm":
            metrics.update(self._generation_metrics(dataset, prefix))
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


class DualAdamTrainer(DualAdamMetricsMixin, Trainer):
    """A ``transformers.Trainer`` that builds DualAdam/InvAdam when ``optim`` names them (any other
    optimizer otherwise) and reports validation perplexity and the generalization gap
    (``DualAdamMetricsMixin`` says what it adds)."""