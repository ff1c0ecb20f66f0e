"""The fused backend (dualadam_hf.optim.fused) against the float64 reference twin, and its compile contract.

Compiling is the slow part on a small CPU, so the tests share the compiled kernels: one graph per
kernel kind and dtype for the whole file (the ``compiled`` fixture builds the float32 ones first).
"""

from __future__ import annotations


import pytest
import torch
from reference import linear_alpha
from optim.test_optimizer import (
    CASES, SHAPES, STEPS, make_grads, make_params, reference_hyper, reference_run, run, run_with_a_resume,
    assert_16_bit_run_tracks_reference, assert_grad_never_written, assert_tracks_reference,
)

from dualadam_hf import DualAdam, InvAdam
from dualadam_hf.optim import fused as fused_backend

pytestmark = pytest.mark.skipif(
    fused_backend.unavailable_reason(torch.zeros(2)) is not None,
    reason=f"fused backend unavailable on CPU: {fused_backend.unavailable_reason(torch.zeros(2))}",
)

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
FP32_RTOL = 1e-5


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled():
    """Compile the three float32 CPU kernels once (InvAdam, then Adam, via the step schedule; the blend)."""
    params = make_params(torch.float32)
    run(DualAdam(params, fused=True, schedule="step", switch_step=1), params, make_grads(2))
    run(DualAdam(params, fused=True, switch_rate=0.1), params, make_grads(1))


# the rescaled InvAdam term is refused by fused=True (tested in test_optimizer.py)
FUSED_CASES = {name: case for name, case in CASES.items() if "inv_scale" not in case[0]}


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fp32_matches_reference_twin(compiled, case):
    """Every schedule, weight decay and maximize, over 40 steps that cross the switch point."""
    kwargs, alpha = FUSED_CASES[case]
    params = make_params(torch.float32)
    grads = make_grads(STEPS)
    run(DualAdam(params, **HYPER, **kwargs, fused=True), params, grads)
    expected = reference_run([(range(len(SHAPES)), reference_hyper(kwargs, alpha))], grads)
    assert_tracks_reference(params, expected, FP32_RTOL)


def test_two_param_groups_with_their_own_lr_and_weight_decay(compiled):
    params = make_params(torch.float32)
    groups = [dict(params=params[:2], lr=1e-2, weight_decay=0.05), dict(params=params[2:], lr=3e-3)]
    grads = make_grads(STEPS)
    run(DualAdam(groups, betas=(0.9, 0.99), switch_rate=0.04, fused=True), params, grads)
    base = dict(beta1=0.9, beta2=0.99, eps=1e-8, alpha=linear_alpha(0.04))
    expected = reference_run(
        [([0, 1], dict(base, lr=1e-2, weight_decay=0.05)), ([2], dict(base, lr=3e-3, weight_decay=0.0))], grads
    )
    assert_tracks_reference(params, expected, FP32_RTOL)


def test_invadam(compiled):
    params = make_params(torch.float32)
    grads = make_grads(STEPS)
    run(InvAdam(params, **HYPER, weight_decay=0.01, fused=True), params, grads)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=lambda t: 1.0)
    assert_tracks_reference(params, reference_run([(range(len(SHAPES)), hyper)], grads), FP32_RTOL)


def test_after_the_switch_it_is_torch_fused_adamw(compiled):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    grads = make_grads(30)
    run(DualAdam(ours, **HYPER, weight_decay=0.1, switch_rate=1.0, fused=True), ours, grads)
    run(torch.optim.AdamW(theirs, **HYPER, weight_decay=0.1, fused=True), theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_params_track_the_reference(dtype):
    """Computed in float32 inside the kernel and rounded once per step: the drift allowed is 1.5 units
    in the last place of the dtype per step, relative to each tensor's largest magnitude (as for the
    other backends in test_optimizer.py)."""
    params = make_params(dtype)
    assert_16_bit_run_tracks_reference(params, fused=True)
    moved = max((p.double() - q).abs().max().item() for p, q in zip(params, make_params()))
    assert moved > 10 * torch.finfo(dtype).eps


def test_save_weights_only_load_resume(compiled):
    kwargs = dict(**HYPER, weight_decay=0.01, switch_rate=0.05, fused=True)
    grads = make_grads(STEPS)
    straight = make_params(torch.float32)
    run(DualAdam(straight, **kwargs), straight, grads)

    resumed, _ = run_with_a_resume(make_params(torch.float32), kwargs, grads, stop=12)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=linear_alpha(0.05))
    assert_tracks_reference(resumed, reference_run([(range(len(SHAPES)), hyper)], grads), FP32_RTOL)


