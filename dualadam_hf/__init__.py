"""DualAdam and InvAdam (arXiv 2603.07122) for Hugging Face users.

``import dualadam_hf`` registers ``optim="dualadam"`` and ``optim="invadam"`` with transformers'
TrainingArguments, HfArgumentParser and Trainer, and openPangu-Embedded (``model_type: PanguEmbedded``)
with the Auto classes, which then load its published checkpoints natively, without remote code.
"""

from dualadam_hf.hf.registration import register as _register
from dualadam_hf.hf.generation import generation_metric
from dualadam_hf.hf.trainer import DualAdamMetricsMixin, DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.models.openpangu import register as _register_openpangu
from dualadam_hf.optim import DualAdam, InvAdam

_register()
_register_openpangu()

__all__ = [
    "DualAdam", "InvAdam", "DualAdamTrainer", "DualAdamTrainingArguments", "DualAdamMetricsMixin", "generation_metric",
]
__version__ = "0.1.0"
