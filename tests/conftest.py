"""Shared test configuration: hypothesis settings profiles (STYLE point 12).

``ci`` (loaded when the environment variable CI is set) runs more examples
with no deadline, since CI machines are slow and noisy; ``dev`` keeps the
local loop fast. Pick one explicitly with ``--hypothesis-profile``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def one_thread():
    """Tiny ops on a loaded 2-core machine are 100x faster with one thread
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a test file)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
