"""Triton multi-tensor kernel for DualAdam's step: one launch updates every tensor of a bucket.

Layout of a launch (torch's ``multi_tensor_apply`` idea, with the tables in device memory):

- ``addresses``: int64 [T, 4], the base addresses of each tensor's param, grad, exp_avg and exp_avg_sq;
- ``numels``: int64 [T];
- ``coefficients``: float32 [T, 3] per tensor, computed on the device from its ``step`` (``device_coefficients``
  in ``triton_backend``): ``inv`` = alpha * lr / (bc1 * b), ``adam`` = (1 - alpha) * lr * b / bc1 and
  ``eps * b``, where b = sqrt(1 - beta2^t). With r = sqrt(v) the update is m * (r * inv + adam / (r + eps * b)),
  the same folding as the fused and foreach backends (see ``fused``'s scalar layout);
- ``block_tensor`` (int32) and ``block_start`` (int64, a multiple of BLOCK): which tensor and which slice
  each program updates. Offsets are int64 throughout: a ZeRO partition is one flat tensor and may pass 2^31.

The per-step numbers that are the same for a whole bucket (decay, the betas) are float arguments: Triton
specialises on no float, so a new lr or step compiles nothing. The dtypes and BLOCK are constexprs: one
compile per dtype combination.

A program whose block lies wholly inside its tensor takes an unmasked path; with ``ALIGNED`` (every base
address 16-byte aligned, checked on the host) its loads and stores are 128-bit (``ld.global.v4``), which
``tests/optim/test_triton_backend.py`` checks in the sm_90 PTX. The tail block is masked.

The kernel owns its roundings, so that it computes the same bits on the GPU and in Triton's interpreter
(which truncates fp32 -> bf16 casts and computes sqrt exactly): bf16 is read and written as its bits with
round-to-nearest-even done in integers; sqrt and the division are the correctly rounded ``sqrt_rn`` and
``div_rn``, as torch's CUDA kernels compute them. (The GPU may still contract a multiply and an add into an
FMA, which rounds once instead of twice.)
"""

from __future__ import annotations

import triton
import triton.language as tl

# Element types, as constexpr codes
FLOAT32: tl.constexpr = tl.constexpr(0)
BFLOAT16: tl.constexpr = tl.constexpr(1)
FLOAT16: tl.constexpr = tl.constexpr(2)


@triton.jit
def _pointer(addresses, tensor, column: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer to column ``column`` (param, grad, exp_avg, exp_avg_sq) of tensor ``tensor``."""
    address = tl.load(addresses + tensor * 4 + column)
    if KIND == BFLOAT16:
        pointer = address.to(tl.pointer_type(tl.uint16))
    elif KIND == FLOAT16:
        pointer = address.to(tl.pointer_type(tl.float16))
    else:
        pointer = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load(pointer, offsets, mask, KIND: tl.constexpr):
    """Elements as float32; bf16 widened from its bits (exact)."""
    if mask is None:
        raw = tl.load(pointer + offsets)
    else:
        raw = tl.load(pointer + offsets, mask=mask, other=0)
    if KIND == BFLOAT16:
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return raw.to(tl.float32)


@triton.jit
def bf16_bits_rne(x):
    """float32 -> bfloat16 bits, rounded to nearest even in integers; a NaN stays a (quiet) NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16)


@triton.jit
def _store(pointer, offsets, value, mask, KIND: tl.constexpr):
    if KIND == BFLOAT16:
        tl.store(pointer + offsets, bf16_bits_rne(value), mask=mask)
    elif KIND == FLOAT16:
        tl.store(pointer + offsets, value.to(tl.float16), mask=mask)
    else:
        tl.store(pointer + offsets, value, mask=mask)


@triton.jit
def _update_block(
    param, grad, exp_avg, exp_avg_sq, offsets, mask,
    decay, beta1, grad_weight1, beta2, grad_weight2, inv, adam, eps_b,
    P_KIND: tl.constexpr, G_KIND: tl.constexpr, S_KIND: tl.constexpr,
):
    g = _load(grad, offsets, mask, G_KIND)
    m = _load(exp_avg, offsets, mask, S_KIND) * beta1 + g * grad_weight1
    v = _load(exp_avg_sq, offsets, mask, S_KIND) * beta2 + (g * g) * grad_weight2
    root = tl.sqrt_rn(v)
    # A term whose coefficient is 0 (alpha = 1 or 0, or lr = 0) is skipped rather than multiplied by 0:
    # 0 / (0 + 0) and inf * 0 (a float16 v that overflowed) are NaN, where AdamW's update stays finite.
    inv_term = tl.where(inv != 0.0, root * inv, 0.0)
    adam_term = tl.where(adam != 0.0, tl.div_rn(adam + tl.zeros_like(root), root + eps_b), 0.0)
    update = m * (inv_term + adam_term)
    p = _load(param, offsets, mask, P_KIND) * decay - update
    _store(param, offsets, p, mask, P_KIND)
    _store(exp_avg, offsets, m, mask, S_KIND)
    _store(exp_avg_sq, offsets, v, mask, S_KIND)


@triton.jit
def dualadam_kernel(
    addresses,
    numels,
    coefficients,
    block_tensor,
    block_start,
    decay,
    beta1,
    grad_weight1,
    beta2,
    grad_weight2,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    S_KIND: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program updates BLOCK elements of one tensor: p <- p * decay - m * (r * inv + adam / (r + eps_b)),
    after m <- beta1 m + grad_weight1 g and v <- beta2 v + grad_weight2 g^2 (grad_weight1 = -(1 - beta1)
    maximizes without writing the gradient)."""
    program = tl.program_id(0)
    tensor = tl.load(block_tensor + program).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start + program), BLOCK)
    numel = tl.load(numels + tensor)
    param = _pointer(addresses, tensor, 0, P_KIND, ALIGNED)
    grad = _pointer(addresses, tensor, 1, G_KIND, ALIGNED)
    exp_avg = _pointer(addresses, tensor, 2, S_KIND, ALIGNED)
    exp_avg_sq = _pointer(addresses, tensor, 3, S_KIND, ALIGNED)
    inv = tl.load(coefficients + tensor * 3)
    adam = tl.load(coefficients + tensor * 3 + 1)
    eps_b = tl.load(coefficients + tensor * 3 + 2)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _update_block(
            param, grad, exp_avg, exp_avg_sq, offsets, None,
            decay, beta1, grad_weight1, beta2, grad_weight2, inv, adam, eps_b, P_KIND, G_KIND, S_KIND,
        )
    else:
        _update_block(
            param, grad, exp_avg, exp_avg_sq, offsets, offsets < numel,
            decay, beta1, grad_weight1, beta2, grad_weight2, inv, adam, eps_b, P_KIND, G_KIND, S_KIND,
        )
