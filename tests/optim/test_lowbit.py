"""DualAdam8bit / DualAdam4bit / DualAdamFp8 against the float64 reference twin on the same quantized
moments, their state's size, save and reload, and their refusals."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch
from reference import ReferenceParam, linear_alpha

from dualadam_hf import DualAdam, DualAdam4bit, DualAdam8bit, DualAdamFp8, InvAdam8bit
from dualadam_hf.optim import lowbit
from dualadam_hf.optim.diagnostics import inv_share_sums
from dualadam_hf.optim.lowbit import QUANTIZE_MIN_NUMEL, is_quantized, state_bytes

FORMATS = {"8bit": DualAdam8bit, "4bit": DualAdam4bit, "fp8": DualAdamFp8}
# one tensor above the quantization threshold, one below it
SHAPES = [(64, 64), (7,)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def make_grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) * scale for shape, scale in zip(SHAPES, (0.5, 2.0))] for _ in range(steps)]


def moments(optimizer, p):
    """This parameter's moments as the next step reads them: dequantized, in float64."""
    state = optimizer.state[p]
    return [state[key].dequantize().double().flatten().tolist() for key in ("exp_avg", "exp_avg_sq")]


def reference_step(optimizer, p, grad, alpha, weight_decay=0.0, maximize=False, inv_scale="none"):
    """The twin's step from the optimizer's own (quantized) moments and step count: (theta, m, v)."""
    reference = ReferenceParam(
        theta=p.detach().double().flatten().tolist(), beta1=0.9, beta2=0.99, lr=HYPER["lr"], eps=HYPER["eps"],
        weight_decay=weight_decay, alpha=alpha, maximize=maximize, inv_scale=inv_scale,
    )
    state = optimizer.state.get(p)
    if state:
        reference.m, reference.v = moments(optimizer, p)
        reference.t = int(state["step"])
    reference.step(grad.double().flatten().tolist())
    return [torch.tensor(values, dtype=torch.float64).view(p.shape) for values in (reference.theta, reference.m, reference.v)]


def requantized(optimizer, p, key, values):
    """``values`` written into a fresh state tensor of the optimizer's layout for ``p``, read back."""
    fresh = optimizer._new_moment(p.detach(), signed=key == "exp_avg")
    fresh.copy_(values.float())
    return fresh.dequantize()


def run_against_reference(optimizer, params, grads, alpha, **reference_kwargs):
    for step_grads in grads:
        expected = [reference_step(optimizer, p, g, alpha, **reference_kwargs) for p, g in zip(params, step_grads)]
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        optimizer.step()
        for p, (theta, m, v) in zip(params, expected):
            torch.testing.assert_close(p.detach().double(), theta, rtol=1e-6, atol=1e-6)
            # the moments are stored as the twin's fp32 moments quantized: the same codes, with block
            # scales equal up to float32 rounding; a value that close to a code boundary may take the
            # neighbouring code
            for key, reference_moment in (("exp_avg", m), ("exp_avg_sq", v)):
                stored = optimizer.state[p][key].dequantize()
                same = torch.isclose(stored, requantized(optimizer, p, key, reference_moment), rtol=1e-5, atol=0.0)
                assert same.double().mean() >= 0.999, key


ALPHAS = {
    "alpha_one": lambda t: 1.0,
    "alpha_half": lambda t: 0.5,
    "alpha_zero": lambda t: 0.0,
}


@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_update_matches_the_reference_on_the_same_quantized_moments(state_format, alpha):
    params = make_params()
    optimizer = FORMATS[state_format](params, **HYPER, schedule=ALPHAS[alpha], compiled=False)
    run_against_reference(optimizer, params, make_grads(6), ALPHAS[alpha])
    assert is_quantized(optimizer.state[params[0]]["exp_avg"]) and not is_quantized(optimizer.state[params[1]]["exp_avg"])


CASES = {
    "linear": (dict(switch_rate=0.1), {}),
    "weight_decay_maximize": (dict(switch_rate=0.1, weight_decay=0.1, maximize=True), dict(weight_decay=0.1, maximize=True)),
    "inv_scale": (dict(switch_rate=0.1, inv_scale="adam_rms"), dict(inv_scale="adam_rms")),
}


@pytest.mark.parametrize("case", CASES)
def test_a_linear_schedule_through_the_switch_matches_the_reference(case):
    kwargs, reference_kwargs = CASES[case]
    params = make_params()
    optimizer = DualAdam8bit(params, **HYPER, **kwargs, compiled=False)
    run_against_reference(optimizer, params, make_grads(12), linear_alpha(0.1), **reference_kwargs)  # alpha 0 at 10


