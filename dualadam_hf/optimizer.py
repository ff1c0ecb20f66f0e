"""Old import path of the optimizer classes, kept for existing code: they live in ``dualadam_hf.optim``."""

from dualadam_hf.optim.dualadam import DualAdam, InvAdam

__all__ = ["DualAdam", "InvAdam"]
