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


def _last_logits(model, prefix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=prefix[None]).logits[0, -1].float()


def _greedy_parity(base, patched, prompt, want, got, dtype, tol: float = 3e-2) -> None:
    """Greedy tokens of a patched model (``got``) against the unpatched model's (``want``), both 1-D new tokens after
    ``prompt`` [1, P]. In fp32 they must be equal. In a 16-bit dtype a divergence is accepted at its first step only
    where it is explained: on the shared prefix, the patched next-token logits agree with the unpatched ones within
    ``tol`` (norm-wise; where rounding flipped a routing choice, no further from the fp32 logits than twice the
    unpatched model's own distance), and the unpatched model's margin for its token over the patched model's choice
    is within twice the largest difference between the two sets of logits. A patched model that computes something
    else fails at its first token instead of passing as a near tie."""
    assert want.shape == got.shape, f"{got.tolist()} vs {want.tolist()}"
    if dtype == torch.float32:
        assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"
        return
    differ = (got != want).nonzero()
    if not len(differ):
        return
    step = int(differ[0])
    prefix = torch.cat([prompt[0], want[:step]])
    ref, ours = _last_logits(base, prefix), _last_logits(patched, prefix)
    err = (ours - ref).norm().item() / max(ref.norm().item(), 1e-12)
    if err > tol:
        import copy

        truth = _last_logits(copy.deepcopy(base).float(), prefix)
        ours_vs, theirs_vs = ((x - truth).norm().item() / max(truth.norm().item(), 1e-12) for x in (ours, ref))
        assert ours_vs <= max(tol, 2 * theirs_vs), (
            f"step {step}: tokens diverge ({got.tolist()} vs {want.tolist()}); next-token logits {err:.2e} from the "
            f"unpatched model's, {ours_vs:.2e} from fp32 against its {theirs_vs:.2e}")
    margin = (ref[want[step]] - ref[got[step]]).item()
    assert margin <= 2 * (ours - ref).abs().max().item(), (
        f"step {step}: tokens diverge ({got.tolist()} vs {want.tolist()}) with a margin of {margin:.3g} in the "
        f"unpatched logits, more than the two models' logits differ")


@pytest.fixture
def greedy_parity():
    """The check of greedy tokens, patched against unpatched (see ``_greedy_parity``), for tests/ and integration/."""
    return _greedy_parity
