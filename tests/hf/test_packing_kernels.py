"""``packed_sdpa``'s kernels (dualadam_hf/hf/packing.py): the one picked for each device, dtype and shape; one
host read of a batch's boundaries whatever the layers (none where the varlen kernel takes the collator's);
the varlen call's arguments, checked on the CPU through a per-example reference; on a GPU, the kernel itself.

Only torch, transformers and the built-in tiny model: the CUDA tests run on a GPU machine that has no
datasets or peft. That the CPU's per-example path equals the examples run one by one is test_packing.py's.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from dualadam_hf.hf import packing
from dualadam_hf.hf.packing import PACKED_SDPA
from dualadam_hf.models.tiny import build_tiny_llama, load_tiny_tokenizer
from host_reads import CPU, HostReads

# Examples of very different lengths, one of a single token.
LENGTHS = (9, 30, 1, 17)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def examples(lengths=LENGTHS) -> list[dict]:
    rows = [
        [4 + (7 * index + 3 * position) % 2900 for position in range(length)] for index, length in enumerate(lengths)
    ]
    return [{"input_ids": row, "labels": row} for row in rows]


def packed_batch(lengths=LENGTHS) -> dict:
    return packing.packed_collator()(examples(lengths))


def model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def packed_model(tokenizer, layers: int = 3):
    model = build_tiny_llama(tokenizer, seed=0, num_hidden_layers=layers)
    assert packing.prepare_for_packing(model) == PACKED_SDPA
    return model


FLASH_CASE = dict(
    packed=True, device_type="cuda", capability=(9, 0), varlen_in_torch=True, dtype=torch.bfloat16,
    head_dim=128, value_head_dim=128, dropout=0.0, requires_grad=True,
)


@pytest.mark.parametrize(
    ("change", "kernel"),
    [
        ({}, packing.VARLEN),
        ({"dtype": torch.float16}, packing.VARLEN),
        ({"capability": (8, 0)}, packing.VARLEN),
        ({"capability": (12, 1)}, packing.VARLEN),
        ({"head_dim": 256, "value_head_dim": 256}, packing.VARLEN),
        ({"head_dim": 8, "value_head_dim": 8}, packing.VARLEN),
        ({"packed": False}, packing.PLAIN_SDPA),
        ({"packed": False, "device_type": "cpu", "capability": None}, packing.PLAIN_SDPA),
        ({"device_type": "cpu", "capability": None}, packing.PER_EXAMPLE),
        ({"device_type": "mps", "capability": None}, packing.PER_EXAMPLE),
        ({"varlen_in_torch": False}, packing.PER_EXAMPLE),  # torch < 2.9, ROCm, a build without FlashAttention
        ({"capability": (7, 5)}, packing.PER_EXAMPLE),  # before Ampere
        ({"capability": (12, 2)}, packing.PER_EXAMPLE),  # past the cards torch's FlashAttention is built for
        ({"dtype": torch.float32}, packing.PER_EXAMPLE),
        ({"head_dim": 264, "value_head_dim": 264}, packing.PER_EXAMPLE),
        ({"head_dim": 100, "value_head_dim": 100}, packing.PER_EXAMPLE),
        ({"value_head_dim": 64}, packing.PER_EXAMPLE),
        ({"dropout": 0.1}, packing.PER_EXAMPLE),  # the varlen kernel has no dropout
        # FlashAttention's backward on sm86-89 and sm120-121 refuses head dims in (192, 224]
        ({"capability": (8, 6), "head_dim": 200, "value_head_dim": 200}, packing.PER_EXAMPLE),
        ({"capability": (12, 0), "head_dim": 224, "value_head_dim": 224}, packing.PER_EXAMPLE),
        ({"capability": (8, 9), "head_dim": 200, "value_head_dim": 200, "requires_grad": False}, packing.VARLEN),
        ({"capability": (8, 0), "head_dim": 200, "value_head_dim": 200}, packing.VARLEN),
        ({"capability": (8, 6), "head_dim": 232, "value_head_dim": 232}, packing.VARLEN),
    ],
)
def test_the_kernel_packed_sdpa_picks(change, kernel):
    assert packing.packed_kernel(**{**FLASH_CASE, **change}) == kernel


def test_this_torch_has_the_varlen_kernel_with_the_arguments_packed_sdpa_passes():
    from torch.nn.attention import varlen

    assert packing.varlen_attn is varlen.varlen_attn  # torch >= 2.9
    parameters = inspect.signature(varlen.varlen_attn).parameters
    assert list(parameters)[:7] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    assert {"scale", "window_size", "enable_gqa"} <= parameters.keys()
    assert not packing.VARLEN_IN_TORCH or torch.version.cuda is not None  # never on a CPU build


def test_host_reads_are_counted_once_each():
    values = torch.tensor([0, 3, 7], dtype=torch.int32)
    reads = [
        lambda: values.tolist(), lambda: values[1].item(), lambda: int(values[1]), lambda: bool((values > 0).all()),
        lambda: values.nonzero(), lambda: [int(value) for value in values[:2]],
    ]
    counts = []
    for read in reads:
        with HostReads() as counter:
            read()
        counts.append(counter.count)
    assert counts == [1, 1, 1, 1, 1, 2]
    with HostReads() as counter:
        (values + 1).cumsum(0)[1:] - values[:-1]
    assert counter.count == 0


class AttentionReads(HostReads):
    """Host reads inside packed_sdpa's attention calls, and the calls."""

    calls = 0


