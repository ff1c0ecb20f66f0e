"""The low-bit optimizers' CUDA backend (``triton_lowbit`` / ``triton_lowbit_kernels``): torchao's codes and
scales bit for bit, the per-tensor step's arithmetic, the launch contract (one launch per bucket for every
quantized tensor, no recompiles, no host reads), resume across the two backends, and the sm_90 PTX.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (``tests/conftest.py`` sets
TRITON_INTERPRET=1, the ``device`` fixture lets the backends take CPU tensors); the reference is the
per-tensor step (``fused=False``), eager, whose moments are torch's lerp and whose codes are torchao's own
``copy_``. The interpreter costs tens of milliseconds per program of 512 elements here, so the tensors are
small: the quantization threshold is lowered to 512 elements, and programs take 512 elements.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from host_reads import HostReads
from kernel_launches import compiles, kernel_device, record_launches

from dualadam_hf import DualAdam4bit, DualAdam8bit, DualAdamFp8, InvAdam4bit
from dualadam_hf.optim import lowbit, triton_lowbit
from dualadam_hf.optim.lowbit import is_quantized

triton = pytest.importorskip("triton", reason="Triton is in the test extra (Linux x86-64)")
pytest.importorskip("torchao", reason="the low-bit state is torchao's")
pytestmark = pytest.mark.cuda  # on a GPU machine, compiled on CUDA tensors

FORMATS = {"8bit": DualAdam8bit, "4bit": DualAdam4bit}
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
# quantized: full programs, a tail program, a lone short program; plain: below the threshold, and a size the
# block does not divide
SHAPES = [(16, 64), (3, 512), (768,), (7,), (5, 131)]
PROGRAM = 512


@pytest.fixture
def device(monkeypatch):
    """The GPU if there is one, else the CPU through the interpreter; small programs, small quantized tensors."""
    monkeypatch.setattr(lowbit, "QUANTIZE_MIN_NUMEL", 512)
    monkeypatch.setattr(triton_lowbit, "BLOCK_SIZE", PROGRAM)
    return kernel_device(monkeypatch)


class Launches:
    """The launches of both kernels (``kernel_launches.record_launches``)."""

    def __init__(self, monkeypatch):
        from dualadam_hf.optim import triton_kernels, triton_lowbit_kernels

        self.quantized = record_launches(monkeypatch, triton_lowbit_kernels, "lowbit_kernel")
        self.plain = record_launches(monkeypatch, triton_kernels, "dualadam_kernel")


def make_params(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype)) for shape in SHAPES]


def make_grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) * scale for shape, scale in zip(SHAPES, (0.5, 2.0, 1e-3, 1.0, 3.0))]
            for _ in range(steps)]


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.device, p.dtype)
        optimizer.step()


def assert_close_to_one_rounding(got, want, before, decay, quantized):
    """A parameter the kernel stepped against the per-tensor step's from the same ``before``: 16-bit within
    one unit in the last place; float32 within one, plus a few of the update's own. The kernel folds alpha_t,
    lr and the bias corrections into three per-tensor coefficients (``device_coefficients``) where the
    per-tensor step multiplies by each in turn, so the float32 update differs in its last bits, which moves
    the parameter by at most one unit of its last place, or a few of the update's when the update is larger.
    Plain state takes the plain kernel, whose beta m + (1 - beta) g may cancel where lerp's one FMA does not:
    a few units of the tensor's largest update."""
    got, want = got.detach().cpu(), want.detach()
    infinity = torch.tensor(float("inf"), dtype=want.dtype)
    spacing = (torch.nextafter(want.abs(), infinity) - want.abs()).float()
    got, want, update = got.float(), want.float(), (before.float() * decay - want.float()).abs()
    if before.dtype != torch.float32:
        allowed = spacing
    elif quantized:
        allowed = spacing + 4 * torch.finfo(torch.float32).eps * update
    else:
        allowed = spacing + 64 * torch.finfo(torch.float32).eps * update.max()
    assert ((got - want).abs() <= allowed).all(), ((got - want).abs() / spacing).max()


