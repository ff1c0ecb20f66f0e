"""Optimizer-step benchmark: DualAdam's backends against torch's AdamW on a transformer-shaped model.

Two sets of tensor shapes (``SHAPES``): ``gpt``, a GPT-like model of a chosen size (an embedding, then
per layer a norm vector, the attention q/k/v/o matrices, a norm vector and the MLP up/down matrices,
then a final norm), and ``openpangu-1b``, openPangu-Embedded-1B's own 341 tensors (1.39B parameters).
Every optimizer gets its own copy of the same parameters; all of them read one set of fixed gradients
(no optimizer here writes ``.grad``), so a large model fits on one GPU several times over. The timing
is interleaved in one process: each round steps every optimizer in turn (the order rotates between
rounds), and the figure kept is the median over rounds, so that a noisy, shared machine slows all of
them alike. The first step of each optimizer is timed apart: it creates the state and, for the fused
backend, compiles.

Effective bandwidth is AdamW-equivalent: it counts what an AdamW step must move at least (read p, g,
m, v and write p, m, v: 7 element sizes of the parameter dtype per parameter, 28 bytes in float32)
for every optimizer, also for those whose state is 8- or 4-bit and which move fewer bytes. It compares
speeds on one scale; it is not the bytes a low-bit optimizer moves.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dualadam_hf.models.openpangu_fixture import weight_shapes
from dualadam_hf.optim.dualadam import DualAdam, InvAdam
from dualadam_hf.optim.lowbit import DualAdam4bit, DualAdam8bit

__all__ = [
    "Candidate", "SHAPES", "OPENPANGU_1B", "candidates", "device_name", "format_table", "model_shapes", "run_benchmark",
    "transformer_shapes",
]

ACCESSES_PER_PARAM = 7  # AdamW's: read p, g, m, v; write p, m, v
LR = 1e-3
WEIGHT_DECAY = 0.01  # torch AdamW's default, given to every optimizer (decoupled everywhere)
BLENDING_SWITCH_RATE = 1e-7  # alpha stays strictly between 0 and 1 for the whole benchmark
SWITCHED_RATE = 1.0  # alpha = max(0, 1 - t) = 0 from the first step on

SHAPES = ("gpt", "openpangu-1b")
OPENPANGU_1B = dict(
    vocab_size=153_376, hidden_size=1536, intermediate_size=6144, num_hidden_layers=26, num_attention_heads=12,
    num_key_value_heads=6,
)
"""openPangu-Embedded-1B's published config.json sizes (head dim 1536 / 12 = 128)."""


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]


HYPER = dict(lr=LR, weight_decay=WEIGHT_DECAY)


def _kozistr_dualadam(params: list[Tensor]) -> torch.optim.Optimizer:
    import pytorch_optimizer

    return pytorch_optimizer.DualAdam(
        params, **HYPER, weight_decouple=True, switch_rate=BLENDING_SWITCH_RATE, foreach=True
    )


def _torchao_adamw(bits: int) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        from torchao.optim import AdamW4bit, AdamW8bit

        return (AdamW8bit if bits == 8 else AdamW4bit)(params, **HYPER)

    return make