def count_attention_reads(monkeypatch) -> AttentionReads:
    reads, attention = AttentionReads(), packing.packed_sdpa_attention

    def counted(*args, **kwargs):
        reads.calls += 1
        with reads:
            return attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_SDPA, counted)
    return reads


def test_the_boundaries_are_read_once_per_batch_whatever_the_layers(tokenizer, monkeypatch):
    forward_reads = {}
    for layers in (1, 4):
        model = packed_model(tokenizer, layers).eval()
        attention_reads = count_attention_reads(monkeypatch)
        packed = model_inputs(packed_batch())  # new tensors: nothing read yet
        with torch.no_grad(), HostReads() as reads:
            model(**packed)
        assert attention_reads.calls == layers
        assert attention_reads.count == 1, layers  # the boundaries, which every layer then shares
        forward_reads[layers] = reads.count
    # the rest of the forward (transformers' check for restarting position_ids) neither grows with the layers
    assert forward_reads[4] == forward_reads[1] <= 2


def test_activation_checkpointing_recomputes_with_the_boundaries_already_read(tokenizer, monkeypatch):
    model = packed_model(tokenizer, layers=3)
    model.activation_checkpointing_enable({"use_reentrant": False})
    reads = count_attention_reads(monkeypatch)
    model.train()(**packed_batch()).loss.backward()
    assert reads.calls == 6  # three layers, each recomputed in the backward
    assert reads.count == 1


def test_boundaries_are_read_again_for_another_batch_or_a_tensor_changed_in_place():
    cumulative = torch.tensor([0, 3, 5], dtype=torch.int32)
    with HostReads() as reads:
        assert packing.segment_bounds({"cu_seq_lens_q": cumulative}) == [0, 3, 5]
        assert packing.segment_bounds({"cu_seq_lens_q": cumulative}) == [0, 3, 5]
    assert reads.count == 1
    cumulative[1] = 4
    assert packing.segment_bounds({"cu_seq_lens_q": cumulative}) == [0, 4, 5]
    assert packing.segment_bounds({"cu_seq_lens_q": torch.tensor([0, 2, 5], dtype=torch.int32)}) == [0, 2, 5]
    with torch.inference_mode():
        assert packing.segment_bounds({"cu_seq_lens_q": torch.tensor([0, 1, 5], dtype=torch.int32)}) == [0, 1, 5]


def test_the_varlen_kernel_takes_the_collators_boundaries_with_no_host_read():
    packed, lengths = packed_batch(), LENGTHS
    with HostReads() as reads:
        cu_seq, max_length = packing.varlen_boundaries(packed, CPU)
    assert reads.count == 0
    assert cu_seq is packed["cu_seq_lens_q"] and cu_seq.dtype == torch.int32
    assert max_length == packed["max_length_q"] == max(lengths)
    # from position_ids alone (a collator without the flash kwargs): one read per batch
    positions = {"position_ids": packed["position_ids"]}
    with HostReads() as reads:
        for _ in range(3):
            cu_seq, max_length = packing.varlen_boundaries(positions, CPU)
    assert reads.count == 1
    assert cu_seq.dtype == torch.int32 and cu_seq.tolist() == packed["cu_seq_lens_q"].tolist()
    assert max_length == max(lengths)
    assert packing.varlen_boundaries({"position_ids": torch.arange(9)[None]}, CPU) is None


