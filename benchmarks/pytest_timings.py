"""The slowest tests, and those that started but never finished, from the log that MOE_TEST_TIMING_LOG makes pytest
write (conftest.py). gpu_check.sh prints it after the GPU tests: when its time limit kills pytest, the log is all
that tells which tests used the time.

    python benchmarks/pytest_timings.py LOG [--top 30]
"""

from __future__ import annotations

import argparse


def summarise(lines: list[str], top: int = 30) -> tuple[list[tuple[float, str, str]], list[str]]:
    """(the ``top`` slowest test phases as (seconds, outcome, nodeid), slowest first; the tests that started and
    have no "call" line or failure line, in the order they started)."""
    started: dict[str, None] = {}
    finished: set[str] = set()
    phases = []
    for line in lines:
        parts = line.rstrip("\n").split(" ", 3)
        if len(parts) != 4:
            continue  # a line cut by the kill
        seconds, outcome, when, nodeid = parts
        if seconds == "start":
            started[nodeid] = None
            continue
        if when == "call" or outcome != "passed":
            finished.add(nodeid)
        phases.append((float(seconds), outcome, nodeid))
    phases.sort(key=lambda phase: -phase[0])
    return phases[:top], [nodeid for nodeid in started if nodeid not in finished]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    with open(args.log) as log:
        slowest, unfinished = summarise(log.readlines(), args.top)
    print(f"slowest {len(slowest)} test phases (s):")
    for seconds, outcome, nodeid in slowest:
        print(f"  {seconds:8.2f}  {outcome:7s}  {nodeid}")
    print(f"started, never finished: {len(unfinished)}")
    for nodeid in unfinished:
        print(f"  {nodeid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
