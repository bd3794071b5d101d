"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread (restored afterwards).

    For suites of tiny problems: extra threads only add contention (measured: a 3600-entry
    ``exp_`` takes ~4 ms with 2 threads on a loaded 2-core machine, 0.08 ms with 1). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
