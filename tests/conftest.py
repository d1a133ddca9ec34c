"""Shared fixtures. `--run-slow` enables the long checks marked `slow`; tests marked `gpu` run only where
torch sees a CUDA device."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _cuda():
        no_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(no_gpu)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long check: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # Tests run two at a time (xdist) on two cores: one torch thread each avoids oversubscription,
    # which slows small-matrix work by several times.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