def test_alpha_and_bias_corrections_are_dualadams_exactly(monkeypatch):
    received = []
    backend = lowbit.lowbit_backend
    monkeypatch.setattr(lowbit, "lowbit_backend", lambda *args, **kwargs: (received.append(args[4]), backend(*args, **kwargs)))
    params = make_params()
    optimizer = DualAdam4bit(params, **HYPER, switch_rate=1 / 30, compiled=False)
    for step_grads in make_grads(5):
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()
        t = int(optimizer.state[params[0]]["step"])
        assert optimizer.latest_alpha() == linear_alpha(1 / 30)(t)
    assert len(received) == 5  # one bucket per step: both tensors have one type, dtype and step
    for t, scalars in enumerate(received, start=1):
        assert scalars.alpha == max(0.0, 1.0 - t / 30)
        assert scalars.bias_correction1 == 1.0 - 0.9**t
        assert scalars.bias_correction2_sqrt == (1.0 - 0.99**t) ** 0.5
        numbers = lowbit._step_numbers(scalars, torch.device("cpu"))
        expected = [1.0, HYPER["lr"] / (1.0 - 0.9**t), (1.0 - 0.99**t) ** 0.5, HYPER["eps"], max(0.0, 1.0 - t / 30)]
        assert numbers.tolist() == torch.tensor(expected, dtype=torch.float32).tolist()


@pytest.mark.parametrize(
    "state_format,inv_scale", [("8bit", "none"), ("4bit", "none"), ("fp8", "none"), ("8bit", "adam_rms")]
)
def test_the_compiled_step_is_the_eager_step(state_format, inv_scale):
    runs = []
    for compiled in (False, True):
        params = make_params()
        optimizer = FORMATS[state_format](params, **HYPER, switch_rate=0.25, inv_scale=inv_scale,
                                          compiled=compiled)  # blend, then Adam
        for step_grads in make_grads(6):
            for p, g in zip(params, step_grads):
                p.grad = g
            optimizer.step()
        runs.append((params, optimizer))
    (eager, eager_optimizer), (compiled, compiled_optimizer) = runs
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            stored, expected = compiled_optimizer.state[q][key].dequantize(), eager_optimizer.state[p][key].dequantize()
            assert torch.isclose(stored, expected, rtol=1e-5, atol=0.0).double().mean() >= 0.999


def transformer_shaped_params(dtype=torch.float32):
    """One decoder layer's worth: attention and MLP matrices, biases and norms (small, so stay plain)."""
    shapes = [(256, 256)] * 4 + [(688, 256), (688, 256), (256, 688), (256,), (256,), (256,)]
    return [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]


@pytest.mark.parametrize("state_format,limit", [("8bit", 2.1), ("4bit", 1.1), ("fp8", 2.1)])
def test_state_bytes_per_parameter(state_format, limit):
    params = transformer_shaped_params()
    optimizer = FORMATS[state_format](params, compiled=False)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    large = [p for p in params if p.numel() >= QUANTIZE_MIN_NUMEL]
    small = [p for p in params if p.numel() < QUANTIZE_MIN_NUMEL]
    large_bytes = sum(state_bytes(optimizer.state[p][key]) for p in large for key in ("exp_avg", "exp_avg_sq"))
    assert large_bytes / sum(p.numel() for p in large) <= limit
    for p in small:
        for key in ("exp_avg", "exp_avg_sq"):
            stored = optimizer.state[p][key]
            assert not is_quantized(stored) and stored.dtype == torch.float32


def test_a_tensor_the_block_size_does_not_divide_keeps_plain_state():
    p = torch.nn.Parameter(torch.randn(4097))
    optimizer = DualAdam8bit([p])
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert not is_quantized(optimizer.state[p]["exp_avg"])


