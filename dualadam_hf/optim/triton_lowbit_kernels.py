"""Triton multi-tensor kernel for the low-bit optimizers' step on CUDA: torchao's 8-bit and 4-bit state read
and written in place, one launch per bucket.

A program takes BLOCK elements of one tensor, as ``triton_kernels.dualadam_kernel`` does, seen as a tile of
BLOCK / QBLOCK quantization blocks (rows) of QBLOCK elements, so that a block's absmax is a reduction along
the tile's rows. For each moment it

1. dequantizes: ``qmap[code] * scale[block]`` (torchao's ``dequant_with_qmap``);
2. updates the moment in fp32 as ``lowbit._step_one`` does: ``m.lerp(g, 1 - beta1)``,
   ``v.lerp(g * g, 1 - beta2)``, in torch's lerp formula (one fused multiply-add);
3. updates the parameter from the fp32 moments, before they are re-quantized (torchao's order), with the
   per-tensor coefficients of ``triton_backend.device_coefficients``, so the step counts stay on the device;
4. re-quantizes with torchao's rule, bit for bit: ``scale = absmax(block).clip(1e-12)`` (NaN propagating,
   as ``amax``), ``x / scale`` correctly rounded, the branchless binary search of
   ``quantize_{8,4}bit_with_qmap`` and its rounding to the nearer code; stores codes and scales.

Layout of a launch:

- ``addresses``: int64 [T, 4], each tensor's param, grad, exp_avg codes and exp_avg_sq codes (the plain
  kernel's table, codes in place of the moments: ``triton_backend.launch_plan`` builds and caches it);
- ``state_addresses``: int64 [T, 4], the exp_avg scales, exp_avg_sq scales, exp_avg qmap and exp_avg_sq
  qmap. Each state's own qmap is read (torchao keeps one per state tensor), so the kernel needs to know
  neither the map nor its sign;
- ``numels``, ``coefficients``, ``block_tensor``, ``block_start``: as for ``dualadam_kernel``. BLOCK is a
  multiple of QBLOCK, so no quantization block straddles two programs, and a tensor's last program is
  masked by whole blocks (torchao quantizes only tensors that its block size divides).

Codes: 8-bit state keeps one byte per element, in the parameter's shape; 4-bit state keeps a flat buffer of
n / 2 bytes, element 2k in the high nibble of byte k and element 2k + 1 in the low one
(``(codes[::2] << 4) | codes[1::2]`` in torchao 0.18's ``subclass_4bit``).

Rounding is the kernel's own, so that the GPU computes what Triton's interpreter computes: the launch turns
off the contraction of multiplies and adds into FMAs (``enable_fp_fusion=False``) and lerp's one FMA is
written out (``tl.fma``); division and sqrt are the correctly rounded ``div_rn`` / ``sqrt_rn``; bf16
parameters are written with round-to-nearest-even in integers, or, with ``bf16_stochastic_round``, with
torchao's stochastic rounding (its rule; the random bits are Philox's, from a seed drawn per launch from
torch's CPU generator).

Cost: per moment and element, the search reads the table BITS - 1 times at addresses that depend on the
value (its first level reads one entry, the same for all), its rounding twice more, and dequantizing once:
20 gathers per element for 8-bit state (two 1 KB tables, L1-resident), 12 for 4-bit (64-byte tables).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dualadam_hf.optim.triton_kernels import _load, _pointer, _store


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _masked_load(pointer, mask):
    if mask is None:
        value = tl.load(pointer)
    else:
        value = tl.load(pointer, mask=mask, other=0)
    return value


@triton.jit
def _codes(codes, byte_tile, mask, BITS: tl.constexpr):
    """The tile's codes (int32); 4-bit: ``byte_tile`` covers half the tile, two codes a byte, high nibble first."""
    code = _masked_load(codes + byte_tile, mask).to(tl.int32)
    if BITS == 4:
        code = tl.interleave(code >> 4, code & 15)
    return code


