"""The CUDA backend (``triton_backend`` / ``triton_kernels``): the float64 twin, an eager mirror bit for bit,
the launch contract (one launch per bucket, no recompiles, no host syncs) and the state across backends.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``tests/conftest.py`` sets
TRITON_INTERPRET=1 before they are imported, and the ``device`` fixture lets the backend take CPU tensors):
the CUDA side is the real kernel, interpreted, not a mock. On a machine with a GPU the same tests run it
compiled on CUDA tensors. Launches stay small: the interpreter costs about 2 ms per program.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from host_reads import HostReads
from kernel_launches import compiles, kernel_device, record_launches
from one_process_group import one_process_group
from optim.test_optimizer import (
    CASES, SHAPES, STEPS, make_grads, make_params, reference_hyper, reference_run, run, run_with_a_resume,
    assert_16_bit_run_tracks_reference, assert_tracks_reference,
)
from reference import linear_alpha

from dualadam_hf import DualAdam, InvAdam
from dualadam_hf.optim import triton_backend

triton = pytest.importorskip("triton", reason="Triton is in the test extra (Linux x86-64)")
pytestmark = pytest.mark.cuda  # on a GPU machine, compiled on CUDA tensors

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
FP32_RTOL = 1e-5
# the kernel's cases: a callable schedule and the rescaled InvAdam term take foreach (tested below)
KERNEL_CASES = {name: case for name, case in CASES.items() if "inv_scale" not in case[0] and case[1] is not None}


@pytest.fixture
def device(monkeypatch):
    return kernel_device(monkeypatch)


class Calls:
    """The kernel's launches (``kernel_launches.record_launches``) and torch's fused AdamW's calls."""

    def __init__(self, monkeypatch):
        from dualadam_hf.optim import triton_kernels

        self.launches = record_launches(monkeypatch, triton_kernels, "dualadam_kernel")
        self.adamw = 0
        real_adamw = torch._fused_adamw_

        def adamw(*args, **kwargs):
            self.adamw += 1
            return real_adamw(*args, **kwargs)

        monkeypatch.setattr(torch, "_fused_adamw_", adamw)


def on(device, tensors):
    return [torch.nn.Parameter(t.detach().to(device)) for t in tensors]


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_default_backend_is_the_kernel_and_tracks_the_reference_twin(device, monkeypatch, case):
    """Every schedule, weight decay and maximize for 40 steps: one launch per step while alpha_t > 0, torch's
    fused AdamW once alpha_t = 0."""
    kwargs, alpha = KERNEL_CASES[case]
    calls = Calls(monkeypatch)
    params = on(device, make_params(torch.float32))
    grads = make_grads(STEPS)
    run(DualAdam(params, **HYPER, **kwargs), params, grads)
    assert_tracks_reference(params, reference_run([(range(len(SHAPES)), reference_hyper(kwargs, alpha))], grads),
                            FP32_RTOL)
    blending = sum(alpha(t) > 0 for t in range(1, STEPS + 1))
    assert (len(calls.launches), calls.adamw) == (blending, STEPS - blending)


def test_invadam_and_two_groups(device, monkeypatch):
    calls = Calls(monkeypatch)
    params = on(device, make_params(torch.float32))
    groups = [dict(params=params[:2], lr=1e-2, weight_decay=0.05), dict(params=params[2:], lr=3e-3)]
    grads = make_grads(STEPS)
    run(InvAdam(groups, betas=(0.9, 0.99)), params, grads)
    base = dict(beta1=0.9, beta2=0.99, eps=1e-8, alpha=lambda t: 1.0)
    expected = reference_run(
        [([0, 1], dict(base, lr=1e-2, weight_decay=0.05)), ([2], dict(base, lr=3e-3, weight_decay=0.0))], grads
    )
    assert_tracks_reference(params, expected, FP32_RTOL)
    assert len(calls.launches) == 2 * STEPS and calls.adamw == 0  # one launch per group and step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_params_track_the_reference(device, dtype):
    """Computed in float32 and rounded once per step: 1.5 units in the last place per step, relative to each
    tensor's largest magnitude, as for the other backends."""
    assert_16_bit_run_tracks_reference(on(device, make_params(dtype)))