def candidates() -> list[Candidate]:
    """The optimizers compared; kozistr's DualAdam (pytorch_optimizer) only when it is installed, the
    low-bit ones and torchao's AdamW8bit/AdamW4bit, their baselines, only when torchao is."""
    blending = dict(HYPER, switch_rate=BLENDING_SWITCH_RATE)
    switched = dict(HYPER, switch_rate=SWITCHED_RATE)
    found = [
        Candidate("AdamW fused", lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)),
        Candidate("AdamW foreach", lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)),
        Candidate("DualAdam fused, blending", lambda ps: DualAdam(ps, **blending, fused=True)),
        Candidate("DualAdam fused, after switch", lambda ps: DualAdam(ps, **switched, fused=True)),
        Candidate("DualAdam default, blending", lambda ps: DualAdam(ps, **blending)),
        Candidate("DualAdam foreach, blending", lambda ps: DualAdam(ps, **blending, foreach=True)),
        Candidate("DualAdam foreach, after switch", lambda ps: DualAdam(ps, **switched, foreach=True)),
        Candidate("DualAdam foreach, blending, inv_scale=adam_rms",
                  lambda ps: DualAdam(ps, **blending, foreach=True, inv_scale="adam_rms")),
        Candidate("InvAdam fused", lambda ps: InvAdam(ps, **HYPER, fused=True)),
    ]
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        found.append(Candidate("kozistr DualAdam foreach, blending", _kozistr_dualadam))
    if importlib.util.find_spec("torchao") is not None:
        found += [
            Candidate("torchao AdamW8bit", _torchao_adamw(8)),
            Candidate("DualAdam8bit, blending", lambda ps: DualAdam8bit(ps, **blending)),
            Candidate("DualAdam8bit, after switch", lambda ps: DualAdam8bit(ps, **switched)),
            Candidate("torchao AdamW4bit", _torchao_adamw(4)),
            Candidate("DualAdam4bit, blending", lambda ps: DualAdam4bit(ps, **blending)),
            Candidate("DualAdam4bit, after switch", lambda ps: DualAdam4bit(ps, **switched)),
        ]
    return found


