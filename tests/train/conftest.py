"""Fixtures of the training-app tests."""

from __future__ import annotations

import pytest
import transformers


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the run loads a tokenizer or a model: a refusal must come before either."""

    def refuse(*args, **kwargs):
        raise AssertionError("a refused run must not load weights or data")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", refuse)
    monkeypatch.setattr("dualadam_hf.train.finetune.load_model_and_tokenizer", refuse)