def mirror_step(p, g, m, v, coefficients, decay, beta1, grad_weight1, beta2, grad_weight2):
    """The kernel's arithmetic in eager float32, each operation rounded once (sqrt through float64, which
    rounds correctly, as ``sqrt_rn`` does); 16-bit results rounded to nearest even by torch."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    inv, adam, eps_b = (f32(c) for c in coefficients.tolist())
    g = g.float()
    m_new = m.float() * f32(beta1) + g * f32(grad_weight1)
    v_new = v.float() * f32(beta2) + (g * g) * f32(grad_weight2)
    root = v_new.double().sqrt().float()
    adam_term = adam / (root + eps_b) if adam != 0 else torch.zeros_like(root)
    p_new = p.float() * f32(decay) - m_new * (root * inv + adam_term)
    return p_new.to(p.dtype), m_new.to(m.dtype), v_new.to(v.dtype)


SIZES = [1, 2, 3, 255, 256, 257, 1000, 1031]  # with 256-element blocks: full blocks, tails, lone tails


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the interpreter computes both sides of a where
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_is_bit_for_bit_an_eager_mirror(device, dtype):
    """Tensors of many sizes in one launch, three steps (alpha_t = 1, 0.3, 0), weight decay and maximize,
    eps = 0 with some zero gradients (the Adam term must not turn 0 / 0 into NaN at alpha_t = 1)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    exp_avgs = [torch.zeros(n, dtype=dtype) for n in SIZES]
    exp_avg_sqs = [torch.zeros(n, dtype=dtype) for n in SIZES]
    group = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1, maximize=True, schedule="linear")
    for step, switch_rate, eps in ((1, 0.0, 0.0), (2, 0.35, 1e-8), (3, 1.0, 1e-8)):
        grads = [(torch.randn(n, generator=gen) * (torch.arange(n) % 5 != 0)).to(dtype) for n in SIZES]
        coefficients = triton_backend.device_coefficients(
            [torch.tensor(float(step))] * len(SIZES), dict(group, switch_rate=switch_rate, eps=eps)
        )
        expected = [
            mirror_step(p, g, m, v, c, 1 - 3e-2 * 0.1, 0.9, -(1 - 0.9), 0.99, 1 - 0.99)
            for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, coefficients)
        ]
        tensors = [[t.to(device) for t in column] for column in (params, grads, exp_avgs, exp_avg_sqs)]
        triton_backend.launch(*tensors, coefficients.to(device), group, block=256)
        params, _, exp_avgs, exp_avg_sqs = [[t.cpu() for t in column] for column in tensors]
        for got, want in zip(zip(params, exp_avgs, exp_avg_sqs), expected):
            for a, b in zip(got, want):
                assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   b.view(torch.int16 if dtype != torch.float32 else torch.int32)), step
        assert all(torch.isfinite(p).all() for p in params), step


def test_offsets_past_two_to_the_31(device):
    """A flat ZeRO partition can hold more than 2^31 elements. The tables here describe a 2^31 + 300
    element tensor whose base address lies 2^31 elements before real memory, and whose blocks cover only
    its last 300 elements: with 32-bit offsets the kernel would write elsewhere."""
    from dualadam_hf.optim import triton_kernels

    first = 2**31
    tensors = [torch.randn(300) for _ in range(4)]
    tensors[3] = tensors[3].abs()
    expected = mirror_step(*tensors, torch.tensor([0.01, 0.02, 1e-8]), 1.0, 0.9, 0.1, 0.99, 0.01)
    on_device = [t.to(device) for t in tensors]
    addresses = torch.tensor([[t.data_ptr() - first * 4 for t in on_device]], dtype=torch.int64, device=device)
    triton_kernels.dualadam_kernel[(2,)](
        addresses,
        torch.tensor([first + 300], dtype=torch.int64, device=device),
        torch.tensor([[0.01, 0.02, 1e-8]], device=device),
        torch.zeros(2, dtype=torch.int32, device=device),
        torch.tensor([first, first + 256], dtype=torch.int64, device=device),
        1.0, 0.9, 0.1, 0.99, 0.01,
        P_KIND=0, G_KIND=0, S_KIND=0, ALIGNED=False, BLOCK=256,
    )
    for got, want in zip([on_device[0], on_device[2], on_device[3]], expected):
        assert torch.equal(got.cpu(), want)


