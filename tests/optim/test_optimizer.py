"""DualAdam / InvAdam against the float64 reference twin, torch's AdamW, and the state contract."""

from __future__ import annotations

import io
import math

import pytest
import torch
from one_process_group import one_process_group
from reference import ReferenceParam, exponential_alpha, linear_alpha, step_alpha
from torch.utils._python_dispatch import TorchDispatchMode

from dualadam_hf import DualAdam, InvAdam

BACKENDS = {"single": dict(foreach=False), "foreach": dict(foreach=True)}
SHAPES = [(4, 3), (7,), (2, 2, 3)]
STEPS = 40


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)) for shape in SHAPES]


def make_grads(steps, seed=1):
    """A fixed gradient sequence with per-tensor scales from 0.05 to 3: InvAdam's term is not
    scale-free, so different scales exercise both halves of the blend."""
    gen = torch.Generator().manual_seed(seed)
    scales = [0.05, 1.0, 3.0]
    return [
        [torch.randn(shape, generator=gen, dtype=torch.float64) * scale for shape, scale in zip(SHAPES, scales)]
        for _ in range(steps)
    ]


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.device, p.dtype).clone()
        optimizer.step()


def reference_run(groups, grads):
    """groups: list of (indices into SHAPES, hyperparameters). Returns the final params by index."""
    refs = {}
    init = make_params()
    for indices, hyper in groups:
        for i in indices:
            refs[i] = ReferenceParam(theta=init[i].detach().flatten().tolist(), **hyper)
    for step_grads in grads:
        for i, ref in refs.items():
            ref.step(step_grads[i].flatten().tolist())
    return {i: torch.tensor(ref.theta, dtype=torch.float64).view(SHAPES[i]) for i, ref in refs.items()}


def assert_tracks_reference(params, expected, rtol):
    """Each tensor (on any device) within ``rtol`` of its largest reference magnitude."""
    for i, p in enumerate(params):
        error = (p.detach().cpu().double() - expected[i]).abs().max().item()
        assert error <= rtol * expected[i].abs().max().item(), (i, error)


def assert_16_bit_run_tracks_reference(params, **backend):
    """40 steps of 16-bit ``params`` (their state in their dtype), computed in float32 and rounded once per
    step: the drift allowed is 1.5 units in the last place of the dtype per step, relative to each tensor's
    largest magnitude, against the reference fed the gradients rounded to the dtype."""
    dtype = params[0].dtype
    optimizer = DualAdam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, switch_rate=0.05, weight_decay=0.01, **backend)
    grads = make_grads(STEPS)
    run(optimizer, params, grads)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=linear_alpha(0.05))
    expected = reference_run([(range(len(SHAPES)), hyper)], [[g.to(dtype).double() for g in s] for s in grads])
    assert all(p.dtype == dtype and optimizer.state[p]["exp_avg"].dtype == dtype for p in params)
    assert_tracks_reference(params, expected, 1.5 * STEPS * torch.finfo(dtype).eps)


def assert_matches_reference(params, expected, rtol=1e-9, atol=1e-12):
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().to(torch.float64), expected[i], rtol=rtol, atol=atol)


CASES = {
    # name: (optimizer kwargs, reference alpha, steps)
    "linear_fast": (dict(switch_rate=0.05), linear_alpha(0.05)),
    "linear_1_over_30": (dict(switch_rate=1 / 30), linear_alpha(1 / 30)),
    "linear_slow": (dict(switch_rate=0.01), linear_alpha(0.01)),
    "linear_weight_decay": (dict(switch_rate=0.05, weight_decay=0.1), linear_alpha(0.05)),
    "linear_maximize": (dict(switch_rate=0.05, maximize=True), linear_alpha(0.05)),
    "exponential": (dict(schedule="exponential", switch_base=0.9), exponential_alpha(0.9)),
    "step": (dict(schedule="step", switch_step=17), step_alpha(17)),
    "callable": (dict(schedule=lambda t: 0.5 * (1 + math.cos(math.pi * min(t, 25) / 25))), None),
    # the optional rescaled InvAdam term: blending, InvAdam alone (xi = 0), and with decay and maximize
    "inv_scale_linear": (dict(switch_rate=0.05, inv_scale="adam_rms"), linear_alpha(0.05)),
    "inv_scale_alpha_one": (dict(switch_rate=0.0, inv_scale="adam_rms"), linear_alpha(0.0)),
    "inv_scale_decay_maximize": (
        dict(switch_rate=1 / 30, inv_scale="adam_rms", weight_decay=0.1, maximize=True), linear_alpha(1 / 30)
    ),
}


