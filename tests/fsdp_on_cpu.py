"""Run a training script under `accelerate launch` with FSDP allowed on CPU processes (tests only).

Usage:
    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
        tests/fsdp_on_cpu.py scripts/finetune.py RECIPE.yaml [--key value ...]

Accelerate turns FSDP on only for GPU-like distributed types: on CPU processes (gloo) the state stays
MULTI_CPU and the run would silently be plain DDP. PyTorch's FSDP2 (`fully_shard`) itself works on
CPU with gloo, so this wrapper lets Accelerate's state take the FSDP plugin it was given when the
processes are CPU ones, then runs the script unchanged. Nothing else is patched.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path[0] = str(script.parent)  # as if the script had been launched itself
    runpy.run_path(str(script), run_name="__main__")
