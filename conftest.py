"""Fixtures shared by tests/ and integration/: pytest loads this file for both (and benchmarks/). Helper functions
are imported by name instead: tests/moe_testing.py and integration/hf_testing.py (conftest.py files are not
reliably importable when several folders are collected)."""

import os
import tempfile

import pytest
import torch

# The suites never read the user's own tuned tables (moe-kernels tune writes them into this cache folder): a
# fresh, empty one per session, unless the caller names one.
os.environ.setdefault("MOE_KERNELS_CACHE_DIR", tempfile.mkdtemp(prefix="moe_kernels_test_cache_"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it. For tiny shapes: on an oversubscribed machine the
    OpenMP hand-offs of 2 threads made each small index_add ~100 ms (a 30-step run took 50 s instead of 1 s).
    A module uses it for all its tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# MOE_TEST_TIMING_LOG=FILE: one line per test phase as it ends ("<seconds> <outcome> <when> <nodeid>") and one when a
# test starts ("start - - <nodeid>"), appended at once (xdist workers too). The GPU check reads it when a time
# limit kills pytest before its --durations summary: the slowest tests, and the ones that never finished.
# Under pytest-xdist the controller receives every worker's start and report too: only it writes.
_TIMING_LOG = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("MOE_TEST_TIMING_LOG")


def _timing_line(line: str) -> None:
    with open(_TIMING_LOG, "a") as log:
        log.write(line + "\n")


def pytest_runtest_logstart(nodeid, location):
    if _TIMING_LOG:
        _timing_line(f"start - - {nodeid}")


def pytest_runtest_logreport(report):
    if _TIMING_LOG and (report.when == "call" or report.outcome != "passed"):
        _timing_line(f"{report.duration:.2f} {report.outcome} {report.when} {report.nodeid}")
