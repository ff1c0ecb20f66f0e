"""Fixtures for the HF integration tests (tiny Llama and synthetic token sets: tests/tiny_lm.py)."""

import pytest
from tiny_lm import TokenDataset


@pytest.fixture
def train_set():
    return TokenDataset(48, seed=1)


@pytest.fixture
def eval_set():
    return TokenDataset(10, seed=2)
