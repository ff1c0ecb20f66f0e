"""dualadam_inv_share against a hand computation from the parameters' actual updates."""

from __future__ import annotations

import math

import pytest
import torch

from dualadam_hf import DualAdam
from dualadam_hf.diagnostics import inv_share, inv_share_sums


def test_inv_share_equals_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    lr, switch_rate = 1e-2, 0.2
    optimizer = DualAdam(model.parameters(), lr=lr, betas=(0.9, 0.99), switch_rate=switch_rate)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
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
        m_hat = state["exp_avg"] / (1 - 0.9**t)
        v_hat = state["exp_avg_sq"] / (1 - 0.99**t)
        inv_sq += (alpha * m_hat * v_hat.sqrt()).square().sum().item()
        u_bar = (old - p.detach()) / lr  # the update the step actually applied (no weight decay)
        bar_sq += u_bar.square().sum().item()
    expected = math.sqrt(inv_sq / bar_sq)
    assert inv_share(*inv_share_sums(optimizer)) == pytest.approx(expected, rel=1e-6)  # fp32 arithmetic
    assert 0.0 < expected < 1.0


def test_inv_share_is_zero_after_the_switch_and_one_for_invadam():
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    for switch_rate, share in ((1.0, 0.0), (0.0, 1.0)):
        optimizer = DualAdam([p], switch_rate=switch_rate)
        p.grad = torch.randn(5, dtype=torch.float64)
        optimizer.step()
        assert inv_share(*inv_share_sums(optimizer)) == pytest.approx(share)
    assert inv_share(0.0, 0.0) is None
