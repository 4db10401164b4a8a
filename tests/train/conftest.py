"""Fixtures shared by the training tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread: the toy models gain nothing from threads, the machine is shared,
    and the trained figures some tests check depend on the order of the sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