def test_lr_alpha_and_step_change_without_recompiles_or_host_reads(device, monkeypatch):
    """A scheduler's lr, alpha_t and the step change every step: Triton's specialisation key of the launch
    does not (one compile per dtype), and the host reads no tensor's value in any step."""
    calls = Calls(monkeypatch)
    params = on(device, make_params(torch.float32))
    optimizer = DualAdam(params, lr=1e-3, switch_rate=0.03, weight_decay=0.01)
    with HostReads() as reads:
        for step, step_grads in enumerate(make_grads(40)):
            optimizer.param_groups[0]["lr"] = 1e-3 * (1 + step % 7)
            for p, g in zip(params, step_grads):
                p.grad = g.float().to(device)
            optimizer.step()
    assert reads.count == 0
    assert len(calls.launches) == 33 and calls.adamw == 7  # alpha_t = 1 - 0.03 t reaches 0 at t = 34
    assert compiles(calls.launches) == 1
    assert len({args[5] for _, _, _, args in calls.launches}) == 7  # the decay, 1 - lr * wd, did change
    assert optimizer.latest_alpha() == 0.0


def test_a_step_count_written_in_place_is_followed(device):
    """DeepSpeed restores a checkpoint by copying into the state's existing tensors, behind the host's copy
    of the step: alpha_t and the bias corrections come from the device's step all the same."""
    kwargs = dict(**HYPER, switch_rate=0.05)
    grads = make_grads(25)
    straight = on(device, make_params(torch.float32))
    straight_optimizer = DualAdam(straight, **kwargs)
    run(straight_optimizer, straight, grads[:22])

    restored = on(device, make_params(torch.float32))
    optimizer = DualAdam(restored, **kwargs)
    run(optimizer, restored, grads[:3])  # the host now counts 3
    for p, q in zip(restored, straight):
        p.data.copy_(q.data)
        for key, value in straight_optimizer.state[q].items():
            optimizer.state[p][key].data.copy_(value)
    run(straight_optimizer, straight, grads[22:])
    run(optimizer, restored, grads[22:])  # alpha_t = 0 from step 20 on; the host would say 0.8
    for a, b in zip(restored, straight):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert optimizer.latest_alpha() == 0.0  # what the Trainer logs reads the device's steps


def test_resume_within_the_kernel_backend_is_bit_exact(device):
    kwargs = dict(**HYPER, weight_decay=0.01, switch_rate=0.05)
    grads = make_grads(STEPS)
    straight = on(device, make_params(torch.float32))
    run(DualAdam(straight, **kwargs), straight, grads)
    resumed, optimizer = run_with_a_resume(on(device, make_params(torch.float32)), kwargs, grads, 12)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    assert all(optimizer.state[p]["step"].device == p.device for p in resumed)


def test_inv_share_reads_the_device_twice_and_agrees_with_foreach(device):
    """dualadam_inv_share at a logging step (diagnostics.inv_share_sums) from the state this backend keeps, the
    step counters on the device included: two host reads whatever the number of tensors, foreach's figures."""
    from host_reads import HostReads

    from dualadam_hf.optim.diagnostics import inv_share_sums

    grads = make_grads(3)
    params = on(device, make_params(torch.float32))
    optimizer = DualAdam(params, **HYPER, switch_rate=0.1)
    run(optimizer, params, grads)
    twin = make_params(torch.float32)
    foreach = DualAdam(twin, **HYPER, switch_rate=0.1, foreach=True)
    run(foreach, twin, grads)
    with HostReads() as reads:
        sums = inv_share_sums(optimizer)
    assert reads.count == 2 < len(params)
    assert sums == pytest.approx(inv_share_sums(foreach), rel=1e-5)


@pytest.mark.parametrize("direction", ["foreach_to_kernel", "kernel_to_foreach"])
def test_resume_across_backends_and_devices(device, monkeypatch, direction):
    """A checkpoint of a CPU run (foreach: a small model) resumes on the kernel and back, with the default
    settings on both sides: the step moves to where the backend keeps it, alpha_t continues, and the result
    tracks the reference as a straight run does. (Without a GPU the kernel's side is the interpreter on the
    CPU, so the backend's devices are switched between the two halves.)"""
    kwargs = dict(**HYPER, weight_decay=0.01, switch_rate=0.02)
    grads = make_grads(STEPS)
    calls = Calls(monkeypatch)
    kernel_devices = triton_backend.DEVICES

    def set_devices(devices):
        return lambda: monkeypatch.setattr(triton_backend, "DEVICES", devices)

    if direction == "foreach_to_kernel":
        set_devices(("cuda",))()
        resumed, optimizer = run_with_a_resume(make_params(torch.float32), kwargs, grads, 12, map_location=device,
                                               between=set_devices(kernel_devices))
        assert len(calls.launches) == STEPS - 12
        assert all(optimizer.state[p]["step"].device == p.device for p in resumed)
    else:
        resumed, optimizer = run_with_a_resume(on(device, make_params(torch.float32)), kwargs, grads, 12,
                                               map_location="cpu", between=set_devices(("cuda",)))
        assert len(calls.launches) == 12
        assert all(optimizer.state[p]["step"].device.type == "cpu" for p in resumed)
    assert all(optimizer.state[p]["step"].item() == STEPS for p in resumed)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=linear_alpha(0.02))
    assert_tracks_reference(resumed, reference_run([(range(len(SHAPES)), hyper)], grads), FP32_RTOL)


