import math

import torch
from transformers import AutoTokenizer

from dualadam_hf.train.sft_data import DataArguments, SFTCollator, alpaca_texts, prepare_datasets
from dualadam_hf.models.tiny import (
    ALPACA_ZH_SAMPLE,
    TINY_LLAMA,
    TINY_TOKENIZER_DIR,
    build_tiny_llama,
    is_builtin,
    load_tiny_tokenizer,
    tiny_llama_config,
    train_tiny_tokenizer,
)


def test_is_builtin_recognises_only_the_tiny_llama():
    assert is_builtin(TINY_LLAMA)
    assert not is_builtin("meta-llama/Llama-3.2-1B")
    assert not is_builtin("builtin:tiny-llama2")


def test_tokenizer_loads_offline_with_its_special_tokens_and_no_chat_template():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>"
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}) == 4
    assert not tokenizer.chat_template
    assert 2000 <= len(tokenizer) <= 4000
    assert tokenizer("你好")["input_ids"][0] == tokenizer.bos_token_id


def test_tokenizer_round_trips_unseen_text_without_unknown_tokens():
    tokenizer = load_tiny_tokenizer()
    text = "鲲鹏展翅九万里 🚀 naïve café, 1+1=2。\n\t两个  空格 ."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_shipped_tokenizer_is_what_the_sample_trains():
    rebuilt = train_tiny_tokenizer(alpaca_texts(ALPACA_ZH_SAMPLE))
    shipped = load_tiny_tokenizer()
    assert rebuilt.get_vocab() == shipped.get_vocab()
    text = ALPACA_ZH_SAMPLE.read_text(encoding="utf-8")[:2000]
    assert rebuilt.encode(text) == shipped.encode(text)


def test_config_takes_token_ids_unties_embeddings_and_applies_overrides():
    config = tiny_llama_config(
        1000, pad_token_id=3, bos_token_id=1, eos_token_id=2, hidden_size=32, rms_norm_eps=1e-5
    )
    assert (config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1000, 3, 1, 2)
    assert config.tie_word_embeddings is False
    assert (config.hidden_size, config.rms_norm_eps) == (32, 1e-5)


def test_model_is_sized_to_the_tokenizer_and_deterministic_for_a_seed():
    tokenizer = load_tiny_tokenizer()
    rng_before = torch.get_rng_state()

    first, again, other = (build_tiny_llama(tokenizer, seed) for seed in (0, 0, 1))

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.config.vocab_size == len(tokenizer)
    assert first.config.pad_token_id == tokenizer.pad_token_id
    assert first.lm_head.weight.data_ptr() != first.model.embed_tokens.weight.data_ptr()
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_forward_on_a_collated_batch_gives_a_loss_near_uniform():
    tokenizer = load_tiny_tokenizer()
    prepared = prepare_datasets(DataArguments(dataset_name=str(ALPACA_ZH_SAMPLE), max_seq_length=128), tokenizer)
    batch = SFTCollator(tokenizer.pad_token_id)([prepared.train[i] for i in range(4)])
    model = build_tiny_llama(tokenizer, seed=0)

    loss = model(**batch).loss
    loss.backward()

    # A freshly initialised model predicts nearly uniformly over the vocabulary.
    assert abs(loss.item() - math.log(len(tokenizer))) < 0.5
    assert model.lm_head.weight.grad is not None
