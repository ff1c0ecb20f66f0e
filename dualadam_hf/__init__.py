"""DualAdam and InvAdam (arXiv 2603.07122) for Hugging Face users.

``import dualadam_hf`` registers ``optim="dualadam"`` and ``optim="invadam"`` with transformers'
TrainingArguments, HfArgumentParser and Trainer, and openPangu-Embedded (``model_type: PanguEmbedded``)
with the Auto classes, which then load its published checkpoints natively, without remote code, and
``attn_implementation="packed_sdpa"`` (SDPA per packed example, ``dualadam_hf.hf.packing``).
``DualAdam8bit`` / ``DualAdam4bit`` (``optim="dualadam_8bit"`` / ``"dualadam_4bit"``) need torchao
(``pip install 'dualadam_hf[lowbit]'``), imported only when one is built.
"""

from dualadam_hf.optim.lowbit import quiet_torchao_import_logs as _quiet_torchao_import_logs

# before transformers is imported: it imports torchao, when installed, and torchao's import logs noise
_quiet_torchao_import_logs()

from dualadam_hf.hf.packing import register as _register_packed_sdpa
from dualadam_hf.hf.registration import register as _register
from dualadam_hf.hf.generation import generation_metric
from dualadam_hf.hf.trainer import DualAdamMetricsMixin, DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.models.openpangu import register as _register_openpangu
from dualadam_hf.optim import DualAdam, DualAdam4bit, DualAdam8bit, DualAdamFp8, InvAdam, InvAdam4bit, InvAdam8bit

_register()
_register_openpangu()
_register_packed_sdpa()

__all__ = [
    "DualAdam", "InvAdam", "DualAdam8bit", "DualAdam4bit", "DualAdamFp8", "InvAdam8bit", "InvAdam4bit",
    "DualAdamTrainer", "DualAdamTrainingArguments", "DualAdamMetricsMixin", "generation_metric",
]
__version__ = "0.1.0"
