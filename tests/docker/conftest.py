"""tests/docker: compose.yaml in a real Docker engine (host.py provides one when it can).

Kept out of the plain ``python -m pytest``: on a fresh machine the set-up alone takes about 6
minutes on the project's 2 cores (debootstrap, the image, the model converted on first start),
so these tests run only when ``-m`` names the marker: ``python -m pytest -m docker -s``. CI
runs them that way, as a step of its own after the main suite (.ci/run).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: builds the image and runs compose.yaml in a real Docker engine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "docker" in (config.getoption("markexpr") or ""):
        return
    opt_in = pytest.mark.skip(reason="opt-in (minutes of image building): python -m pytest -m docker -s")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(opt_in)