def test_changing_lr_alpha_and_step_does_not_recompile(compiled):
    params = make_params(torch.float32)
    optimizer = DualAdam(params, lr=1e-3, switch_rate=0.03, weight_decay=0.01, fused=True)
    before = compiled_graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, step_grads in enumerate(make_grads(50)):
            optimizer.param_groups[0]["lr"] = 1e-3 * (1 + step % 7)  # a scheduler's work
            for p, g in zip(params, step_grads):
                p.grad = g.float()
            optimizer.step()
    assert optimizer.latest_alpha() == 0.0  # blended, then switched to the Adam kernel
    assert compiled_graphs() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensors_of_many_sizes_ranks_and_offsets_share_one_graph(compiled, dtype):
    """Sizes, ranks, storage offsets (views into one flat buffer, as ZeRO and FSDP1 lay parameters
    out) and chunk counts: none of them compiles a new graph."""
    flat = torch.randn(20_000, dtype=dtype)
    shapes = [(2,), (3,), (5, 7), (17,), (4, 4), (4, 4), (100,), (2, 3, 4), (3, 2, 2, 2), (1000,), (64, 65), (7,)]
    params, offset = [], 3
    for shape in shapes:
        numel = torch.Size(shape).numel()
        params.append(torch.nn.Parameter(flat[offset : offset + numel].view(shape)))
        offset += numel + 1

    def steps(subset):
        optimizer = DualAdam(subset, lr=1e-3, switch_rate=0.5, fused=True)
        for _ in range(3):  # blend, then Adam
            for p in subset:
                p.grad = torch.randn_like(p)
            optimizer.step()

    steps([torch.nn.Parameter(torch.randn(3, dtype=dtype))])  # both kernels compiled for this dtype
    before = compiled_graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for count in (len(params), 9, 8, 1):  # float32: two chunks, a padded chunk, a full chunk, one tensor
            steps(params[:count])
    assert compiled_graphs() == before


def test_tensors_the_kernel_does_not_take_match_the_single_tensor_backend(compiled):
    """One-element and non-contiguous tensors take the single-tensor path inside the fused backend."""

    def make():
        gen = torch.Generator().manual_seed(3)
        return [
            torch.nn.Parameter(torch.randn(1, generator=gen)),
            torch.nn.Parameter(torch.randn(6, 5, generator=gen).t()),
            torch.nn.Parameter(torch.randn(4, 3, generator=gen)),
        ]

    fused, single = make(), make()
    grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(s)) for p in fused] for s in range(8)]
    run(DualAdam(fused, **HYPER, switch_rate=0.2, fused=True), fused, grads)
    run(DualAdam(single, **HYPER, switch_rate=0.2, foreach=False), single, grads)
    for a, b in zip(fused, single):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_is_never_written(compiled, dtype):
    assert_grad_never_written(dtype, fused=True)


@pytest.mark.parametrize("zero_grads", [False, True])
def test_lr_zero_changes_no_parameter_but_advances_the_moments(zero_grads):
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    optimizer = DualAdam(params, lr=0.0, eps=0.0, weight_decay=0.5, switch_rate=0.1, fused=True)
    for step_grads in make_grads(3):
        for p, g in zip(params, step_grads):
            p.grad = torch.zeros_like(p) if zero_grads else g.float()
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(optimizer.state[p]["step"].item() == 3 for p in params)
    assert all(bool(optimizer.state[p]["exp_avg_sq"].any()) != zero_grads for p in params)


def test_parameter_version_is_bumped(compiled):
    """The kernel writes through aliases; autograd must still see the in-place update."""
    params = make_params(torch.float32)
    versions = [p._version for p in params]
    run(DualAdam(params, switch_rate=0.1, fused=True), params, make_grads(1))
    assert all(p._version > v for p, v in zip(params, versions))


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: torch.zeros(3, dtype=torch.float64), "torch.float64 parameters are not supported"),
        (lambda: torch.zeros(3, device="meta"), "parameters on meta are not supported"),
        (lambda: torch.zeros(3).as_subclass(_Subclass), "_Subclass parameters are not plain tensors"),
    ],
)
def test_fused_true_where_unavailable_says_why(make, message):
    with pytest.raises(RuntimeError, match=f"DualAdam: fused=True is not available: {message}"):
        DualAdam([torch.nn.Parameter(make())], fused=True)


