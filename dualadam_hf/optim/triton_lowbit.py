"""CUDA backend of the low-bit optimizers: one launch of ``triton_lowbit_kernels.lowbit_kernel`` per bucket
steps every tensor whose moments are torchao's 8-bit or 4-bit state, reading and writing its codes and scales
in place (the kernel module's docstring has the layout and the rounding rules).

As ``triton_backend`` does for plain state: the ``step`` tensors live on the device and advance in one
``_foreach_add_``; the per-tensor coefficients (alpha_t, bias corrections, lr) come from them on the device
(``triton_backend.device_coefficients``), so the host syncs nothing; the launch tables are cached by address
(``triton_backend.launch_plan`` builds the [T, 4] table of param, grad and codes, as it does for plain state, and
this module the [T, 4] table of scales and qmaps). Unlike plain state there is no AdamW phase to hand to
torch: no torch op reads torchao's state, so the kernel serves alpha_t = 0 too.

Imports nothing from Triton until a launch, as ``triton_backend``.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import Tensor

from dualadam_hf.optim import triton_backend

__all__ = ["BLOCK_SIZE", "launch", "step_bucket", "takes_state"]

BLOCK_SIZE = 4096  # elements per program (at least one quantization block): 16 per thread at 8 warps
NUM_WARPS = 8
_STATE_CACHE_SIZE = 16  # scale and qmap tables kept, as triton_backend keeps its plans


def takes_state(shard: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, bits: int) -> bool:
    """Whether the kernel can step a parameter (its local ``shard``, which ``triton_backend.takes``) whose
    moments are torchao states of ``bits``-bit codes (uint8 codes, and fp32 scales and qmap, as their
    constructors assert) in blocks of a power of two. Run for every parameter at every step."""
    if type(exp_avg_sq) is not type(exp_avg) or not hasattr(exp_avg, "qmap"):  # FP8 state has no map
        return False
    block = exp_avg.block_size
    if block & (block - 1) or exp_avg_sq.block_size != block:
        return False
    numel, device = shard.numel(), shard.device
    for state in (exp_avg, exp_avg_sq):
        codes = state.codes
        if (codes.numel() * 8 != numel * bits or state.scale.numel() * block != numel
                or state.qmap.numel() != 1 << bits or codes.device != device or not codes.is_contiguous()):
            return False
    return (type(grad) is Tensor and grad.dtype in triton_backend.KERNEL_DTYPES and grad.device == device
            and grad.numel() == numel and grad.is_contiguous() and shard.is_contiguous())


def step_bucket(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    stochastic_round: bool,
) -> None:
    """One step of a bucket (tensors of one device and dtype combination whose moments are torchao states of
    one format and block size, which ``takes_state``): the steps advance, then one launch."""
    torch._foreach_add_(steps, 1.0)
    launch(params, grads, exp_avgs, exp_avg_sqs, triton_backend.device_coefficients(steps, group), group,
           stochastic_round=stochastic_round)


_state_tables: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()


def _state_addresses(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], device: torch.device) -> Tensor:
    """int64 [T, 4] on the device: the scales and qmaps of each tensor's moments, cached by address."""
    rows = tuple((m.scale.data_ptr(), v.scale.data_ptr(), m.qmap.data_ptr(), v.qmap.data_ptr())
                 for m, v in zip(exp_avgs, exp_avg_sqs))
    key = (device, rows)
    table = _state_tables.get(key)
    if table is None:
        table = _state_tables[key] = triton_backend.to_device(list(rows), torch.int64, device)
        while len(_state_tables) > _STATE_CACHE_SIZE:
            _state_tables.popitem(last=False)
    _state_tables.move_to_end(key)
    return table


def launch(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    coefficients: Tensor,
    group: dict[str, Any],
    *,
    stochastic_round: bool = False,
    block: int | None = None,
) -> None:
    """One launch of ``lowbit_kernel`` over the bucket (``coefficients`` from ``device_coefficients``) in
    programs of ``block`` elements (default ``BLOCK_SIZE``), at least one quantization block."""
    from dualadam_hf.optim.triton_lowbit_kernels import lowbit_kernel

    bits = exp_avgs[0].codes.numel() * 8 // params[0].numel()
    quantization_block = exp_avgs[0].block_size
    block = max(BLOCK_SIZE if block is None else block, quantization_block)
    codes_m, codes_v = [m.codes for m in exp_avgs], [v.codes for v in exp_avg_sqs]
    plan = triton_backend.launch_plan([params, grads, codes_m, codes_v], block)
    blocks = plan.block_tensor.numel()
    if blocks == 0:
        return
    beta1, beta2 = group["betas"]
    stochastic = stochastic_round and params[0].dtype == torch.bfloat16
    with triton_backend.launch_device(params[0].device):
        lowbit_kernel[(blocks,)](
            plan.addresses, _state_addresses(exp_avgs, exp_avg_sqs, params[0].device), plan.numels, coefficients,
            plan.block_tensor, plan.block_start,
            1.0 - group["lr"] * group["weight_decay"],
            -1.0 if group["maximize"] else 1.0,
            1.0 - beta1,
            1.0 - beta2,
            int(torch.randint(1 << 31, ()).item()) if stochastic else 0,
            P_KIND=triton_backend.kind_code(params[0].dtype),
            G_KIND=triton_backend.kind_code(grads[0].dtype),
            BITS=bits,
            QBLOCK=quantization_block,
            UPDATE=group["lr"] != 0.0,
            STOCHASTIC=stochastic,
            ALIGNED=plan.aligned,
            BLOCK=block,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    # Written through raw addresses: tell autograd, as an in-place op on the tensors would.
    scales = [state.scale for state in (*exp_avgs, *exp_avg_sqs)]
    torch.autograd.graph.increment_version([*params, *codes_m, *codes_v, *scales])
