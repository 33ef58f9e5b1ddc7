"""Shared test set-up: seeding, and ``pytest --device cuda`` to run the device tests on a GPU.

Tests that take the ``device`` fixture run on the device given by ``--device`` (default
``cpu``). Tests marked ``cuda`` need a CUDA device and are skipped unless ``--device cuda`` is
given and CUDA is available, so CI (CPU only) skips them cleanly.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="device for the device-relevant tests: cpu (default), cuda or cuda:N",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run with --device cuda)")
    name = config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(
            f"--device: {name!r} is not a torch device (cpu, cuda, cuda:1)"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: this machine has no CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.device(config.getoption("--device")).type == "cuda":
        return
    skip = pytest.mark.skip(reason="needs CUDA: run with --device cuda on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device given by ``--device`` (``cpu`` unless asked otherwise)."""
    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