def test_fused_true_without_a_compiler_says_why(monkeypatch):
    monkeypatch.setattr(fused_backend, "_compiler_missing", lambda device_type: "no working C++ compiler (test)")
    with pytest.raises(RuntimeError, match=r"InvAdam: fused=True is not available: no working C\+\+ compiler"):
        InvAdam(make_params(torch.float32), fused=True)


def _spy_on_fused_calls(monkeypatch) -> list[bool]:
    calls = []
    real = fused_backend.fused_dualadam

    def spy(*args, **kwargs):
        calls.append(kwargs.get("fall_back", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_backend, "fused_dualadam", spy)
    return calls


def test_fused_none_takes_fused_only_for_large_plain_cpu_groups(compiled, monkeypatch):
    calls = _spy_on_fused_calls(monkeypatch)
    small = make_params(torch.float32)
    run(DualAdam(small), small, make_grads(1))
    assert calls == []  # below FUSED_MIN_NUMEL: the compile would not pay

    monkeypatch.setattr(fused_backend, "FUSED_MIN_NUMEL", 10)
    for kwargs in (dict(foreach=True), dict(foreach=False)):
        params = make_params(torch.float32)
        run(DualAdam(params, **kwargs), params, make_grads(1))
    float64 = make_params(torch.float64)
    run(DualAdam(float64), float64, make_grads(1))
    assert calls == []

    rescaled = make_params(torch.float32)
    run(DualAdam(rescaled, inv_scale="adam_rms"), rescaled, make_grads(1))
    assert calls == []  # the fused kernels have no per-tensor norm for the rescaled InvAdam term

    params = make_params(torch.float32)
    run(DualAdam(params), params, make_grads(1))
    assert calls == [True]  # chosen, with the fall-back to foreach armed


def test_compile_failure_falls_back_for_fused_none_and_raises_for_fused_true(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(kind):
        def kernel(tensors, scalars):
            raise BackendCompilerFailed(broken, RuntimeError("no compiler today"), None)

        return kernel

    monkeypatch.setattr(fused_backend, "compiled_kernel", broken)
    monkeypatch.setattr(fused_backend, "_compile_failures", {})
    monkeypatch.setattr(fused_backend, "FUSED_MIN_NUMEL", 10)

    params = make_params(torch.float32)
    optimizer = DualAdam(params, **HYPER, switch_rate=0.05)
    grads = make_grads(STEPS)
    with pytest.warns(RuntimeWarning, match="torch.compile failed on cpu, using the foreach backend"):
        run(optimizer, params, grads[:1])
    assert "cpu" in fused_backend._compile_failures and not fused_backend.preferred(params)
    run(optimizer, params, grads[1:])
    expected = reference_run([(range(len(SHAPES)), reference_hyper(dict(switch_rate=0.05), linear_alpha(0.05)))], grads)
    assert_tracks_reference(params, expected, FP32_RTOL)

    params = make_params(torch.float32)
    with pytest.raises(RuntimeError, match="fused backend: torch.compile failed on cpu"):
        run(DualAdam(params, fused=True), params, grads[:1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference_twin_without_recompiles(dtype):
    rtol = FP32_RTOL if dtype == torch.float32 else 1.5 * STEPS * torch.finfo(dtype).eps
    params = [torch.nn.Parameter(p.cuda()) for p in make_params(dtype)]
    optimizer = DualAdam(params, **HYPER, switch_rate=0.05, weight_decay=0.01, maximize=True, fused=True)
    grads = make_grads(STEPS)
    run(optimizer, params, [[g.cuda() for g in s] for s in grads[:2]])
    before = compiled_graphs()
    run(optimizer, params, [[g.cuda() for g in s] for s in grads[2:]])
    assert compiled_graphs() - before <= 1  # the Adam kernel after the switch, nothing else
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=linear_alpha(0.05), maximize=True)
    expected = reference_run([(range(len(SHAPES)), hyper)], [[g.to(dtype).double() for g in s] for s in grads])
    assert_tracks_reference([p.cpu() for p in params], expected, rtol)
