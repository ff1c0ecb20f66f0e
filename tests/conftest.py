"""Fixtures shared across test folders."""

import pytest

from dualadam_hf.models.openpangu_fixture import write_tiny_openpangu


@pytest.fixture(scope="session")
def tiny_openpangu(tmp_path_factory):
    """A tiny openPangu-Embedded checkpoint in the published on-disk format (written once per session)."""
    return write_tiny_openpangu(tmp_path_factory.mktemp("openpangu") / "tiny-openPangu-Embedded")
