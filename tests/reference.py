"""The reference twin: Algorithm 1 of arXiv 2603.07122, element by element, in Python floats (float64).

Deliberately naive: no tensors, no fusion, one formula per line, so that it can be checked against
the paper by eye. Decoupled weight decay as in AdamW: theta <- theta * (1 - lr * wd) - lr * u_bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


def linear_alpha(switch_rate: float) -> Callable[[int], float]:
    return lambda t: max(0.0, 1.0 - switch_rate * t)


def exponential_alpha(switch_base: float) -> Callable[[int], float]:
    return lambda t: switch_base**t


def step_alpha(switch_step: int) -> Callable[[int], float]:
    return lambda t: 1.0 if t <= switch_step else 0.0


@dataclass
class ReferenceParam:
    theta: list[float]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    alpha: Callable[[int], float]
    maximize: bool = False
    inv_scale: str = "none"  # "adam_rms": u_tilde rescaled to the norm of u over this parameter
    m: list[float] = field(default_factory=list)
    v: list[float] = field(default_factory=list)
    t: int = 0

    def __post_init__(self) -> None:
        self.m = [0.0] * len(self.theta)
        self.v = [0.0] * len(self.theta)

    def step(self, grad: list[float]) -> None:
        self.t += 1
        t = self.t
        alpha = self.alpha(t)
        u, u_tilde = [], []
        for i in range(len(self.theta)):
            g = -grad[i] if self.maximize else grad[i]
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * g
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * g * g
            m_hat = self.m[i] / (1.0 - self.beta1**t)
            v_hat = self.v[i] / (1.0 - self.beta2**t)
            u.append(m_hat / (math.sqrt(v_hat) + self.eps))
            u_tilde.append(m_hat * math.sqrt(v_hat))
        scale = 1.0
        if self.inv_scale == "adam_rms":
            norm_u = math.sqrt(sum(x * x for x in u))
            norm_u_tilde = math.sqrt(sum(x * x for x in u_tilde))
            scale = norm_u / norm_u_tilde if norm_u_tilde > 0 else 0.0
        for i in range(len(self.theta)):
            u_bar = alpha * scale * u_tilde[i] + (1.0 - alpha) * u[i]
            self.theta[i] = self.theta[i] * (1.0 - self.lr * self.weight_decay) - self.lr * u_bar
