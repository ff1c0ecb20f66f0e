"""The optimizer layer: DualAdam and InvAdam in plain PyTorch (no transformers, nothing above this layer).

``kernels`` (step scalars, schedules, the single-tensor and foreach backends) is the leaf that both the
classes (``dualadam``) and the compiled backend (``fused``) import; ``diagnostics`` reads the state.
"""

from dualadam_hf.optim.dualadam import DualAdam, InvAdam

__all__ = ["DualAdam", "InvAdam"]