@triton.jit
def _store_codes(codes, byte_tile, code, mask, BITS: tl.constexpr):
    if BITS == 4:
        high, low = tl.split(tl.reshape(code, (code.shape[0], code.shape[1] // 2, 2)))
        code = (high << 4) | low
    tl.store(codes + byte_tile, code.to(tl.uint8), mask=mask)


@triton.jit
def _quantize(x, qmap, BITS: tl.constexpr):
    """torchao's ``scale_tensor`` and ``quantize_{8,4}bit_with_qmap`` for a tile of blocks (rows): (codes, scales)."""
    scale = tl.maximum(tl.reduce(tl.abs(x), 1, _max_with_nan), 1e-12, propagate_nan=tl.PropagateNan.ALL)
    normalized = tl.div_rn(x, scale[:, None])
    TOP: tl.constexpr = 1 << (BITS - 1)
    code = tl.where(normalized >= tl.load(qmap + TOP), TOP, 0)
    for level in tl.static_range(1, BITS):
        code += tl.where(normalized >= tl.load(qmap + code + (TOP >> level)), TOP >> level, 0)
    code_up = tl.minimum(code + 1, 2 * TOP - 1)
    below = tl.load(qmap + code)
    above = tl.load(qmap + code_up)
    return tl.where(normalized - below >= (above - below) * 0.5, code_up, code), scale


@triton.jit
def _lerp(start, end, weight):
    """torch's lerp (``LerpKernel``): start + weight (end - start) for weight < 0.5, else
    end - (1 - weight)(end - start), each as one fused multiply-add, as torch's CPU kernel computes it."""
    small = weight < 0.5
    return tl.fma(tl.where(small, weight, weight - 1.0), end - start, tl.where(small, start, end))


@triton.jit
def bf16_bits_stochastic(x, random):
    """float32 -> bfloat16 bits as torchao's ``_fp32_to_bf16_sr``: away from zero with probability (the low
    16 bits) / 2^16, drawn from the low 16 bits of ``random``."""
    bits = x.to(tl.uint32, bitcast=True)
    away = (random & 0xFFFF) < (bits & 0xFFFF)
    return ((bits >> 16) + tl.where(away, 1, 0).to(tl.uint32)).to(tl.uint16)


@triton.jit
def _moment(codes, scale, qmap, byte_tile, block_rows, mask, row_mask, grad_term, weight, BITS: tl.constexpr):
    block_scale = _masked_load(scale + block_rows, row_mask)
    return _lerp(tl.load(qmap + _codes(codes, byte_tile, mask, BITS)) * block_scale[:, None], grad_term, weight)


@triton.jit
def _store_moment(x, codes, scale, qmap, byte_tile, block_rows, mask, row_mask, BITS: tl.constexpr):
    code, block_scale = _quantize(x, qmap, BITS)
    tl.store(scale + block_rows, block_scale, mask=row_mask)
    _store_codes(codes, byte_tile, code, mask, BITS)


@triton.jit
def _step_tile(
    param, grad, codes_m, codes_v, scale_m, scale_v, qmap_m, qmap_v, tensor, tile, byte_tile, block_rows,
    mask, byte_mask, row_mask, coefficients, decay, grad_sign, weight1, weight2, seed,
    P_KIND: tl.constexpr, G_KIND: tl.constexpr, BITS: tl.constexpr, UPDATE: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """The step of one tile, whole (masks None: unmasked, vectorised accesses) or a tensor's last, masked."""
    g = _load(grad, tile, mask, G_KIND) * grad_sign
    m = _moment(codes_m, scale_m, qmap_m, byte_tile, block_rows, byte_mask, row_mask, g, weight1, BITS)
    v = _moment(codes_v, scale_v, qmap_v, byte_tile, block_rows, byte_mask, row_mask, g * g, weight2, BITS)
    if UPDATE:
        inv = tl.load(coefficients + tensor * 3)
        adam = tl.load(coefficients + tensor * 3 + 1)
        eps_b = tl.load(coefficients + tensor * 3 + 2)
        root = tl.sqrt_rn(v)
        # a term whose coefficient is 0 is skipped: 0 / (0 + 0) and inf * 0 are NaN (see triton_kernels)
        inv_term = tl.where(inv != 0.0, root * inv, 0.0)
        adam_term = tl.where(adam != 0.0, tl.div_rn(adam + tl.zeros_like(root), root + eps_b), 0.0)
        p = _load(param, tile, mask, P_KIND) * decay - m * (inv_term + adam_term)
        if STOCHASTIC:
            # Philox's counter: the element's offset (64 bits) and its tensor; the key: this launch's seed
            zero = tl.zeros_like(tile).to(tl.uint32)
            low, high = tile.to(tl.uint32), (tile >> 32).to(tl.uint32)
            random, _, _, _ = tl.philox(seed, low, high, zero + tensor.to(tl.uint32), zero)
            tl.store(param + tile, bf16_bits_stochastic(p, random), mask=mask)
        else:
            _store(param, tile, p, mask, P_KIND)
    _store_moment(m, codes_m, scale_m, qmap_m, byte_tile, block_rows, byte_mask, row_mask, BITS)
    _store_moment(v, codes_v, scale_v, qmap_v, byte_tile, block_rows, byte_mask, row_mask, BITS)


@triton.jit(do_not_specialize=["seed"])
def lowbit_kernel(
    addresses,
    state_addresses,
    numels,
    coefficients,
    block_tensor,
    block_start,
    decay,
    grad_sign,
    weight1,
    weight2,
    seed,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    UPDATE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program updates BLOCK elements of one tensor with quantized moments: m <- lerp(m, g, weight1),
    v <- lerp(v, g^2, weight2) (g = grad_sign * grad), p <- p * decay - m (r inv + adam / (r + eps_b)) with
    r = sqrt(v) (if UPDATE: lr > 0), and m, v re-quantized."""
    program = tl.program_id(0)
    tensor = tl.load(block_tensor + program).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start + program), BLOCK)
    numel = tl.load(numels + tensor)
    ROWS: tl.constexpr = BLOCK // QBLOCK
    BYTES: tl.constexpr = QBLOCK * BITS // 8  # code bytes per quantization block
    rows = tl.arange(0, ROWS)
    tile = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    first_byte = tl.multiple_of(start * BITS // 8, BLOCK * BITS // 8)
    byte_tile = first_byte + rows[:, None] * BYTES + tl.arange(0, BYTES)[None, :]
    block_rows = start // QBLOCK + rows

    param = _pointer(addresses, tensor, 0, P_KIND, ALIGNED)
    grad = _pointer(addresses, tensor, 1, G_KIND, ALIGNED)
    codes_m = tl.load(addresses + tensor * 4 + 2).to(tl.pointer_type(tl.uint8))
    codes_v = tl.load(addresses + tensor * 4 + 3).to(tl.pointer_type(tl.uint8))
    if ALIGNED:
        codes_m = tl.multiple_of(codes_m, 16)
        codes_v = tl.multiple_of(codes_v, 16)
    scale_m = tl.load(state_addresses + tensor * 4).to(tl.pointer_type(tl.float32))
    scale_v = tl.load(state_addresses + tensor * 4 + 1).to(tl.pointer_type(tl.float32))
    qmap_m = tl.load(state_addresses + tensor * 4 + 2).to(tl.pointer_type(tl.float32))
    qmap_v = tl.load(state_addresses + tensor * 4 + 3).to(tl.pointer_type(tl.float32))

    if start + BLOCK <= numel:
        _step_tile(
            param, grad, codes_m, codes_v, scale_m, scale_v, qmap_m, qmap_v, tensor, tile, byte_tile, block_rows,
            None, None, None, coefficients, decay, grad_sign, weight1, weight2, seed,
            P_KIND, G_KIND, BITS, UPDATE, STOCHASTIC,
        )
    else:
        _step_tile(
            param, grad, codes_m, codes_v, scale_m, scale_v, qmap_m, qmap_v, tensor, tile, byte_tile, block_rows,
            tile < numel, byte_tile < numel * BITS // 8, start + rows * QBLOCK < numel,
            coefficients, decay, grad_sign, weight1, weight2, seed,
            P_KIND, G_KIND, BITS, UPDATE, STOCHASTIC,
        )

