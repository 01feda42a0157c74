import os

import pytest
import torch

if not torch.cuda.is_available():  # kernels run in the Triton interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dist_pool import DistPool


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs; skipped where there are none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dist_pools():
    """world_size -> a live DistPool (gloo), created on first use and shared by all tests."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in pools or pools[world_size].broken:
            pools[world_size] = DistPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
