"""Make ``optim="dualadam"`` / ``"invadam"`` (and their low-bit twins, ``"dualadam_8bit"``, ...) valid in
stock transformers.

Transformers has no public API for new optimizer names: ``TrainingArguments`` converts ``optim`` with the
closed enum ``OptimizerNames`` ("is not a valid OptimizerNames", transformers issue 31651), and
``Trainer.get_optimizer_cls_and_kwargs`` looks the name up in ``trainer_optimizer._OPTIMIZER_HANDLERS``.
This module, and only this one, touches those internals: it adds a member to the enum and a handler
to the table per name of ``OPTIMIZERS``. ``check_internals`` says in plain words what moved if an upgrade
changes them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from dualadam_hf.hf.settings import OPTIMIZERS, settings_of
from dualadam_hf.optim import DualAdam

# The transformers releases this module is tested on (pyproject.toml pins the same range).
TESTED_TRANSFORMERS = ">=5.0,<5.30"

# The run's total optimizer steps, set by DualAdamTrainer around optimizer creation so that
# switch_ratio can be resolved; the stock Trainer falls back to args.max_steps.
_total_steps: ContextVar[int | None] = ContextVar("dualadam_total_steps", default=None)


class TransformersInternalsChanged(RuntimeError):
    """The transformers internals that registration relies on are not where they used to be."""


@contextmanager
def run_length(total_steps: int | None) -> Iterator[None]:
    token = _total_steps.set(total_steps)
    try:
        yield
    finally:
        _total_steps.reset(token)


def _internals() -> tuple[type[enum.Enum], dict]:
    import transformers

    hint = (
        f"dualadam_hf is tested with transformers{TESTED_TRANSFORMERS}, this is {transformers.__version__}; "
        "pass the optimizer directly instead: Trainer(optimizer_cls_and_kwargs=(DualAdam, {...}))"
    )
    try:
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames
    except ImportError as error:
        raise TransformersInternalsChanged(f"cannot import {error.name or error}: {hint}") from None
    if not (isinstance(OptimizerNames, type) and issubclass(OptimizerNames, enum.Enum)):
        raise TransformersInternalsChanged(f"transformers.training_args.OptimizerNames is no longer an Enum; {hint}")
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise TransformersInternalsChanged(
            f"transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing or not a dict; {hint}"
        )
    for attribute in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(OptimizerNames, attribute):
            raise TransformersInternalsChanged(f"OptimizerNames has no {attribute}; {hint}")
    return OptimizerNames, handlers


def check_internals() -> None:
    """Raise TransformersInternalsChanged, with a plain message, if registration cannot work."""
    _internals()


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def optimizer_kwargs(name: str, args: Any, total_steps: int | None = None) -> dict[str, Any]:
    """DualAdam/InvAdam (or low-bit twin) keyword arguments from TrainingArguments, as HF does for AdamW:
    learning_rate, adam_beta1, adam_beta2, adam_epsilon, plus the typed optim_args (``settings_of``: read
    from DualAdamTrainingArguments, parsed and checked here for a stock TrainingArguments, which the stock
    Trainer does not check before it builds the optimizer).
    Weight decay arrives per param group (HF's decay / no-decay split)."""
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if total_steps is None and getattr(args, "max_steps", -1) > 0:
        total_steps = args.max_steps
    kwargs.update(settings_of(args).optimizer_kwargs(total_steps))
    return kwargs


def _handler(name: str):
    def handler(ctx: Any) -> tuple[type[DualAdam], dict[str, Any]]:
        return OPTIMIZERS[name], optimizer_kwargs(name, ctx.args, _total_steps.get())

    return handler


def register() -> None:
    """Idempotent: add every name of ``OPTIMIZERS`` to OptimizerNames and to the Trainer's handlers."""
    names, handlers = _internals()
    for name in OPTIMIZERS:
        member = _add_enum_member(names, name.upper(), name)
        handlers[member] = _handler(name)


def is_ours(optim: Any) -> bool:
    return str(getattr(optim, "value", optim)) in OPTIMIZERS
