"""Session-wide test setup: shut the distributed worker pools down and honour the `gpu` marker."""

from __future__ import annotations

import pytest

from tests.harness import shutdown_pools


@pytest.fixture(scope="session", autouse=True)
def _distributed_pools(request: pytest.FixtureRequest) -> None:
    """Stop every worker pool of tests.harness at session end (atexit is only the backstop)."""
    request.addfinalizer(shutdown_pools)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` where CUDA is not available (torch is imported only if needed)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)