def reference_hyper(kwargs, alpha):
    return dict(
        lr=kwargs.get("lr", 1e-2),
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=kwargs.get("weight_decay", 0.0),
        alpha=alpha if alpha is not None else kwargs["schedule"],
        maximize=kwargs.get("maximize", False),
        inv_scale=kwargs.get("inv_scale", "none"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_twin(backend, case):
    kwargs, alpha = CASES[case]
    params = make_params()
    optimizer = DualAdam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, **kwargs, **BACKENDS[backend])
    grads = make_grads(STEPS)
    run(optimizer, params, grads)
    expected = reference_run([(range(len(SHAPES)), reference_hyper(kwargs, alpha))], grads)
    assert_matches_reference(params, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_param_groups_with_their_own_lr_and_weight_decay(backend):
    params = make_params()
    groups = [
        dict(params=params[:2], lr=1e-2, weight_decay=0.05),
        dict(params=params[2:], lr=3e-3, weight_decay=0.0),
    ]
    optimizer = DualAdam(groups, betas=(0.9, 0.99), switch_rate=0.04, **BACKENDS[backend])
    grads = make_grads(STEPS)
    run(optimizer, params, grads)
    base = dict(beta1=0.9, beta2=0.99, eps=1e-8, alpha=linear_alpha(0.04))
    expected = reference_run(
        [([0, 1], dict(base, lr=1e-2, weight_decay=0.05)), ([2], dict(base, lr=3e-3, weight_decay=0.0))], grads
    )
    assert_matches_reference(params, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invadam_is_alpha_one(backend):
    params = make_params()
    optimizer = InvAdam(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, **BACKENDS[backend])
    grads = make_grads(STEPS)
    run(optimizer, params, grads)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=lambda t: 1.0)
    assert_matches_reference(params, reference_run([(range(len(SHAPES)), hyper)], grads))
    assert optimizer.latest_alpha() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_the_switch_it_is_adamw(backend):
    ours, theirs = make_params(), make_params()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, **BACKENDS[backend])
    dual = DualAdam(ours, switch_rate=1.0, **kwargs)
    adamw = torch.optim.AdamW(theirs, **kwargs)
    grads = make_grads(30)
    run(dual, ours, grads)
    run(adamw, theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    if backend == "single":  # the same arithmetic in the same order: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


class _TensorOpCounter(TorchDispatchMode):
    """Counts aten ops on whole tensors (scalar bookkeeping such as the step counter is ignored)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        if any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in flat):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_does_no_invadam_work(backend):
    def ops_of_one_step(optimizer, params):
        for p in params:
            p.grad = torch.ones_like(p)
        with _TensorOpCounter() as counter:
            optimizer.step()
        return counter.count

    switched = make_params()
    blending = make_params()
    adamw_params = make_params()
    after_switch = ops_of_one_step(DualAdam(switched, switch_rate=1.0, **BACKENDS[backend]), switched)
    blend = ops_of_one_step(DualAdam(blending, switch_rate=1e-3, **BACKENDS[backend]), blending)
    adamw = ops_of_one_step(torch.optim.AdamW(adamw_params, weight_decay=0.0, **BACKENDS[backend]), adamw_params)
    assert after_switch < blend
    assert after_switch <= adamw


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_weights_only_load_resume_is_bit_exact(backend):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, switch_rate=0.05, **BACKENDS[backend])
    grads = make_grads(STEPS)

    straight = make_params()
    optimizer = DualAdam(straight, **kwargs)
    run(optimizer, straight, grads)

    resumed, optimizer = run_with_a_resume(make_params(), kwargs, grads, stop=12)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    assert optimizer.latest_alpha() == 0.0


def run_with_a_resume(params, kwargs, grads, stop, *, map_location=None, between=lambda: None):
    """Run ``stop`` steps, save params and optimizer, call ``between``, reload them with weights_only=True
    (onto ``map_location``) into a new optimizer, check alpha continues, and run the remaining steps.
    Returns (params, optimizer)."""
    optimizer = DualAdam(params, **kwargs)
    run(optimizer, params, grads[:stop])
    between()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location=map_location)

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    optimizer = DualAdam(resumed, **kwargs)
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.latest_alpha() == pytest.approx(max(0.0, 1 - kwargs["switch_rate"] * stop))
    run(optimizer, resumed, grads[stop:])
    return resumed, optimizer


def test_state_layout_is_torch_adams():
    params = make_params()
    optimizer = DualAdam(params)
    assert len(optimizer.state) == 0, "state must be created lazily, at the first step"
    run(optimizer, params, make_grads(3))
    for p in params:
        state = optimizer.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].dim() == 0 and state["step"].item() == 3
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape


def test_parameters_resized_after_construction_get_state_of_their_final_shape():
    # ZeRO-3 and FSDP2 hand the optimizer placeholder tensors and give them shape later.
    p = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))
    optimizer = DualAdam([p], lr=1e-2)
    p.data = torch.randn(5, 4, dtype=torch.float64)
    p.grad = torch.randn(5, 4, dtype=torch.float64)
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].shape == (5, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepping_disjoint_subsets_gives_the_same_alpha_and_params(backend):
    """ZeRO-3 steps the base optimizer once per sub-group: a group-level counter would over-count."""
    grads = make_grads(10)
    together = make_params()
    optimizer = DualAdam(together, lr=1e-2, switch_rate=0.05, **BACKENDS[backend])
    run(optimizer, together, grads)

    split = make_params()
    optimizer = DualAdam(split, lr=1e-2, switch_rate=0.05, **BACKENDS[backend])
    for step_grads in grads:
        for subset in ([0], [1, 2]):
            for i, p in enumerate(split):
                p.grad = step_grads[i].clone() if i in subset else None
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(split, together))
    assert optimizer.latest_alpha() == pytest.approx(1 - 0.05 * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inv_scale", ["none", "adam_rms"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, None), (torch.float16, None)])
def test_low_precision_params_track_the_float64_reference(backend, dtype, rtol, inv_scale):
    """fp32 tracks the reference to 1e-5 relative. 16-bit parameters are updated in fp32 and rounded
    once per step, so they drift by rounding: we allow 1.5 units in the last place of the parameter
    dtype per step, relative to each tensor's largest magnitude."""
    params = make_params(dtype)
    optimizer = DualAdam(params, lr=1e-2, betas=(0.9, 0.99), switch_rate=0.05, weight_decay=0.01, inv_scale=inv_scale,
                         **BACKENDS[backend])
    grads = make_grads(STEPS)
    run(optimizer, params, grads)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, alpha=linear_alpha(0.05),
                 inv_scale=inv_scale)
    expected = reference_run([(range(len(SHAPES)), hyper)], [[g.to(dtype).double() for g in s] for s in grads])
    for i, p in enumerate(params):
        assert p.dtype == dtype and optimizer.state[p]["exp_avg"].dtype == dtype
        error = (p.double() - expected[i]).abs().max().item()
        scale = expected[i].abs().max().item()
        if rtol is not None:
            assert error <= rtol * scale
        else:
            assert error <= 1.5 * STEPS * torch.finfo(dtype).eps * scale
    # the drift bound must not be vacuous: 16-bit params moved well beyond it
    moved = max((p.double() - q).abs().max().item() for p, q in zip(params, make_params()))
    assert moved > 10 * torch.finfo(dtype).eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inv_scale", ["none", "adam_rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_is_never_written(backend, dtype, inv_scale):
    assert_grad_never_written(dtype, **BACKENDS[backend], inv_scale=inv_scale)


def assert_grad_never_written(dtype, **backend):
    """Five steps with maximize and weight decay: every .grad is bit for bit what it was."""
    params = make_params(dtype)
    optimizer = DualAdam(params, lr=1e-2, weight_decay=0.1, maximize=True, switch_rate=0.3, **backend)
    for step_grads in make_grads(5):
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype)
        before = [p.grad.clone() for p in params]
        optimizer.step()
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_grads", [False, True])
def test_lr_zero_changes_no_parameter(backend, zero_grads):
    # Frameworks take an lr = 0 step with zero gradients to create state before loading a checkpoint.
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = DualAdam(params, lr=0.0, eps=0.0, weight_decay=0.5, switch_rate=0.1, **BACKENDS[backend])
    for step_grads in make_grads(3):
        for p, g in zip(params, step_grads):
            p.grad = torch.zeros_like(g) if zero_grads else g
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_sparse_gradient_is_refused():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="DualAdam does not support sparse gradients"):
        DualAdam(embedding.parameters()).step()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-1e-3), "lr must be finite and >= 0"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
        (dict(eps=-1e-8), "eps must be finite and >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be finite and >= 0"),
        (dict(switch_rate=-1e-4), "switch_rate must be finite and >= 0"),
        (dict(switch_rate=float("inf")), "switch_rate must be finite and >= 0, got inf"),
        (dict(lr=float("nan")), "lr must be finite and >= 0, got nan"),
        (dict(eps=float("inf")), "eps must be finite and >= 0, got inf"),
        (dict(schedule="cosine"), "unknown schedule 'cosine'; valid: linear, exponential, step"),
        (dict(schedule="exponential"), "needs 0 < switch_base <= 1, got None"),
        (dict(schedule="exponential", switch_base=1.5), "needs 0 < switch_base <= 1, got 1.5"),
        (dict(schedule="exponential", switch_base=0.0), "needs 0 < switch_base <= 1, got 0.0"),
        (dict(schedule="step"), "needs a non-negative integer switch_step, got None"),
        (dict(schedule="step", switch_step=-1), "non-negative integer switch_step, got -1"),
        (dict(schedule="step", switch_step=2.5), "non-negative integer switch_step, got 2.5"),
        (dict(foreach=True, fused=True), "fused=True and foreach=True are exclusive"),
        (dict(inv_scale="rms"), "unknown inv_scale 'rms'; valid: none, adam_rms"),
        (dict(inv_scale="adam_rms", fused=True), "fused=True cannot rescale the InvAdam term"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DualAdam(make_params(), **kwargs)


def test_bad_param_group_is_refused_by_name():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        DualAdam([dict(params=params[:1]), dict(params=params[1:], lr=-1.0)])


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_callable_schedule_outside_unit_interval_is_refused(bad):
    params = make_params()
    optimizer = DualAdam(params, schedule=lambda t: bad)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"schedule callable returned alpha=.* at step 1; it must lie in \[0, 1\]"):
        optimizer.step()


