"""dualadam_inv_share against a hand computation from the parameters' actual updates."""

from __future__ import annotations

import math

import pytest
import torch

from dualadam_hf import DualAdam
from dualadam_hf.optim.diagnostics import inv_share, inv_share_sums


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inv_scale", ["none", "adam_rms"])
def test_inv_share_equals_a_hand_computation(inv_scale, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)
    lr, switch_rate, eps = 1e-2, 0.2, 1e-8
    optimizer = DualAdam(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=eps, switch_rate=switch_rate,
                         inv_scale=inv_scale)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    t = 3
    alpha = 1 - switch_rate * t
    inv_sq = bar_sq = 0.0
    for p, old in zip(model.parameters(), before):
        state = optimizer.state[p]
        m_hat = state["exp_avg"].double() / (1 - 0.9**t)
        v_hat = state["exp_avg_sq"].double() / (1 - 0.99**t)
        u_tilde = m_hat * v_hat.sqrt()
        if inv_scale == "adam_rms":  # the InvAdam term at the norm of the Adam term
            u_tilde *= (m_hat / (v_hat.sqrt() + eps)).norm() / u_tilde.norm()
        inv_sq += (alpha * u_tilde).square().sum().item()
        u_bar = (old - p.detach()).double() / lr  # the update the step actually applied (no weight decay)
        bar_sq += u_bar.square().sum().item()
    expected = math.sqrt(inv_sq / bar_sq)
    state_before = {name: [s[name].clone() for s in optimizer.state.values()] for name in ("exp_avg", "exp_avg_sq")}

    tolerance = 1e-4 if dtype == torch.float32 else 1e-6
    assert inv_share(*inv_share_sums(optimizer)) == pytest.approx(expected, rel=tolerance)
    assert 0.0 < expected < 1.0
    for name, tensors in state_before.items():  # measuring leaves the optimizer's state alone
        for saved, s in zip(tensors, optimizer.state.values()):
            assert torch.equal(saved, s[name]), name


def test_inv_share_is_zero_after_the_switch_and_one_for_invadam():
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    for switch_rate, share in ((1.0, 0.0), (0.0, 1.0)):
        optimizer = DualAdam([p], switch_rate=switch_rate)
        p.grad = torch.randn(5, dtype=torch.float64)
        optimizer.step()
        assert inv_share(*inv_share_sums(optimizer)) == pytest.approx(share)
    assert inv_share(0.0, 0.0) is None


def test_plain_state_is_read_in_place_not_copied():
    # dequantize() would copy a bf16 state tensor whole, in fp32, past the chunk bound
    from dualadam_hf.optim.diagnostics import _local

    state = torch.zeros(8, 8, dtype=torch.bfloat16)
    assert _local(state) is state


def test_the_host_reads_twice_whatever_the_parameters_and_chunks(monkeypatch):
    # on a GPU each read waits for the device: at a 1B model's 341 tensors a read per parameter and chunk
    # made some thousand waits at every logging step
    from host_reads import HostReads

    from dualadam_hf.optim import diagnostics

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size)) for size in (1, 7, 64, 300, 1000) * 4]
    optimizer = DualAdam(params, switch_rate=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    whole = inv_share_sums(optimizer)
    monkeypatch.setattr(diagnostics, "CHUNK", 16)  # the 1000-element tensors in 63 chunks each
    with HostReads() as reads:
        chunked = inv_share_sums(optimizer)
    assert reads.count == 2  # the step counters, then every parameter's three sums
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert 0 < chunked[0] < chunked[1]

