"""Fixtures for the Lightning callback tests (helpers live in lightning_helpers.py)."""

import pytest

from amct_torch.zoo import load_digits_split


@pytest.fixture(scope="session")
def digits():
    """The digits split at 16x16 (tensors)."""
    return load_digits_split(16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Small tensors: one intra-op thread is faster on a busy 2-core machine."""