def test_lr_zero_changes_no_parameter_and_grad_is_never_written(device):
    params = on(device, make_params(torch.float32))
    before = [p.detach().clone() for p in params]
    optimizer = DualAdam(params, lr=0.0, eps=0.0, weight_decay=0.5, switch_rate=0.1)
    run(optimizer, params, [[torch.zeros_like(g) for g in s] for s in make_grads(2)])
    assert all(torch.equal(p, b) for p, b in zip(params, before))

    optimizer = DualAdam(params, lr=1e-2, weight_decay=0.1, maximize=True, switch_rate=0.3)
    for step_grads in make_grads(5):
        for p, g in zip(params, step_grads):
            p.grad = g.float().to(device)
        kept = [p.grad.clone() for p in params]
        optimizer.step()
        assert all(torch.equal(p.grad, k) for p, k in zip(params, kept))
    assert all(p._version > 0 for p in params)


def test_tensors_the_kernel_does_not_take_go_to_foreach(device, monkeypatch):
    """A transposed parameter, float64, a callable schedule, the rescaled InvAdam term and foreach=True stay
    off the kernel; the plain tensors of the same group still take it."""
    calls = Calls(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    transposed = torch.nn.Parameter(torch.randn(6, 5, generator=gen).t().to(device))
    plain = torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(device))
    optimizer = DualAdam([transposed, plain], **HYPER, switch_rate=0.2)
    twin = [torch.nn.Parameter(t.detach().clone()) for t in (transposed, plain)]
    reference = DualAdam(twin, **HYPER, switch_rate=0.2, foreach=False)
    for seed in range(3):
        step_grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in twin]
        run(optimizer, [transposed, plain], [step_grads])
        run(reference, twin, [step_grads])
    assert [args[1].tolist()[0] for _, _, _, args in calls.launches] == [plain.numel()] * 3
    for a, b in zip((transposed, plain), twin):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-6, atol=1e-7)

    others = [
        (make_params(torch.float64), {}),
        (make_params(torch.float32), dict(schedule=lambda t: 0.5)),
        (make_params(torch.float32), dict(inv_scale="adam_rms")),
        (make_params(torch.float32), dict(foreach=True)),
    ]
    before = len(calls.launches)
    for params, kwargs in others:
        params = on(device, params)
        run(DualAdam(params, **HYPER, **kwargs), params, make_grads(1))
    assert len(calls.launches) == before


def test_dtensor_params_step_their_local_shards(device, monkeypatch):
    """FSDP2's parameters are DTensors: the kernel updates their local shards, as it does the plain tensors."""
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    calls = Calls(monkeypatch)
    grads = make_grads(5)
    plain = on(device, make_params(torch.float32))
    run(DualAdam(plain, **HYPER, switch_rate=0.1), plain, grads)
    with one_process_group():
        mesh = DeviceMesh(device.type, [0])
        sharded = [torch.nn.Parameter(distribute_tensor(t.to(device), mesh, [Shard(0)]))
                   for t in make_params(torch.float32)]
        optimizer = DualAdam(sharded, **HYPER, switch_rate=0.1)
        for step_grads in grads:
            for p, g in zip(sharded, step_grads):
                p.grad = distribute_tensor(g.float().to(device), mesh, [Shard(0)])
            optimizer.step()
        assert all(torch.equal(p.full_tensor(), q) for p, q in zip(sharded, plain))
    assert len(calls.launches) == 2 * 5


