"""The optimizer layer: DualAdam and InvAdam in plain PyTorch (no transformers, nothing above this layer).

``kernels`` (step scalars, schedules, the single-tensor and foreach backends) is the leaf that both the
classes (``dualadam``) and the compiled backend (``fused``) import; ``diagnostics`` reads the state;
``lowbit`` keeps the state quantized in torchao's tensors (imported only when such an optimizer is built).
"""

from dualadam_hf.optim.dualadam import DualAdam, InvAdam
from dualadam_hf.optim.lowbit import DualAdam4bit, DualAdam8bit, DualAdamFp8, InvAdam4bit, InvAdam8bit

__all__ = ["DualAdam", "InvAdam", "DualAdam8bit", "DualAdam4bit", "DualAdamFp8", "InvAdam8bit", "InvAdam4bit"]
