"""Fixtures shared by test modules in several folders (the workflow tests keep their own
helpers in tests/workflow/conftest.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a small shared CPU, torch's intra-op threads
    spin against other processes and make tiny training steps several times slower; one thread
    is also what each rank gets in CI. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