def test_only_cuda_by_default():
    """fused=None and fused=True leave a group to the kernel; foreach, the rescaled term and a callable schedule
    do not; and the kernel takes CUDA tensors only unless a test says otherwise."""
    assert triton_backend.DEVICES == ("cuda",)
    assert not triton_backend.takes(torch.zeros(3))
    base = dict(fused=None, foreach=None, inv_scale="none", schedule="linear")
    assert triton_backend.group_takes(base) and triton_backend.group_takes(dict(base, fused=True))
    for change in (dict(foreach=True), dict(foreach=False), dict(fused=False), dict(inv_scale="adam_rms"),
                   dict(schedule="callable")):
        assert not triton_backend.group_takes(dict(base, **change)), change


PTX_PROBE = textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dualadam_hf.optim import triton_kernels

    signature = {"addresses": "*i64", "numels": "*i64", "coefficients": "*fp32", "block_tensor": "*i32",
                 "block_start": "*i64", "decay": "fp32", "beta1": "fp32", "grad_weight1": "fp32", "beta2": "fp32",
                 "grad_weight2": "fp32", "P_KIND": "constexpr", "G_KIND": "constexpr", "S_KIND": "constexpr",
                 "ALIGNED": "constexpr", "BLOCK": "constexpr"}
    found = {}
    for kind, aligned in ((0, True), (1, True), (0, False)):
        constants = dict(P_KIND=kind, G_KIND=kind, S_KIND=kind, ALIGNED=aligned, BLOCK=4096)
        source = ASTSource(triton_kernels.dualadam_kernel, signature, constants,
                           {(i,): [["tt.divisibility", 16]] for i in range(5)})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=8, enable_fp_fusion=False)).asm["ptx"]
        found[f"{kind}-{aligned}"] = dict(
            load_v4=len(re.findall(r"ld\\.global(?:\\.\\w+)*\\.v4", ptx)),
            store_v4=len(re.findall(r"st\\.global(?:\\.\\w+)*\\.v4", ptx)),
            sqrt=sorted(set(re.findall(r"sqrt(?:\\.\\w+)+", ptx))),
            div=sorted(set(re.findall(r"div(?:\\.\\w+)+\\.f32", ptx))),
            fma=len(re.findall(r"fma\\.", ptx)),
        )
    json.dump(found, sys.stdout)
    """
)


def test_sm90_ptx_has_128_bit_accesses_and_correct_rounding():
    """Compiled for an H100/H200 (sm_90) on this machine, no GPU needed: the full-block path of aligned tensors
    loads and stores 128 bits at a time (4 float32 or 8 bf16 per access), unaligned ones cannot, and sqrt and
    the division are the correctly rounded instructions, with no multiply-add contraction."""
    import json

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", PTX_PROBE], capture_output=True, text=True, env=environment,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    # per thread of 8 warps over 4096 elements: 16 float32 = 4 accesses per tensor; read p, g, m, v; write p, m, v
    assert (found["0-True"]["load_v4"], found["0-True"]["store_v4"]) == (16, 12)
    assert (found["1-True"]["load_v4"], found["1-True"]["store_v4"]) == (8, 6)
    assert (found["0-False"]["load_v4"], found["0-False"]["store_v4"]) == (0, 0)
    for variant in found.values():
        assert variant["sqrt"] == [".rn.f32"] or all(".rn." in s for s in variant["sqrt"]), variant
        assert variant["div"] and all(".rn." in d for d in variant["div"]), variant
        assert variant["fma"] == 0


def test_a_state_of_another_size_is_refused_as_foreach_refuses_it(device):
    """torch's load_state_dict does not check shapes (a checkpoint from before a vocabulary was resized): the
    kernel, which walks all four tensors over the parameter's size, must not take such a state."""
    p = torch.nn.Parameter(torch.ones(1000, device=device))
    optimizer = DualAdam([p], lr=1e-2, switch_rate=0.1)
    saved = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(10), "exp_avg_sq": torch.zeros(10)}},
             "param_groups": optimizer.state_dict()["param_groups"]}
    optimizer.load_state_dict(saved)
    p.grad = torch.ones(1000, device=device)
    assert triton_backend.kernel_tensors(p, p.grad, optimizer.state[p]) is None
    with pytest.raises(RuntimeError, match="must match the size"):
        optimizer.step()
    assert torch.equal(p.detach().cpu(), torch.ones(1000))