def assert_same_state(params, optimizer, expected_params, expected_optimizer):
    """Quantized moments: codes and scales bit for bit. Plain state: within one rounding of its dtype (the
    plain kernel computes beta m + (1 - beta) g where the per-tensor step has lerp's one FMA)."""
    for p, q in zip(params, expected_params):
        state, expected = optimizer.state[p], expected_optimizer.state[q]
        assert state["step"].item() == expected["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = state[key], expected[key]
            assert is_quantized(got) == is_quantized(want), (p.shape, key)
            if is_quantized(want):
                assert torch.equal(got.codes.cpu(), want.codes), (p.shape, key)
                assert torch.equal(got.scale.cpu(), want.scale), (p.shape, key)
            else:
                eps = torch.finfo(want.dtype).eps
                torch.testing.assert_close(got.cpu(), want, rtol=eps, atol=eps * want.abs().max().item())


def run_in_lockstep(optimizer, params, reference_optimizer, reference_params, grads):
    """Both optimizers step on the same gradients; after each step their states are compared and the
    reference takes the kernel's parameters and plain moments, so every step is compared from equal starts."""
    for step_grads in grads:
        before = [p.detach().clone() for p in params]
        for p, q, g in zip(params, reference_params, step_grads):
            p.grad, q.grad = g.to(p.device, p.dtype), g.to(q.dtype)
        optimizer.step()
        reference_optimizer.step()
        group = optimizer.param_groups[0]
        for p, q, b in zip(params, reference_params, before):
            quantized = is_quantized(reference_optimizer.state[q]["exp_avg"])
            assert_close_to_one_rounding(p, q, b.cpu(), 1.0 - group["lr"] * group["weight_decay"], quantized)
        assert_same_state(params, optimizer, reference_params, reference_optimizer)
        for p, q in zip(params, reference_params):
            q.data.copy_(p.data.cpu())
            for key in ("exp_avg", "exp_avg_sq"):
                if not is_quantized(reference_optimizer.state[q][key]):
                    reference_optimizer.state[q][key].copy_(optimizer.state[p][key].cpu())


CASES = {
    "alpha_one": dict(switch_rate=0.0),
    "blend": dict(switch_rate=0.3),  # alpha_t = 0.7, 0.4, 0.1, 0
    "alpha_zero": dict(schedule="step", switch_step=0),
    "weight_decay_maximize": dict(switch_rate=0.3, weight_decay=0.1, maximize=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("state_format", FORMATS)
def test_kernel_steps_are_the_per_tensor_steps(device, monkeypatch, state_format, case, dtype):
    """Four steps of a group mixing quantized and plain state: the quantized tensors in one launch per step,
    the plain ones in the plain kernel's (or torch's fused AdamW once alpha_t = 0), and the same codes and
    scales as torchao's quantizer writes in the per-tensor step."""
    launches = Launches(monkeypatch)
    params = make_params(device, dtype)
    optimizer = FORMATS[state_format](params, **HYPER, **CASES[case], compiled=False)
    reference_params = make_params("cpu", dtype)
    reference = FORMATS[state_format](reference_params, **HYPER, **CASES[case], fused=False, compiled=False)
    run_in_lockstep(optimizer, params, reference, reference_params, make_grads(4))
    assert len(launches.quantized) == 4
    blocks = sum(-(-p.numel() // PROGRAM) for p in params[:3])
    assert all(grid == (blocks,) for _, _, grid, _ in launches.quantized)


def launch_one(device, state_format, signed, values, block_size):
    """One launch on a fresh state with betas (0, 0), where lerp gives m = g and v = g^2 exactly: the kernel
    quantizes ``values`` (and their squares); ``signed`` picks exp_avg's map."""
    ao = lowbit._torchao_optim()
    kind = ao.subclass_8bit.OptimState8bit if state_format == "8bit" else ao.subclass_4bit.OptimState4bit
    n = values.numel()
    param = torch.zeros(n, device=device)
    exp_avg = kind.zeros((n,), signed, block_size, device)
    exp_avg_sq = kind.zeros((n,), False, block_size, device)
    group = dict(lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, maximize=False)
    triton_lowbit.launch([param], [values.to(device)], [exp_avg], [exp_avg_sq], torch.zeros(1, 3, device=device),
                         group, block=4 * block_size)
    return exp_avg, exp_avg_sq, kind


def adversarial(qmap: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks whose absmax is 1 (so x / scale = x) holding every code's value and the exact rounding
    boundaries between neighbours, one float either side; then random blocks at scales from subnormal to
    1e18, a block of zeros and one with a NaN."""
    below, above = qmap[:-1], qmap[1:]
    boundary = below + (above - below) * 0.5  # where torchao rounds up: x - below >= (above - below) * 0.5
    special = torch.cat([qmap, boundary, torch.nextafter(boundary, above), torch.nextafter(boundary, below),
                         -qmap, -boundary])
    filler = block_size - 1
    rows = -(-special.numel() // filler)
    special = torch.cat([special, torch.zeros(rows * filler - special.numel())]).view(rows, filler)
    special = torch.cat([torch.ones(rows, 1), special], dim=1).flatten()
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([1e-40, 1e-18, 1e-9, 1e-3, 1.0, 1e3, 1e9, 1e18])  # 1e-40: subnormal; squares finite
    noise = (torch.randn(len(scales), block_size, generator=gen) * scales[:, None]).flatten()
    nan = torch.randn(block_size, generator=gen)
    nan[3] = float("nan")
    return torch.cat([special, noise, torch.zeros(block_size), nan])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("state_format,block_size", [("8bit", 256), ("4bit", 128), ("4bit", 32)])
def test_codes_and_scales_are_torchaos_for_any_moments(device, state_format, block_size, signed):
    """Every code value and every rounding boundary of the map, tiny and huge scales, zeros, NaN: the kernel's
    codes and scales equal torchao's ``copy_`` (``scale_tensor`` + ``quantize_*bit_with_qmap``) bit for bit."""
    ao = lowbit._torchao_optim()
    kind = ao.subclass_8bit.OptimState8bit if state_format == "8bit" else ao.subclass_4bit.OptimState4bit
    qmap = kind.zeros((block_size,), signed, block_size).qmap
    values = adversarial(qmap, block_size)
    values = torch.cat([values, torch.zeros(-values.numel() % (4 * block_size))])  # whole programs, and a tail
    values = torch.cat([values, torch.randn(2 * block_size)])
    exp_avg, exp_avg_sq, kind = launch_one(device, state_format, signed, values, block_size)
    for got, moment, moment_signed in ((exp_avg, values, signed), (exp_avg_sq, values * values, False)):
        expected = kind.zeros(moment.shape, moment_signed, block_size)
        expected.copy_(moment)
        assert torch.equal(got.codes.cpu(), expected.codes)
        assert torch.equal(got.scale.cpu().isnan(), expected.scale.isnan()) and expected.scale.isnan().any()
        assert torch.equal(got.scale.cpu().nan_to_num(), expected.scale.nan_to_num())


def test_four_bit_codes_pack_two_per_byte_high_nibble_first(device):
    """Element 2k in byte k's high nibble, 2k + 1 in its low one (torchao 0.18's packing): a ramp over the
    unsigned map (1/16 ... 1) gives codes 0 ... 15, packed as 0x01, 0x23, ..."""
    ramp = torch.linspace(1, 16, 16).repeat(4) / 16  # block size 64: absmax 1
    exp_avg, _, _ = launch_one(device, "4bit", False, ramp, 64)
    assert exp_avg.codes.cpu().tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF] * 4
    assert torch.equal(exp_avg.dequantize().cpu(), ramp)


@pytest.mark.parametrize("state_format,quantization_block", [("8bit", 256), ("4bit", 128)])
def test_offsets_past_two_to_the_31(device, state_format, quantization_block):
    """A flat ZeRO partition can hold more than 2^31 elements. The tables here describe a 2^31 + 512 element
    tensor whose base addresses (param, grad, codes, scales) lie 2^31 elements before real memory, and whose
    one program covers its last 512 elements: it must write what a launch on those 512 elements writes."""
    from dualadam_hf.optim import triton_lowbit_kernels

    first, n, bits = 2**31, 512, 8 if state_format == "8bit" else 4
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(n, generator=gen)
    twins = [launch_one(device, state_format, True, values, quantization_block)[:2] for _ in range(2)]
    (exp_avg, exp_avg_sq), (expected_avg, expected_avg_sq) = twins
    param, grad = torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)
    expected_param = param.clone()
    group = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, maximize=False)
    coefficients = torch.tensor([[0.01, 0.02, 1e-8]], device=device)
    triton_lowbit.launch([expected_param], [grad], [expected_avg], [expected_avg_sq], coefficients, group, block=n)
    table = lambda rows: torch.tensor([rows], dtype=torch.int64, device=device)  # noqa: E731
    triton_lowbit_kernels.lowbit_kernel[(1,)](
        table([param.data_ptr() - first * 4, grad.data_ptr() - first * 4,
               exp_avg.codes.data_ptr() - first * bits // 8, exp_avg_sq.codes.data_ptr() - first * bits // 8]),
        table([exp_avg.scale.data_ptr() - first // quantization_block * 4,
               exp_avg_sq.scale.data_ptr() - first // quantization_block * 4,
               exp_avg.qmap.data_ptr(), exp_avg_sq.qmap.data_ptr()]),
        torch.tensor([first + n], dtype=torch.int64, device=device), coefficients,
        torch.zeros(1, dtype=torch.int32, device=device), torch.tensor([first], dtype=torch.int64, device=device),
        1.0 - 1e-2 * 0.1, 1.0, 1.0 - 0.9, 1.0 - 0.99, 0,
        P_KIND=0, G_KIND=0, BITS=bits, QBLOCK=quantization_block, UPDATE=True, STOCHASTIC=False, ALIGNED=False,
        BLOCK=n, enable_fp_fusion=False,
    )
    assert torch.equal(param, expected_param)
    for got, want in ((exp_avg, expected_avg), (exp_avg_sq, expected_avg_sq)):
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)


def test_dtensor_params_step_their_local_shards(device, monkeypatch):
    """FSDP2's parameters are DTensors, and so is their quantized state: the kernel updates the local shards,
    in the one launch, as it does plain tensors."""
    from one_process_group import one_process_group
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    launches = Launches(monkeypatch)
    grads = make_grads(3)
    plain = make_params(device)
    run(DualAdam8bit(plain, **HYPER, switch_rate=0.3, compiled=False), plain, grads)
    with one_process_group():
        mesh = DeviceMesh(device.type, [0])
        sharded = [torch.nn.Parameter(distribute_tensor(t.detach(), mesh, [Shard(0)])) for t in make_params(device)]
        optimizer = DualAdam8bit(sharded, **HYPER, switch_rate=0.3, compiled=False)
        for step_grads in grads:
            for p, g in zip(sharded, step_grads):
                p.grad = distribute_tensor(g.to(device), mesh, [Shard(0)])
            optimizer.step()
        assert all(torch.equal(p.full_tensor(), q) for p, q in zip(sharded, plain))
        assert is_quantized(optimizer.state[sharded[0]]["exp_avg"])
    assert len(launches.quantized) == 2 * 3


def test_resume_between_the_per_tensor_step_and_the_kernel(device, monkeypatch):
    """Three steps on one backend, a weights_only checkpoint, three on the other, both ways: the state keeps
    torchao's format and its step count, alpha_t continues, codes and scales are those of a run that never
    changed backend (the moments do not depend on the parameters), and the parameters follow it."""
    kwargs = dict(**HYPER, switch_rate=0.2, weight_decay=0.01)
    grads = make_grads(6)
    launches = Launches(monkeypatch)
    straight = make_params("cpu")
    straight_optimizer = DualAdam8bit(straight, **kwargs, fused=False, compiled=False)
    run(straight_optimizer, straight, grads)
    for first, second in ((dict(fused=False), {}), ({}, dict(fused=False))):
        params = make_params(device)
        optimizer = DualAdam8bit(params, **kwargs, compiled=False, **first)
        run(optimizer, params, grads[:3])
        buffer = io.BytesIO()
        torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed = [torch.nn.Parameter(t) for t in saved["params"]]
        optimizer = DualAdam8bit(resumed, **kwargs, compiled=False, **second)
        optimizer.load_state_dict(saved["optimizer"])
        assert optimizer.latest_alpha() == pytest.approx(0.4)
        run(optimizer, resumed, grads[3:])
        for p, q in zip(resumed, straight):
            state, expected = optimizer.state[p], straight_optimizer.state[q]
            assert state["step"].item() == 6
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                if is_quantized(expected[key]):
                    assert is_quantized(state[key]) and state[key].signed == expected[key].signed
                    assert torch.equal(state[key].codes.cpu(), expected[key].codes)
                    assert torch.equal(state[key].scale.cpu(), expected[key].scale)
        kept_on = {p.device if not second else torch.device("cpu") for p in resumed}  # the kernel's, or the CPU
        assert {optimizer.state[p]["step"].device for p in resumed} == kept_on
    assert len(launches.quantized) == 6


def test_lr_alpha_and_step_change_without_recompiles_or_host_reads(device, monkeypatch):
    """A scheduler's lr, alpha_t and the step change every step; Triton's key of the launch does not, and
    after the first step (which builds the launch tables) the host reads no tensor's value."""
    launches = Launches(monkeypatch)
    params = make_params(device)[:3]
    optimizer = InvAdam4bit(params, lr=1e-3, weight_decay=0.01)
    grads = make_grads(4)
    run(optimizer, params, grads[:1])
    with HostReads() as reads:
        for step, step_grads in enumerate(grads[1:]):
            optimizer.param_groups[0]["lr"] = 1e-3 * (2 + step)
            run(optimizer, params, [step_grads])
    assert reads.count == 0
    assert len(launches.quantized) == 4
    assert compiles(launches.quantized) == 1
    assert len({args[6] for _, _, _, args in launches.quantized}) == 4  # the decay, 1 - lr * wd, did change
    assert all(optimizer.state[p]["step"].item() == 4 for p in params) and optimizer.latest_alpha() == 1.0


def test_lr_zero_moves_the_moments_not_the_parameters(device):
    params = make_params(device)
    before = [p.detach().clone() for p in params]
    optimizer = DualAdam8bit(params, lr=0.0, eps=0.0, weight_decay=0.5)
    run(optimizer, params, [[torch.zeros_like(g) for g in s] for s in make_grads(1)] + make_grads(1))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert optimizer.state[params[0]]["exp_avg"].scale.abs().max() > 1e-12


def test_stochastic_rounding_in_the_kernel(device, monkeypatch):
    """bf16 parameters with ``bf16_stochastic_round``: the quantized ones are rounded in the kernel, so that an
    update below bf16's resolution is kept on average (lr * update = 1e-4 at 1.0, where bf16's spacing is
    2^-8) and elements round apart; the plain ones keep the per-tensor step, which rounds stochastically."""
    launches = Launches(monkeypatch)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16, device=device))
    small = torch.nn.Parameter(torch.ones(7, dtype=torch.bfloat16, device=device))
    optimizer = DualAdam8bit([p, small], lr=1e-4, schedule="step", switch_step=0, bf16_stochastic_round=True,
                             compiled=False)
    for _ in range(10):
        p.grad, small.grad = torch.ones_like(p), torch.ones_like(small)
        optimizer.step()
    assert len(launches.quantized) == 10 and not launches.plain
    assert p.float().mean().item() == pytest.approx(1.0 - 10 * 1e-4, abs=1e-4)
    # each step rounds down with probability 1e-4 / 2^-8 = 2.56%, independently: 77% of the elements stay at 1
    values = p.float()
    assert set(values.tolist()) <= {1.0 - k * 2**-8 for k in range(11)}
    assert 0.72 < (values == 1.0).float().mean().item() < 0.82


def test_what_the_kernel_does_not_take_keeps_the_per_tensor_step(device, monkeypatch):
    """FP8 state, a block size that is not a power of two, the rescaled InvAdam term, a callable schedule and
    fused=False: no launch, and the step stays on the CPU as the per-tensor step keeps it."""
    launches = Launches(monkeypatch)
    settings = [
        (DualAdamFp8, {}),
        (DualAdam8bit, dict(block_size=96)),
        (DualAdam8bit, dict(inv_scale="adam_rms")),
        (DualAdam4bit, dict(schedule=lambda t: 0.5)),
        (DualAdam4bit, dict(fused=False)),
    ]
    for optimizer_class, kwargs in settings:
        params = make_params(device)[1:2]  # 1536 elements: 96 divides them too
        optimizer = optimizer_class(params, **HYPER, compiled=False, **kwargs)
        run(optimizer, params, [s[1:2] for s in make_grads(1)])
        assert is_quantized(optimizer.state[params[0]]["exp_avg"]), optimizer_class
        assert optimizer.state[params[0]]["step"].device.type == "cpu", optimizer_class
    assert not launches.quantized and not launches.plain


PTX_PROBE = textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dualadam_hf.optim import triton_lowbit_kernels

    signature = {"addresses": "*i64", "state_addresses": "*i64", "numels": "*i64", "coefficients": "*fp32",
                 "block_tensor": "*i32", "block_start": "*i64", "decay": "fp32", "grad_sign": "fp32",
                 "weight1": "fp32", "weight2": "fp32", "seed": "i32", "P_KIND": "constexpr", "G_KIND": "constexpr",
                 "BITS": "constexpr", "QBLOCK": "constexpr", "UPDATE": "constexpr", "STOCHASTIC": "constexpr",
                 "ALIGNED": "constexpr", "BLOCK": "constexpr"}
    count = lambda pattern, text: len(re.findall(pattern, text))
    found = {}
    for kind, bits, quantization_block, stochastic in ((0, 8, 256, False), (1, 8, 256, False), (0, 4, 128, False),
                                                       (1, 8, 256, True)):
        constants = dict(P_KIND=kind, G_KIND=kind, BITS=bits, QBLOCK=quantization_block, UPDATE=True,
                         STOCHASTIC=stochastic, ALIGNED=True, BLOCK=4096)
        source = ASTSource(triton_lowbit_kernels.lowbit_kernel, signature, constants,
                           {(i,): [["tt.divisibility", 16]] for i in range(6)})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=8, enable_fp_fusion=False)).asm["ptx"]
        # two copies of the body, each one basic block: the masked one and the unmasked one, which is the block
        # with the most 128-bit loads (which copy is the branch's target differs between Triton versions)
        starts = [0] + [m.start() for m in re.finditer(r"\\$L__BB0_\\d+:", ptx)]
        blocks = [ptx[a:b] for a, b in zip(starts, starts[1:] + [len(ptx)])]
        fast = max(blocks, key=lambda block: count(r"ld\\.global(?:\\.\\w+)*\\.v4", block))
        found[f"{kind}-{bits}" + ("-stochastic" if stochastic else "")] = dict(
            predicated_loads=count(r"@%p\\d+ ld\\.global", fast),
            load_v4=count(r"ld\\.global(?:\\.\\w+)*\\.v4", fast),
            store_v4=count(r"st\\.global(?:\\.\\w+)*\\.v4", fast),
            load_v2=count(r"ld\\.global(?:\\.\\w+)*\\.v2", fast),
            store_v2=count(r"st\\.global(?:\\.\\w+)*\\.v2", fast),
            scalar_byte=count(r"(?:ld|st)\\.global(?:\\.\\w+)*\\.[bu]8 ", fast),
            word_loads=count(r"ld\\.global(?:\\.\\w+)*\\.b32 ", fast),
            fma=count(r"fma\\.rn\\.f32", fast),
            sqrt=sorted(set(re.findall(r"sqrt(?:\\.\\w+)+", ptx))),
            div=sorted(set(re.findall(r"div(?:\\.\\w+)+\\.f32", ptx))),
            lines=ptx.count("\\n"),
        )
    json.dump(found, sys.stdout)
    """
)


def test_sm90_ptx_vectorises_the_codes_and_gathers_as_counted():
    """Compiled for an H100/H200 (sm_90) on this machine, no GPU needed (a subprocess without the interpreter).
    Per thread of 8 warps over 4096 elements (16 elements each), the unmasked path of aligned tensors:

    - 8-bit codes: one 128-bit access per moment (16 codes), loads and stores; p and g as the plain kernel;
    - 4-bit codes: one 64-bit access per moment (16 codes in 8 bytes);
    - no scalar byte access, no predicated load;
    - gathers from the qmaps (``ld.global.b32``): 16 elements x 2 moments x (BITS - 1 search levels + 2 for
      the rounding + 1 to dequantize), plus a broadcast read per moment for the search's first level and
      the thread's few scalar loads (coefficients, block scales);
    - sqrt and division correctly rounded; no contracted multiply-add: the FMAs are lerp's, 2 x 16;
    - stochastic rounding of bf16 parameters (Philox in the kernel) changes none of the above.
    """
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", PTX_PROBE], capture_output=True, text=True, env=environment,
                           timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout)
    print(json.dumps(found, indent=1))
    fp32_8, bf16_8, fp32_4 = found["0-8"], found["1-8"], found["0-4"]
    assert (fp32_8["load_v4"], fp32_8["store_v4"]) == (4 + 4 + 2, 4 + 2)  # p, g, 2 x codes; p, 2 x codes
    assert (bf16_8["load_v4"], bf16_8["store_v4"]) == (2 + 2 + 2, 2 + 2)
    assert (fp32_4["load_v4"], fp32_4["store_v4"]) == (4 + 4, 4) and (fp32_4["load_v2"], fp32_4["store_v2"]) == (2, 2)
    stochastic = found["1-8-stochastic"]
    assert all(stochastic[key] == bf16_8[key] for key in ("load_v4", "store_v4", "word_loads", "fma")), stochastic
    for variant, bits in ((fp32_8, 8), (bf16_8, 8), (fp32_4, 4)):
        assert variant["predicated_loads"] == 0 and variant["scalar_byte"] == 0, variant
        gathers = 16 * 2 * (bits + 2) + 2
        assert gathers <= variant["word_loads"] <= gathers + 24, variant
        assert variant["sqrt"] == ["sqrt.rn.f32"] and variant["div"] == ["div.rn.f32"], variant
        assert variant["fma"] == 2 * 16, variant
