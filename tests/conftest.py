"""Fixtures: every supported timm flavour, and a batch of images."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FLAVOURS


@pytest.fixture(autouse=True)
def _restore_threads():
    """Benchmarks called in-process set torch's thread count; give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> None:
    """Tiny models run fastest on one thread, and a busy second core cannot stall them (``_restore_threads`` gives
    the count back). A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    torch.set_num_threads(1)


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