def test_an_overflowed_float16_moment_stays_finite_at_alpha_zero_inside_the_kernel(device, monkeypatch):
    """One tensor is past the switch while another of its bucket still blends, so the kernel steps it with
    alpha = 0; its float16 exp_avg_sq overflowed to inf. AdamW's update is finite there (m / inf = 0), and the
    InvAdam term, whose coefficient is 0, must not turn inf * 0 into NaN."""
    calls = Calls(monkeypatch)
    kwargs = dict(lr=1e-3, betas=(0.9, 0.99), switch_rate=0.25)
    results = []
    for backend in ({}, dict(foreach=True)):
        late, early = (torch.nn.Parameter(torch.ones(8, dtype=torch.float16, device=device)) for _ in range(2))
        optimizer = DualAdam([late, early], **kwargs, **backend)
        for _ in range(5):  # alpha reaches 0 at step 4; ``late`` has had no gradient yet
            early.grad = torch.ones(8, dtype=torch.float16, device=device)
            optimizer.step()
        early.grad = torch.full((8,), 3000.0, dtype=torch.float16, device=device)  # 0.01 * 9e6 > 65504
        late.grad = torch.ones(8, dtype=torch.float16, device=device)  # its step 1: alpha = 0.75
        optimizer.step()
        assert torch.isinf(optimizer.state[early]["exp_avg_sq"]).all()
        early.grad = torch.ones(8, dtype=torch.float16, device=device)  # reads the stored inf
        late.grad = torch.ones(8, dtype=torch.float16, device=device)
        optimizer.step()
        results.append(early.detach().cpu())
    # the kernel's run: steps 1-3 blend, 4-5 are AdamW's (torch's op), 6 and 7 mix both tensors in one launch
    assert (len(calls.launches), calls.adamw) == (5, 2) and calls.launches[-1][3][0].shape[0] == 2
    assert torch.isfinite(results[0]).all() and torch.equal(results[0], results[1])


def test_a_step_count_reset_in_place_is_read_again(device):
    """A callback that restarts the schedule writes the step in place (``zero_``): the host's copy must follow,
    or it would keep choosing AdamW's arithmetic while alpha_t is back near 1."""
    kwargs = dict(**HYPER, switch_rate=0.1)
    grads = make_grads(16)
    params = on(device, make_params(torch.float32))
    optimizer = DualAdam(params, **kwargs)
    run(optimizer, params, grads[:12])  # alpha = 0 from step 10 on
    for p in params:
        optimizer.state[p]["step"].zero_()
    run(optimizer, params, grads[12:])
    assert optimizer.latest_alpha() == pytest.approx(0.6)

    restarted = on(device, make_params(torch.float32))
    twin = DualAdam(restarted, **kwargs, foreach=True)
    run(twin, restarted, grads[:12])
    for p in restarted:
        twin.state[p]["step"].zero_()
    run(twin, restarted, grads[12:])
    for a, b in zip(params, restarted):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def kernel_that_cannot_build(monkeypatch):
    """Triton failing as on a machine without a C compiler (its launcher is built with one at first use)."""
    from dualadam_hf.optim import triton_kernels

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

            return launch

    monkeypatch.setattr(triton_kernels, "dualadam_kernel", Unbuildable())
    triton_backend.available.cache_clear()
    yield
    triton_backend.available.cache_clear()


def test_a_kernel_that_cannot_build_here_falls_back_to_foreach_with_one_warning(device, kernel_that_cannot_build):
    params = on(device, make_params(torch.float32))
    grads = make_grads(STEPS)
    with pytest.warns(RuntimeWarning, match="the Triton kernel does not run on .* here .*Failed to find C compiler.*"
                                            "stepping with foreach instead"):
        run(DualAdam(params, **HYPER, switch_rate=0.05), params, grads[:1])
    run(DualAdam(params, **HYPER, switch_rate=0.05), params, grads[:0])
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, alpha=linear_alpha(0.05))
    assert_tracks_reference(params, reference_run([(range(len(SHAPES)), hyper)], grads[:1]), FP32_RTOL)


@pytest.mark.slow
def test_uneven_and_empty_dtensor_shards_on_two_processes(tmp_path):
    """FSDP2's shards differ in size across ranks, and a rank's shard can be empty: the kernel steps each local
    shard over its own size, and the sharded result equals the whole tensors stepped alike, bit for bit."""
    if torch.cuda.is_available():
        pytest.skip("the worker runs the kernel in Triton's interpreter on CPU processes")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    environment = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
         "tests/optim/dtensor_shards_worker.py", str(tmp_path)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [(tmp_path / f"rank{rank}.txt").read_text(encoding="utf-8") for rank in (0, 1)]
    assert results == ["ok, local sizes [8, 5, 3, 8]", "ok, local sizes [4, 0, 2, 8]"]