def transformer_shapes(num_params: int, vocab_size: int = 32_000) -> list[tuple[int, ...]]:
    """Shapes of a GPT-like model of about ``num_params`` parameters.

    Width d follows the usual aspect ratio (layers ~ d / 64, so num_params ~ 12 d^3 / 64), rounded
    to a multiple of 16 and small enough for a layer (12 d^2) to fill at most half the model; the
    vocabulary shrinks for tiny sizes so the embedding stays under half.
    """
    width = round((64 * num_params / 12) ** (1 / 3) / 16) * 16
    width = max(16, min(width, int((num_params / 24) ** 0.5) // 16 * 16))
    vocab = max(16, min(vocab_size, num_params // (2 * width)))
    per_layer = 12 * width * width + 2 * width
    layers = max(1, round((num_params - vocab * width - width) / per_layer))
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width,), (width, width), (width, width), (width, width), (width, width)]
        shapes += [(width,), (4 * width, width), (width, 4 * width)]
    shapes.append((width,))
    return shapes


def model_shapes(shape: str, num_params: int) -> list[tuple[int, ...]]:
    """The tensor shapes of ``shape`` (one of ``SHAPES``); ``num_params`` sizes ``gpt`` only."""
    if shape == "gpt":
        return transformer_shapes(num_params)
    if shape == "openpangu-1b":
        return list(weight_shapes(OPENPANGU_1B).values())
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled_graphs() -> int:
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _normal(
    shapes: list[tuple[int, ...]], scale: float, seed: int, device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    # drawn on the device itself: a 1.4B-parameter set never passes through host memory
    generator = torch.Generator(device).manual_seed(seed)
    return [torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(scale) for shape in shapes]


def run_benchmark(
    num_params: int = 30_000_000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    rounds: int = 7,
    steps: int = 5,
    names: list[str] | None = None,
    seed: int = 0,
    shape: str = "gpt",
) -> dict:
    """Time one optimizer step of every candidate (or of those in ``names``) on ``shape``'s tensors.

    Returns a dict with ``shape``, ``device``, ``device_name``, ``dtype``, ``num_params``, ``num_tensors``,
    ``threads``, ``torch``, ``cuda`` (``torch.version.cuda`` on a CUDA device, else None), ``triton``
    (its version, None when not installed), ``rounds``, ``steps_per_round`` and ``results``: one dict per
    optimizer, in candidate order, with ``name``, ``ms_per_step`` (median over rounds), ``gb_per_s``
    (AdamW-equivalent: 7 element sizes per parameter, see the module docstring), ``vs_adamw_fused`` and
    ``vs_adamw_foreach`` (ratios of ms_per_step, None when that AdamW was not run), ``first_step_s``
    (state creation, plus the compile for fused backends) and ``compiles`` (graphs torch.compile built
    in that first step).
    """
    device = torch.device(device)
    chosen = [c for c in candidates() if names is None or c.name in names]
    if names is not None and len(chosen) != len(set(names)):
        known = ", ".join(c.name for c in candidates())
        missing = sorted(set(names) - {c.name for c in chosen})
        raise ValueError(f"unknown or unavailable optimizers {missing}; known here: {known}")
    shapes = model_shapes(shape, num_params)
    gradients = _normal(shapes, 1e-2, seed + 1, device, dtype)

    optimizers = {}
    first_step_s = {}
    compiles = {}
    for candidate in chosen:
        # the same values for every optimizer, drawn again rather than copied: no spare set in device memory
        params = [torch.nn.Parameter(t) for t in _normal(shapes, 0.02, seed, device, dtype)]
        for p, g in zip(params, gradients):
            p.grad = g
        optimizer = candidate.make(params)
        graphs = _compiled_graphs()
        _synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        _synchronize(device)
        first_step_s[candidate.name] = time.perf_counter() - start
        compiles[candidate.name] = _compiled_graphs() - graphs
        optimizers[candidate.name] = optimizer

    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    order = list(optimizers)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            optimizer = optimizers[name]
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / steps)

    numel = sum(g.numel() for g in gradients)
    bytes_per_step = ACCESSES_PER_PARAM * torch.empty((), dtype=dtype).element_size() * numel
    median_s = {name: statistics.median(times) for name, times in samples.items()}

    def ratio(name: str, baseline: str) -> float | None:
        return median_s[name] / median_s[baseline] if baseline in median_s else None

    results = [
        dict(
            name=name,
            ms_per_step=1e3 * median_s[name],
            gb_per_s=bytes_per_step / median_s[name] / 1e9,
            vs_adamw_fused=ratio(name, "AdamW fused"),
            vs_adamw_foreach=ratio(name, "AdamW foreach"),
            first_step_s=first_step_s[name],
            compiles=compiles[name],
        )
        for name in optimizers
    ]
    return dict(
        shape=shape,
        device=str(device),
        device_name=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        num_params=numel,
        num_tensors=len(shapes),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        triton=_triton_version(),
        rounds=rounds,
        steps_per_round=steps,
        results=results,
    )


def format_table(report: dict) -> str:
    """The report as a plain-text table, with the setup on the first line."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    versions = f"torch {report['torch']}" + "".join(
        f", {name} {report[name]}" for name in ("cuda", "triton") if report[name] is not None
    )
    setup = (
        f"{report['shape']}: {report['num_params'] / 1e6:.1f}M params in {report['num_tensors']} tensors, "
        f"{report['dtype']}, {report['device']} ({report['device_name']}), {report['threads']} threads, {versions}, "
        f"median of {report['rounds']} rounds x {report['steps_per_round']} steps; GB/s as AdamW would move"
    )
    width = max([len("optimizer")] + [len(row["name"]) for row in report["results"]])
    header = (
        f"{'optimizer':<{width}} {'ms/step':>9} {'GB/s':>7} {'/AdamW fused':>13} {'/AdamW foreach':>15} "
        f"{'first step s':>13} {'compiles':>9}"
    )
    lines = [setup, header]
    for row in report["results"]:
        lines.append(
            f"{row['name']:<{width}} {row['ms_per_step']:>9.2f} {row['gb_per_s']:>7.2f} "
            f"{number(row['vs_adamw_fused'], '.3f'):>13} {number(row['vs_adamw_foreach'], '.3f'):>15} "
            f"{row['first_step_s']:>13.2f} {row['compiles']:>9}"
        )
    return "\n".join(lines)
