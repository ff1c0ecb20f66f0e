"""Fixtures shared across test folders."""

import os

import pytest
import torch

# Without a GPU, the CUDA backend's Triton kernels run on CPU tensors in Triton's interpreter. Triton reads
# the variable when a kernel is decorated, so it is set before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dualadam_hf.models.openpangu_fixture import write_tiny_openpangu


@pytest.fixture(scope="session")
def tiny_openpangu(tmp_path_factory):
    """A tiny openPangu-Embedded checkpoint in the published on-disk format (written once per session)."""
    return write_tiny_openpangu(tmp_path_factory.mktemp("openpangu") / "tiny-openPangu-Embedded")
