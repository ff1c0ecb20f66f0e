"""Top Hessian eigenvalue and Hutchinson trace against Hessians known in closed form."""

from __future__ import annotations

import pytest
import torch

from dualadam_hf.analysis.flatness import hessian_trace, loss_over_batches, top_hessian_eigenvalue

EIGENVALUES = torch.tensor([10.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)


def quadratic(matrix: torch.Tensor):
    """0.5 x^T A x with x split over two parameters, so the functions must walk a list."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_()
    second = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()

    def loss_fn():
        x = torch.cat([first, second])
        return 0.5 * x @ matrix @ x

    return loss_fn, [first, second]


def random_spd() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    return rotation @ torch.diag(EIGENVALUES) @ rotation.T


@pytest.mark.parametrize("matrix", [torch.diag(EIGENVALUES), random_spd()], ids=["diagonal", "rotated"])
def test_top_eigenvalue_of_a_quadratic(matrix):
    loss_fn, params = quadratic(matrix)
    assert top_hessian_eigenvalue(loss_fn, params) == pytest.approx(10.0, rel=1e-4)


def test_top_eigenvalue_is_the_largest_in_magnitude():
    loss_fn, params = quadratic(torch.diag(torch.tensor([-10.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)))
    assert top_hessian_eigenvalue(loss_fn, params) == pytest.approx(-10.0, rel=1e-4)


def test_trace_of_a_rotated_quadratic_within_a_few_standard_errors():
    loss_fn, params = quadratic(random_spd())
    mean, stderr = hessian_trace(loss_fn, params, samples=200)
    assert 0 < stderr < 1.0
    assert abs(mean - EIGENVALUES.sum().item()) < 3 * stderr


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    loss_fn, params = quadratic(torch.diag(EIGENVALUES))
    mean, stderr = hessian_trace(loss_fn, params, samples=5)
    assert mean == pytest.approx(EIGENVALUES.sum().item(), rel=1e-12)
    assert stderr == pytest.approx(0.0, abs=1e-12)


def test_deterministic_for_a_seed():
    loss_fn, params = quadratic(random_spd())
    assert hessian_trace(loss_fn, params, seed=3) == hessian_trace(loss_fn, params, seed=3)
    assert hessian_trace(loss_fn, params, seed=3) != hessian_trace(loss_fn, params, seed=4)
    assert top_hessian_eigenvalue(loss_fn, params, iters=3, seed=3) == top_hessian_eigenvalue(
        loss_fn, params, iters=3, seed=3
    )


class LeastSquares(torch.nn.Module):
    """An HF-style model: returns an object with ``.loss``, or a dict when ``as_dict``."""

    def __init__(self, features: int, as_dict: bool):
        super().__init__()
        self.linear = torch.nn.Linear(features, 1, dtype=torch.float64)
        self.unused = torch.nn.Linear(3, 3, dtype=torch.float64)  # like a pooler the loss ignores
        self.as_dict = as_dict

    def forward(self, inputs, labels):
        loss = ((self.linear(inputs).squeeze(-1) - labels) ** 2).mean()
        return {"loss": loss} if self.as_dict else type("Output", (), {"loss": loss})()


@pytest.mark.parametrize("as_dict", [False, True])
def test_linear_least_squares_matches_closed_form(as_dict):
    gen = torch.Generator().manual_seed(2)
    features, per_batch = 4, 8
    scales = torch.tensor([3.0, 1.5, 1.0, 0.3], dtype=torch.float64)  # separates the top eigenvalue
    inputs = torch.randn(3 * per_batch, features, generator=gen, dtype=torch.float64) * scales
    labels = torch.randn(3 * per_batch, generator=gen, dtype=torch.float64)
    batches = [
        {"inputs": inputs[i : i + per_batch], "labels": labels[i : i + per_batch]}
        for i in range(0, len(inputs), per_batch)
    ]
    model = LeastSquares(features, as_dict)

    # Equal batch sizes: the mean over batches is the mean over all rows, whose Hessian in
    # (weight, bias) is 2 X~^T X~ / n with X~ = [X, 1].
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    hessian = 2 * design.T @ design / len(inputs)
    eigenvalues = torch.linalg.eigvalsh(hessian)

    loss_fn = lambda: loss_over_batches(model, batches)  # noqa: E731
    params = list(model.parameters())
    top = top_hessian_eigenvalue(loss_fn, params, iters=200, tol=1e-10)
    assert top == pytest.approx(eigenvalues[-1].item(), rel=1e-4)
    mean, stderr = hessian_trace(loss_fn, params, samples=200)
    assert abs(mean - hessian.trace().item()) < 3 * stderr


def test_loss_over_batches_is_the_mean_of_batch_losses():
    model = LeastSquares(2, as_dict=True)
    batches = [
        {"inputs": torch.full((1, 2), float(k), dtype=torch.float64), "labels": torch.zeros(1, dtype=torch.float64)}
        for k in range(3)
    ]
    expected = torch.stack([model(**batch)["loss"] for batch in batches]).mean()
    torch.testing.assert_close(loss_over_batches(model, batches), expected)


def test_refuses_params_without_grad():
    loss_fn, params = quadratic(torch.diag(EIGENVALUES))
    with pytest.raises(ValueError, match="require grad"):
        top_hessian_eigenvalue(loss_fn, [params[0].detach()])
    with pytest.raises(ValueError, match="samples"):
        hessian_trace(loss_fn, params, samples=1)