@pytest.mark.parametrize("state_format", FORMATS)
def test_save_reload_weights_only_and_continue_is_bit_exact(state_format):
    grads = make_grads(8)

    def steps(optimizer, params, chunk):
        for step_grads in chunk:
            for p, g in zip(params, step_grads):
                p.grad = g
            optimizer.step()

    params = make_params()
    optimizer = FORMATS[state_format](params, **HYPER, switch_rate=0.1, compiled=False)
    steps(optimizer, params, grads)

    params_b = make_params()
    first = FORMATS[state_format](params_b, **HYPER, switch_rate=0.1, compiled=False)
    steps(first, params_b, grads[:4])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = FORMATS[state_format](params_b, **HYPER, switch_rate=0.1, compiled=False)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert is_quantized(resumed.state[params_b[0]]["exp_avg"])
    assert resumed.latest_alpha() == pytest.approx(1.0 - 0.1 * 4)
    steps(resumed, params_b, grads[4:])
    for p, q in zip(params, params_b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("compiled", [False, True])
def test_lr_zero_changes_no_parameter(compiled):
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = DualAdam8bit(params, lr=0.0, compiled=compiled)
    for p, g in zip(params, make_grads(1)[0]):
        p.grad = g
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # the step frameworks take to create state before loading a checkpoint: zero gradients, lr 0; with
    # eps = 0 the update is 0 / 0, which must not reach the parameters
    zero_eps = DualAdam8bit(params, lr=0.0, eps=0.0, compiled=compiled)
    for p in params:
        p.grad = torch.zeros_like(p)
    zero_eps.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_failed_compile_warns_once_and_steps_eagerly(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    from dualadam_hf.optim import fused

    def failing_compile():
        def step(*args):
            raise BackendCompilerFailed(lambda: None, RuntimeError("no compiler today"), None)

        return step

    monkeypatch.setattr(lowbit, "_compiled_step", failing_compile)
    monkeypatch.setattr(fused, "_compile_failures", {})

    def train(compiled):
        params = make_params()
        optimizer = DualAdam8bit(params, **HYPER, switch_rate=0.25, compiled=compiled)
        for step_grads in make_grads(3):
            for p, g in zip(params, step_grads):
                p.grad = g
            optimizer.step()
        return params

    with pytest.warns(RuntimeWarning, match="torch.compile failed on cpu, stepping eagerly instead") as caught:
        fallen_back = train(compiled=None)
    assert len(caught) == 1
    assert not fused.compiler_usable("cpu")  # later steps, and other optimizers, do not try again
    for p, q in zip(fallen_back, train(compiled=False)):
        assert torch.equal(p, q)


def test_inv_share_reads_the_dequantized_moments():
    params = make_params()
    quantized = DualAdam8bit(params, **HYPER, switch_rate=0.1, compiled=False)
    for step_grads in make_grads(3):
        for p, g in zip(params, step_grads):
            p.grad = g
        quantized.step()
    plain = DualAdam(params, **HYPER, switch_rate=0.1)
    for p in params:
        state = quantized.state[p]
        plain.state[p] = dict(step=state["step"].clone(), exp_avg=state["exp_avg"].dequantize(),
                              exp_avg_sq=state["exp_avg_sq"].dequantize())
    assert inv_share_sums(quantized) == pytest.approx(inv_share_sums(plain), rel=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_stochastic_rounding_keeps_updates_below_bf16s_resolution(compiled):
    """lr * |update| = 1e-4 at 1.0, where bf16's spacing is 2**-8: rounding to nearest loses every step,
    stochastic rounding keeps it on average."""
    lost, kept = (torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16)) for _ in range(2))
    for p, stochastic in ((lost, False), (kept, True)):
        optimizer = DualAdam8bit([p], lr=1e-4, schedule="step", switch_step=0, bf16_stochastic_round=stochastic,
                                 compiled=compiled)  # alpha = 0: the Adam term, m_hat / sqrt(v_hat) = 1 here
        torch.manual_seed(0)
        for _ in range(10):
            p.grad = torch.ones_like(p)
            optimizer.step()
    assert torch.equal(lost, torch.ones_like(lost))
    assert kept.float().mean().item() == pytest.approx(1.0 - 10 * 1e-4, abs=1e-4)


def test_invadam_twin_is_alpha_one():
    params = make_params()
    optimizer = InvAdam8bit(params, **HYPER, compiled=False)
    run_against_reference(optimizer, params, make_grads(3), ALPHAS["alpha_one"])
    assert optimizer.latest_alpha() == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(fused=True), "DualAdam4bit: fused=True is not available"),
        (dict(block_size=0), "DualAdam4bit: block_size must be a positive integer, got 0"),
        (dict(block_size=127), "DualAdam4bit: block_size must be even for 4-bit state"),
        (dict(betas=(0.9, 1.0)), "DualAdam4bit: betas[1] must be in [0, 1)"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DualAdam4bit(make_params(), **kwargs)


def test_without_torchao_the_package_imports_and_the_optimizer_says_what_to_install():
    probe = (
        "import sys; sys.modules['torchao'] = None\n"  # what an environment without torchao looks like
        "import torch, dualadam_hf\n"
        "try:\n"
        "    dualadam_hf.DualAdam8bit([torch.nn.Parameter(torch.zeros(3))])\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        "DualAdam8bit: torchao is not installed, and the low-bit optimizers keep their state in its quantized "
        "tensors: pip install 'dualadam_hf[lowbit]' (torchao>=0.18,<0.19)"
    )