def test_callable_schedule_state_dict_loads_weights_only():
    params = make_params()
    optimizer = DualAdam(params, schedule=lambda t: 0.5)
    run(optimizer, params, make_grads(2))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["param_groups"][0]["schedule"] == "callable"



def test_unscaling_stays_with_the_caller():
    # With _step_supports_amp_scaling the GradScaler would hand us scaled gradients and skip its
    # inf checks (pytorch PR 81705); InvAdam's term is not scale-invariant, so that must not happen.
    assert not getattr(DualAdam(make_params()), "_step_supports_amp_scaling", False)


def test_empty_param_groups_are_dropped():
    params = make_params()
    optimizer = DualAdam([dict(params=params, weight_decay=0.1), dict(params=iter([]), weight_decay=0.0)])
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.1
    run(optimizer, params, make_grads(2))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    again = DualAdam([dict(params=make_params(), weight_decay=0.1), dict(params=[], weight_decay=0.0)])
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(DualAdam([dict(params=[])]).param_groups) == 1  # nothing but empty groups: as torch does


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaled_invadam_term_has_the_adam_terms_norm_per_tensor(backend):
    """One InvAdam step (alpha = 1) with inv_scale="adam_rms": each tensor moves by lr * ||u|| in the
    direction of m_hat * sqrt(v_hat), whatever its gradient's scale (1e-4 here: LLM-like)."""
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = DualAdam(params, lr=1e-2, switch_rate=0.0, inv_scale="adam_rms", **BACKENDS[backend])
    grads = [g * 1e-4 for g in make_grads(1)[0]]
    run(optimizer, params, [grads])
    for p, old, g in zip(params, before, grads):
        moved = old - p.detach()
        adam_term = g / (g.abs() + 1e-8)  # step 1: m_hat = g, sqrt(v_hat) = |g|
        torch.testing.assert_close(moved.norm(), 1e-2 * adam_term.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(moved / moved.norm(), g * g.abs() / (g * g.abs()).norm(), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaling_a_tensor_with_zero_gradients_moves_it_by_weight_decay_only(backend):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = DualAdam([p], lr=0.1, weight_decay=0.5, switch_rate=0.3, inv_scale="adam_rms", **BACKENDS[backend])
    p.grad = torch.zeros(3, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(p.detach(), torch.full((3,), 1 - 0.1 * 0.5, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaled_run_resumes_bit_exact(backend):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), switch_rate=0.05, inv_scale="adam_rms", **BACKENDS[backend])
    grads = make_grads(STEPS)
    straight = make_params()
    run(DualAdam(straight, **kwargs), straight, grads)
    resumed, optimizer = run_with_a_resume(make_params(), kwargs, grads, stop=12)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    assert optimizer.param_groups[0]["inv_scale"] == "adam_rms"


@pytest.mark.parametrize("inv_scale", ["none", "adam_rms"])
def test_a_state_dict_saved_before_inv_scale_existed_keeps_the_optimizers_setting(inv_scale):
    params = make_params()
    optimizer = DualAdam(params, lr=1e-2, switch_rate=0.05)
    run(optimizer, params, make_grads(2))
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["inv_scale"]
    optimizer = DualAdam(params, lr=1e-2, switch_rate=0.05, inv_scale=inv_scale)
    optimizer.load_state_dict(saved)
    run(optimizer, params, make_grads(1))
    assert optimizer.param_groups[0]["inv_scale"] == inv_scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaled_term_with_a_large_eps_and_llm_sized_gradients_matches_the_reference(backend):
    # eps comparable to sqrt(v_hat) exercises how each backend folds eps into the Adam term
    params = make_params()
    optimizer = DualAdam(params, lr=1e-2, betas=(0.9, 0.99), eps=5e-5, switch_rate=0.05, inv_scale="adam_rms",
                         **BACKENDS[backend])
    grads = [[g * 1e-4 for g in step] for step in make_grads(STEPS)]
    run(optimizer, params, grads)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=5e-5, weight_decay=0.0, alpha=linear_alpha(0.05),
                 inv_scale="adam_rms")
    assert_matches_reference(params, reference_run([(range(len(SHAPES)), hyper)], grads))


def test_both_backends_rescale_tiny_fp32_gradients_alike():
    """fp32 norms of m_hat * sqrt(v_hat) ~ g**2 stay above underflow down to |g| ~ 1e-9; both backends
    take them on the same scale, so they agree with each other and with the float64 reference."""
    results = {}
    grads = [[(g * 1e-9).float() for g in step] for step in make_grads(5)]
    for backend in BACKENDS:
        params = make_params(torch.float32)
        run(DualAdam(params, lr=1e-2, switch_rate=0.0, inv_scale="adam_rms", **BACKENDS[backend]), params, grads)
        results[backend] = params
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, alpha=linear_alpha(0.0),
                 inv_scale="adam_rms")
    expected = reference_run([(range(len(SHAPES)), hyper)], [[g.double() for g in step] for step in grads])
    start = make_params(torch.float32)
    for i, (single, foreach) in enumerate(zip(results["single"], results["foreach"])):
        moved = (single.detach().double() - start[i].detach().double()).norm().item()
        expected_move = (expected[i] - start[i].detach().double()).norm().item()
        assert moved == pytest.approx(expected_move, rel=1e-3)
        torch.testing.assert_close(single, foreach, rtol=0, atol=1e-6)


def test_rescaling_refuses_dtensor_shards():
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    with one_process_group():
        mesh = DeviceMesh("cpu", [0])
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)])
        with pytest.raises(RuntimeError, match="inv_scale='adam_rms' rescales per whole tensor, and this parameter is "
                                               "a DTensor"):
            DualAdam([p], inv_scale="adam_rms").step()
        DualAdam([p]).step()  # the paper's DualAdam steps DTensors