def reference_varlen_attn(bounds: list[int], calls: list[dict]):
    """torch's varlen_attn as SDPA per example, for the CPU: each call's arguments go to ``calls``. The
    examples' bounds come from the test, so that the reference reads nothing from the host; the test
    checks that ``cu_seq_q`` holds them."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        calls.append(dict(query=query, key=key, value=value, cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k, max_q=max_q,
                          max_k=max_k, scale=scale, window_size=window_size, enable_gqa=enable_gqa))
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            heads_first = [tensor[start:end].transpose(0, 1) for tensor in (query, key, value)]
            output = F.scaled_dot_product_attention(
                *heads_first, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa
            )
            outputs.append(output.transpose(0, 1))
        return torch.cat(outputs)

    return varlen_attn


def run_as_on_a_gpu(monkeypatch, bounds: list[int]) -> list[dict]:
    """packed_sdpa as on a CUDA card with FlashAttention, the kernel replaced by ``reference_varlen_attn``."""
    calls = []
    monkeypatch.setattr(packing, "varlen_attn", reference_varlen_attn(bounds, calls))
    monkeypatch.setattr(
        packing, "packed_kernel", lambda *, packed, **facts: packing.VARLEN if packed else packing.PLAIN_SDPA
    )
    return calls


def logits_and_gradients(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    return output.logits.detach(), torch.cat([parameter.grad.flatten() for parameter in model.parameters()])


@pytest.mark.parametrize("boundaries", ["collator", "position_ids"])
def test_the_varlen_call_gives_the_per_example_results(tokenizer, monkeypatch, boundaries):
    batch = packed_batch()
    if boundaries == "position_ids":
        batch = {key: batch[key] for key in ("input_ids", "labels", "position_ids")}
    model = packed_model(tokenizer, layers=3).train()
    per_example = logits_and_gradients(model, batch)
    bounds = packing.segment_bounds(batch)
    calls = run_as_on_a_gpu(monkeypatch, bounds)
    reads = count_attention_reads(monkeypatch)
    batch = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    varlen = logits_and_gradients(model, batch)  # a new batch: its boundaries not read yet
    torch.testing.assert_close(varlen[0], per_example[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(varlen[1], per_example[1], rtol=1e-5, atol=1e-6)
    assert reads.count == (0 if boundaries == "collator" else 1)

    config, attention = model.config, model.model.layers[0].self_attn
    head_dim = config.hidden_size // config.num_attention_heads
    tokens = bounds[-1]
    assert len(calls) == config.num_hidden_layers
    for call in calls:
        assert call["query"].shape == (tokens, config.num_attention_heads, head_dim)
        assert call["key"].shape == call["value"].shape == (tokens, config.num_key_value_heads, head_dim)
        assert call["query"].dtype == call["key"].dtype == call["value"].dtype == torch.float32
        assert call["cu_seq_q"] is call["cu_seq_k"]
        assert call["cu_seq_q"].dtype == torch.int32 and call["cu_seq_q"].tolist() == bounds
        assert type(call["max_q"]) is type(call["max_k"]) is int
        assert call["max_q"] == call["max_k"] == max(end - start for start, end in zip(bounds, bounds[1:]))
        assert call["window_size"] == (-1, 0)  # causal
        assert call["enable_gqa"] is True  # 4 query heads share 2 key/value heads
        assert call["scale"] == attention.scaling
    if boundaries == "collator":
        assert calls[0]["cu_seq_q"] is batch["cu_seq_lens_q"]  # the collator's tensor, as it is


def test_unpacked_batches_do_not_reach_the_varlen_kernel(tokenizer, monkeypatch):
    calls = run_as_on_a_gpu(monkeypatch, bounds=[])
    model = packed_model(tokenizer).eval()
    rows = [example["input_ids"] for example in examples((5, 9))]
    padded = torch.tensor([rows[0] + [tokenizer.pad_token_id] * 4, rows[1]])
    with torch.no_grad():
        model(input_ids=padded, attention_mask=(padded != tokenizer.pad_token_id).long())
        model(input_ids=torch.tensor(rows[:1]))
        model.generate(torch.tensor(rows[:1]), max_new_tokens=3, do_sample=False, use_cache=True)
    assert calls == []


# --- on a GPU --------------------------------------------------------------------------------------------

needs_varlen_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and packing.VARLEN_IN_TORCH), reason="needs a CUDA GPU and torch's varlen kernel"
)


def gqa_module(heads: int, kv_heads: int) -> torch.nn.Module:
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    return module


@pytest.mark.cuda
@needs_varlen_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(12, 6, 128), (4, 4, 64), (8, 2, 256)])
def test_varlen_on_a_gpu_matches_sdpa_per_example(dtype, heads, kv_heads, head_dim):
    """Output and gradients as close to a float32 reference as SDPA per example in the same dtype."""
    lengths = [37, 1, 300, 64, 129]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    device = torch.device("cuda")
    assert packing.packed_kernel(
        packed=True, device_type="cuda", capability=torch.cuda.get_device_capability(), varlen_in_torch=True,
        dtype=dtype, head_dim=head_dim, value_head_dim=head_dim, dropout=0.0, requires_grad=True,
    ) == packing.VARLEN, "this card or dtype does not take the varlen path"
    generator = torch.Generator(device).manual_seed(0)
    tokens = bounds[-1]
    shapes = [(1, heads, tokens, head_dim), (1, kv_heads, tokens, head_dim), (1, kv_heads, tokens, head_dim)]
    inputs32 = [torch.randn(shape, device=device, generator=generator) for shape in shapes]
    grad_output = torch.randn(1, tokens, heads, head_dim, device=device, generator=generator)
    module = gqa_module(heads, kv_heads)
    cumulative = torch.tensor(bounds, dtype=torch.int32, device=device)
    boundaries = dict(cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative, max_length_q=max(lengths),
                      max_length_k=max(lengths), dropout=0.0, scaling=head_dim**-0.5)

    def run(kernel, inputs):
        inputs = [tensor.detach().requires_grad_() for tensor in inputs]
        if kernel == "varlen":
            with HostReads() as reads:
                output, _ = packing.packed_sdpa_attention(module, *inputs, None, **boundaries)
            assert reads.count == 0
        else:
            output = packing._per_example_attention(module, *inputs, bounds, **boundaries)
        gradients = torch.autograd.grad(output, inputs, grad_output.to(output.dtype))
        return [output.float(), *(gradient.float() for gradient in gradients)]

    reference = run("per_example", inputs32)
    lowered = [tensor.to(dtype) for tensor in inputs32]
    varlen, per_example = run("varlen", lowered), run("per_example", lowered)
    for name, got, baseline, exact in zip(("output", "dq", "dk", "dv"), varlen, per_example, reference):
        assert got.shape == exact.shape, name
        error, baseline_error = (got - exact).abs().max().item(), (baseline - exact).abs().max().item()
        assert error <= 2 * baseline_error + 1e-3, (name, error, baseline_error)


@pytest.mark.cuda
@needs_varlen_gpu
def test_a_packed_model_on_a_gpu_runs_varlen_once_per_layer_with_no_host_read(tokenizer, monkeypatch):
    model = packed_model(tokenizer, layers=3).to("cuda", torch.bfloat16).train()
    batch = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in packed_batch().items()}
    kernel, calls = packing.varlen_attn, []
    monkeypatch.setattr(packing, "varlen_attn", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    reads = count_attention_reads(monkeypatch)
    varlen = logits_and_gradients(model, batch)
    assert len(calls) == 3 and reads.count == 0
    monkeypatch.setattr(
        packing, "packed_kernel", lambda *, packed, **facts: packing.PER_EXAMPLE if packed else packing.PLAIN_SDPA
    )
    per_example = logits_and_gradients(model, batch)
    torch.testing.assert_close(varlen[0].float(), per_example[0].float(), rtol=0, atol=5e-2)
    cosine = F.cosine_similarity(varlen[1].float(), per_example[1].float(), dim=0).item()
    assert cosine > 0.999
