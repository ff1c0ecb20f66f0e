"""Hessian flatness measures of a solution, as in the paper's Fig. 5 (arXiv 2603.07122, section IV-F).

The paper uses PyHessian (Yao et al., 2020): the top Hessian eigenvalue by power iteration and the
Hessian trace by Hutchinson's estimator, both from Hessian-vector products, so the Hessian itself
is never formed. ``loss_fn`` is called once per measurement and must compute its loss over a fixed
set of batches: the Hessian being measured is that loss's. The graph of that one call is kept for
all the products, so its batches must fit in memory together.

Train/eval mode is the caller's business: with dropout active ``loss_fn`` is still called only once,
but the Hessian is then that of one dropout mask. Call ``model.eval()`` first to measure the model
as it predicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["hessian_trace", "loss_over_batches", "top_hessian_eigenvalue"]


def loss_over_batches(model: torch.nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Mean of ``model(**batch).loss`` over ``batches`` (HF outputs, or dicts with a ``"loss"`` key)."""
    losses = []
    for batch in batches:
        output = model(**batch)
        losses.append(output["loss"] if isinstance(output, Mapping) else output.loss)
    return torch.stack(losses).mean()


def _checked(params: Iterable[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("params must be a non-empty list of tensors that require grad")
    return params


def _gradients(loss_fn: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, ...]:
    # create_graph keeps the gradient differentiable, so each Hessian-vector product is one more
    # backward pass through it instead of a second forward pass. Parameters the loss does not use
    # (an HF model's pooler, say) get zero gradients rather than an error.
    return torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True, materialize_grads=True)


def _hessian_vector_product(gradients: tuple[Tensor, ...], params: list[Tensor], vector: list[Tensor]) -> list[Tensor]:
    # A gradient without a graph (the loss is linear or constant in that parameter) has a zero
    # Hessian row; autograd refuses to differentiate it, so it is left out of the product.
    pairs = [(g, v) for g, v in zip(gradients, vector) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    outputs, grad_outputs = zip(*pairs)
    return list(
        torch.autograd.grad(
            outputs, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True, materialize_grads=True
        )
    )


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b)).item()


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor], params: Iterable[Tensor], iters: int = 20, tol: float = 1e-4, seed: int = 0
) -> float:
    """Eigenvalue of largest magnitude of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Power iteration from a seeded Gaussian vector; stops after ``iters`` products or once the
    Rayleigh quotient changes by less than ``tol`` relative to its size. Near a minimum this is the
    top (sharpest) eigenvalue; where the Hessian has a larger negative eigenvalue, that one is returned.
    """
    params = _checked(params)
    gradients = _gradients(loss_fn, params)
    # Drawn on the CPU, so a seed gives the same start vector on every device.
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in params]
    eigenvalue = None
    for _ in range(iters):
        norm = math.sqrt(_dot(vector, vector))
        if norm == 0.0:  # H v = 0 for a random v: the Hessian is zero
            return 0.0
        vector = [v / norm for v in vector]
        product = _hessian_vector_product(gradients, params, vector)
        previous, eigenvalue = eigenvalue, _dot(vector, product)
        vector = product
        if previous is not None and abs(eigenvalue - previous) <= tol * abs(previous):
            break
    return eigenvalue


def hessian_trace(
    loss_fn: Callable[[], Tensor], params: Iterable[Tensor], samples: int = 50, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson's estimate of the trace of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Averages z^T H z over ``samples`` seeded Rademacher vectors z and returns (mean, standard
    error of the mean). Each term is exact when H is diagonal, since z_i^2 = 1.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to give a standard error, got {samples}")
    params = _checked(params)
    gradients = _gradients(loss_fn, params)
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(samples):
        vector = [(2 * torch.randint(0, 2, p.shape, generator=generator) - 1).to(p) for p in params]
        estimates.append(_dot(vector, _hessian_vector_product(gradients, params, vector)))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    return estimates.mean().item(), (estimates.std() / math.sqrt(samples)).item()
