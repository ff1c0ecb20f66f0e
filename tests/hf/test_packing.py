"""Padding-free batches: the same examples give the same logits, loss, gradients and evaluation as padded
ones, with each attention implementation that runs on a CPU; what cannot keep examples apart is refused."""

from __future__ import annotations

import pytest
import torch
from host_reads import HostReads
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

from dualadam_hf import DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.hf import packing
from dualadam_hf.hf.packing import PACKED_SDPA, PackingError
from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE, build_tiny_llama, load_tiny_tokenizer
from dualadam_hf.train.sft_data import DataArguments, SFTCollator, prepare_datasets

# Three examples of very different lengths; the longest decides the padded layout.
EXAMPLES = (3, 0, 11)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tokenizer):
    return prepare_datasets(DataArguments(dataset_name=str(ALPACA_ZH_SAMPLE), max_seq_length=192), tokenizer)


def examples(data, indices=EXAMPLES) -> list[dict]:
    return [data.train[index] for index in indices]


def model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def with_attention(model, attention: str):
    model.set_attn_implementation(attention)
    model.config.use_cache = False
    return model


def tiny_model(tokenizer, attention: str = "sdpa"):
    return with_attention(build_tiny_llama(tokenizer, seed=0), attention).eval()


def assert_logits_equal_one_by_one(model, batch: list[dict]) -> None:
    packed = packing.packed_collator()(batch)
    bounds = packing.segment_bounds(packed)
    with torch.no_grad():
        logits = model(**model_inputs(packed)).logits[0]
        for example, start, end in zip(batch, bounds[:-1], bounds[1:]):
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start:end], alone, rtol=0, atol=1e-5)


def test_the_collator_concatenates_the_batch_with_boundaries_and_restarting_positions(data):
    batch = examples(data)
    packed = packing.packed_collator()(batch)
    lengths = [len(example["input_ids"]) for example in batch]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in packed  # a mask would hide the packing from transformers' masking
    bounds = packing.segment_bounds(packed)
    assert bounds == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    # what FlashAttention's varlen kernel takes
    assert packed["cu_seq_lens_q"].tolist() == packed["cu_seq_lens_k"].tolist() == bounds
    assert packed["max_length_q"] == packed["max_length_k"] == max(lengths)
    for example, start, end in zip(batch, bounds[:-1], bounds[1:]):
        assert packed["input_ids"][0, start:end].tolist() == example["input_ids"]
        assert packed["position_ids"][0, start:end].tolist() == list(range(end - start))
        # no example learns to predict the next one's first token
        assert packed["labels"][0, start].item() == -100
        assert packed["labels"][0, start + 1 : end].tolist() == example["labels"][1:]


def test_boundaries_are_read_from_position_ids_when_the_collator_gives_only_those():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert packing.segment_bounds({"position_ids": position_ids}) == [0, 3, 5, 9]
    assert packing.segment_bounds({"position_ids": torch.arange(6)[None]}) is None  # one example: not packed
    assert packing.segment_bounds({"position_ids": torch.arange(6).repeat(2, 1)}) is None  # a padded batch
    assert packing.segment_bounds({}) is None


@pytest.mark.parametrize("attention", ["eager", "sdpa", PACKED_SDPA])
def test_packed_logits_equal_the_examples_run_one_by_one(tokenizer, data, attention):
    packing.register()
    assert_logits_equal_one_by_one(tiny_model(tokenizer, attention), examples(data))


@pytest.mark.slow  # FlexAttention compiles (about 30 s on a CPU)
def test_packed_logits_equal_one_by_one_with_flex_attention(tokenizer, data):
    assert_logits_equal_one_by_one(tiny_model(tokenizer, "flex_attention"), examples(data, EXAMPLES[:2]))


def test_packed_sdpa_keeps_examples_apart_from_position_ids_alone(tokenizer, data):
    packing.register()
    model = tiny_model(tokenizer, PACKED_SDPA)
    batch = examples(data)
    packed = packing.packed_collator()(batch)
    position_only = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(
            model(**position_only).logits, model(**model_inputs(packed)).logits, rtol=0, atol=1e-6
        )


