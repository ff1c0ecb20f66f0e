"""DualAdam and InvAdam (arXiv 2603.07122) for Hugging Face users."""

from dualadam_hf.optimizer import DualAdam, InvAdam

__all__ = ["DualAdam", "InvAdam"]
__version__ = "0.1.0"
