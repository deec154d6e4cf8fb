"""Shared by the tests/test_reliability_*.py files (issue 9)."""
import os

import pytest


def slow_requested(config) -> bool:
    """`slow` tests run only when asked for: `pytest -m slow` (or a marker expression that
    selects slow without negating it), or IMGTX_RUN_SLOW=1. A plain `pytest tests/` (CI) skips
    them, since pyproject's markers do not deselect anything by themselves."""
    expr = config.getoption("markexpr", "") or ""
    return os.environ.get("IMGTX_RUN_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


@pytest.fixture(autouse=True)
def skip_slow_unless_requested(request):
    """Import this fixture into a test module to apply the rule above to its `slow` tests."""
    if request.node.get_closest_marker("slow") and not slow_requested(request.config):
        pytest.skip("slow: run with `pytest -m slow` or IMGTX_RUN_SLOW=1")