def test_the_openpangu_fixture_packed_equals_one_by_one(tiny_openpangu, data):
    model = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.float32).eval()
    model.config.use_cache = True  # as published: the cache must be turned off for packing
    assert packing.prepare_for_packing(model) == PACKED_SDPA
    assert model.config.use_cache is False
    assert model.config.attention_bias  # the architecture's bias on q/k/v/o takes part
    ids = [[2 + (7 * index + 3 * position) % 90 for position in range(length)] for index, length in enumerate((9, 30, 4))]
    batch = [{"input_ids": row, "labels": row} for row in ids]
    assert_logits_equal_one_by_one(model, batch)


def tiny_mistral(sliding_window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window,
                           attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


def test_a_sliding_window_model_keeps_sdpa_and_its_window(data):
    """packed_sdpa attends to the whole past of each example; a sliding window must not lose its window."""
    model = tiny_mistral(sliding_window=4)
    assert packing.prepare_for_packing(model) == "sdpa"  # the block-diagonal mask, with the window
    assert_logits_equal_one_by_one(model, examples(data))
    packing.register()
    model.set_attn_implementation(PACKED_SDPA)
    with pytest.raises(PackingError, match="packed_sdpa attends to the whole past, but mistral uses a sliding window"):
        packing.prepare_for_packing(model)
    assert packing.attends_fully(tiny_mistral(sliding_window=None).config)


def test_packed_sdpa_can_be_named_when_loading(tiny_openpangu, data):
    import dualadam_hf  # noqa: F401  (registers packed_sdpa, as it registers the optimizers)

    loaded = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.float32, attn_implementation=PACKED_SDPA)
    assert packing.attention_of(loaded) == PACKED_SDPA
    assert packing.prepare_for_packing(loaded) == PACKED_SDPA
    reference = AutoModelForCausalLM.from_pretrained(tiny_openpangu, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor([[5, 17, 33, 8, 41, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-6)


def test_eager_with_the_cache_on_is_made_safe(tokenizer, data):
    model = build_tiny_llama(tokenizer, seed=0).eval()
    model.set_attn_implementation("eager")
    model.config.use_cache = True
    assert packing.prepare_for_packing(model) == "eager"  # eager keeps examples apart by its mask
    assert_logits_equal_one_by_one(model, examples(data))


def test_lora_model_packed_equals_one_by_one(tokenizer, data):
    model = build_tiny_llama(tokenizer, seed=0)
    packing.prepare_for_packing(model)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # non-zero, so that the adapter changes the logits
            torch.nn.init.normal_(parameter, std=0.05)
    assert_logits_equal_one_by_one(lora.eval(), examples(data))


def loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), torch.cat([parameter.grad.flatten() for parameter in model.parameters()])


def test_one_training_step_has_the_padded_loss_and_gradients(tokenizer, data):
    batch = examples(data, range(16))
    model = build_tiny_llama(tokenizer, seed=0).train()
    padded_loss, padded_gradients = loss_and_gradients(model, SFTCollator(tokenizer.pad_token_id)(batch))
    packing.prepare_for_packing(model)
    packed_loss, packed_gradients = loss_and_gradients(model, packing.packed_collator()(batch))
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert ((packed_gradients - padded_gradients).norm() / padded_gradients.norm()).item() < 1e-5


def run_trainer(tmp_path, tokenizer, data, *, packed: bool, **overrides):
    model = build_tiny_llama(tokenizer, seed=0)
    if packed:
        packing.prepare_for_packing(model)
    settings = dict(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=3, data_seed=3, disable_tqdm=True,
        per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=3e-3, optim="dualadam",
        optim_args="switch_ratio=0.5", max_steps=10, save_strategy="no", eval_strategy="no", logging_steps=1,
        lr_scheduler_type="constant", dataloader_num_workers=0, train_eval_samples=16,
    )
    settings.update(overrides)
    trainer = DualAdamTrainer(
        model=model,
        args=DualAdamTrainingArguments(**settings),
        train_dataset=data.train,
        eval_dataset=data.eval.select(range(13)),  # uneven against the evaluation batch of 8
        data_collator=packing.packed_collator() if packed else SFTCollator(tokenizer.pad_token_id),
    )
    return trainer


def test_evaluation_equals_the_padded_one_before_and_after_ten_steps(tmp_path, tokenizer, data):
    padded = run_trainer(tmp_path / "padded", tokenizer, data, packed=False)
    packed = run_trainer(tmp_path / "packed", tokenizer, data, packed=True)
    before = padded.evaluate(), packed.evaluate()
    for key in ("eval_loss", "eval_ppl", "eval_train_loss", "eval_gen_gap"):
        assert before[1][key] == pytest.approx(before[0][key], rel=1e-6, abs=1e-7), key
    padded_result, packed_result = padded.train(), packed.train()
    after = padded.evaluate(), packed.evaluate()
    assert after[1]["eval_loss"] == pytest.approx(after[0]["eval_loss"], rel=1e-4)
    assert after[1]["eval_train_loss"] == pytest.approx(after[0]["eval_train_loss"], rel=1e-4)
    assert after[0]["eval_loss"] < before[0]["eval_loss"] - 0.1  # the ten steps did learn
    # the summary: the same non-pad tokens, the padding the packed run did not compute
    padded_metrics, packed_metrics = padded_result.metrics, packed_result.metrics
    assert packed_metrics["train_nonpad_tokens"] == padded_metrics["train_nonpad_tokens"]
    assert packed_metrics["train_padding_share"] == pytest.approx(padded_metrics["train_padding_share"])
    assert 0.1 < packed_metrics["train_padding_share"] < 0.9
    assert packed_metrics["train_nonpad_tokens_per_second"] > 0
    # logged, so that every reporter (TensorBoard, W&B) sees them, not only train_results.json
    logged = [entry for entry in packed.state.log_history if "train_padding_share" in entry]
    assert len(logged) == 1 and logged[0]["train_nonpad_tokens"] == packed_metrics["train_nonpad_tokens"]


def trained_weights(trainer) -> torch.Tensor:
    trainer.train()
    return torch.cat([parameter.detach().flatten() for parameter in trainer.model.parameters()])


def test_gradient_accumulation_averages_over_every_label_token_of_the_accumulated_batches(tmp_path, tokenizer, data):
    # one padded batch of 8 per optimizer step, and the same 8 examples as two packed batches of 4: the
    # Trainer divides by the label tokens of all accumulated batches (num_items_in_batch) either way
    whole = run_trainer(tmp_path / "whole", tokenizer, data, packed=False, max_steps=3)
    accumulated = run_trainer(
        tmp_path / "accumulated", tokenizer, data, packed=True, max_steps=3,
        per_device_train_batch_size=4, gradient_accumulation_steps=2,
    )
    reference, weights = trained_weights(whole), trained_weights(accumulated)
    assert ((weights - reference).norm() / reference.norm()).item() < 1e-5
    losses = [entry["loss"] for entry in whole.state.log_history if "loss" in entry]
    accumulated_losses = [entry["loss"] for entry in accumulated.state.log_history if "loss" in entry]
    assert accumulated_losses == pytest.approx(losses, rel=1e-5)


def test_a_steady_training_step_reads_from_the_device_only_where_it_must(tmp_path, tokenizer, data):
    # On a GPU every host read of a tensor value waits for the device. Outside the optimizer (whose CUDA
    # backend reads nothing: test_triton_backend.py), a packed step of two micro-batches reads, on a CPU:
    # per micro-batch transformers' check of position_ids for packed rows (masking_utils, before any layer)
    # and packed_sdpa's example boundaries (once for all layers; none on CUDA, whose varlen kernel takes the
    # collator's: test_packing_kernels.py); per optimizer step the non-finite guard's one read.
    trainer = run_trainer(tmp_path, tokenizer, data, packed=True, max_steps=6, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, logging_steps=100)
    whole, in_optimizer = HostReads(), HostReads()
    window = {"open": False}

    class Steps(TrainerCallback):  # steps 3 to 5: after the first, before the last one's logging
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                window["open"] = True
                whole.__enter__()
            elif state.global_step == 5:
                window["open"] = False
                whole.__exit__(None, None, None)

    trainer.add_callback(Steps())
    trainer.create_optimizer()
    step = trainer.optimizer.step

    def counted_step(*args, **kwargs):
        if not window["open"]:
            return step(*args, **kwargs)
        with in_optimizer:
            return step(*args, **kwargs)

    trainer.optimizer.step = counted_step
    trainer.train()
    assert in_optimizer.count > 0  # the window saw the optimizer's steps (CPU backends read their counters)
    assert whole.count - in_optimizer.count == 3 * (2 * 2 + 1)


def test_batch_token_counts_padded_and_packed(data, tokenizer):
    batch = examples(data)
    lengths = [len(example["input_ids"]) for example in batch]
    layout = [sum(lengths), len(lengths) * max(lengths)]
    assert packing.batch_token_counts(packing.packed_collator()(batch)).tolist() == layout
    assert packing.batch_token_counts(SFTCollator(tokenizer.pad_token_id)(batch)).tolist() == layout
    metrics = packing.token_metrics(torch.tensor(layout, dtype=torch.float64), runtime=2.0)
    assert metrics == {
        "train_nonpad_tokens": layout[0],
        "train_padding_share": pytest.approx(1 - layout[0] / layout[1]),
        "train_nonpad_tokens_per_second": layout[0] / 2.0,
    }


def test_a_model_that_cannot_keep_packed_examples_apart_is_refused_in_one_line(tokenizer):
    model = build_tiny_llama(tokenizer, seed=0)
    model._supports_attention_backend = False
    with pytest.raises(PackingError, match=r"^packing: llama does not run its attention through") as error:
        packing.prepare_for_packing(model)
    assert "\n" not in str(error.value)

    model = build_tiny_llama(tokenizer, seed=0)
    model.config._attn_implementation = "paged|eager"
    with pytest.raises(PackingError, match=r"attn_implementation=paged\|eager cannot keep packed examples apart"):
        packing.prepare_for_packing(model)

    encoder_decoder = build_tiny_llama(tokenizer, seed=0)
    encoder_decoder.config.is_encoder_decoder = True
    with pytest.raises(PackingError, match="not a decoder-only causal LM"):
        packing.prepare_for_packing(encoder_decoder)


def test_unpacked_batches_through_packed_sdpa_are_plain_sdpa(tokenizer, data):
    """Generation and padded batches keep working when the model was prepared for packing."""
    packing.register()
    reference, prepared = tiny_model(tokenizer, "sdpa"), tiny_model(tokenizer, PACKED_SDPA)
    batch = SFTCollator(tokenizer.pad_token_id)(examples(data))
    with torch.no_grad():
        expected, got = reference(**model_inputs(batch)).logits, prepared(**model_inputs(batch)).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-6)
    prompt = torch.tensor([data.eval[0]["input_ids"][:12]])
    generated = [
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, use_cache=True)
        for model in (reference, prepared)
    ]
    assert generated[0].tolist() == generated[1].tolist()


def test_evaluation_rows_are_one_per_example_as_when_padded(tokenizer, data):
    """The evaluation loop gathers rows across processes and drops the duplicated examples of the last
    batch by counting rows: a packed batch must give one row per example, equal to the padded row. (That
    the gathered whole-set measures agree under two processes with an uneven last batch is
    tests/train/test_distributed.py's test_two_processes_train_like_one.)"""
    from dualadam_hf.hf.metrics import per_example_stats

    model, batch = tiny_model(tokenizer, "sdpa"), examples(data)
    padded, packed = SFTCollator(tokenizer.pad_token_id)(batch), packing.packed_collator()(batch)
    packing.prepare_for_packing(model)
    with torch.no_grad():
        padded_rows = per_example_stats(model(**model_inputs(padded)).logits, padded["labels"])
        packed_rows = per_example_stats(
            model(**model_inputs(packed)).logits, packed["labels"], packing.segment_bounds(packed)
        )
    assert packed_rows.shape == padded_rows.shape == (len(batch), 3)
    torch.testing.assert_close(packed_rows, padded_rows, rtol=1e-6, atol=1e-6)
