"""DualAdam and InvAdam (arXiv 2603.07122) for Hugging Face users.

``import dualadam_hf`` registers ``optim="dualadam"`` and ``optim="invadam"`` with transformers'
TrainingArguments, HfArgumentParser and Trainer.
"""

from dualadam_hf.hf.registration import register as _register
from dualadam_hf.hf.trainer import DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.optimizer import DualAdam, InvAdam

_register()

__all__ = ["DualAdam", "InvAdam", "DualAdamTrainer", "DualAdamTrainingArguments"]
__version__ = "0.1.0"
