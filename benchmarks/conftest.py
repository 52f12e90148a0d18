"""pytest configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

The default test run never collects this folder (``testpaths`` in pyproject.toml are
``tests`` and ``recjax``). This file:

- keeps pytest's ``--doctest-modules`` (from pyproject) away from the helper modules and
  the standalone scripts, which have no doctests (and ``_torch_peers`` imports torch);
- adds ``--bench-summary PATH`` (default: the ``RECJAX_BENCH_SUMMARY`` environment
  variable) to write the session's markdown summary to a file;
- at the end of the session, times the FLOP-ceiling matmuls a second time and prints the
  summary built by ``_suite.summary_markdown`` from the results of this one run.
"""

from __future__ import annotations

import os
import time

import _suite
from _timing import cpu_seconds, matmul_flops_per_s
from _workloads import WORKLOADS

collect_ignore_glob = ["_*.py", "bench_*.py"]


def pytest_addoption(parser):
    parser.addoption(
        "--bench-summary",
        default=os.environ.get("RECJAX_BENCH_SUMMARY"),
        metavar="PATH",
        help="write the recjax benchmark summary (markdown) to PATH "
        "(default: $RECJAX_BENCH_SUMMARY; printed either way)",
    )


def pytest_sessionstart(session):
    _suite.SESSION["facts"] = _suite.session_facts()
    _suite.SESSION["cpu_start"] = cpu_seconds(steal=True)
    _suite.SESSION["wall_start"] = time.perf_counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not any(r.seconds for r in _suite.RESULTS) and not _suite.PLANS:
        return
    # The ceiling's second sample, at the end of the run, for every model that was timed.
    for shape in {WORKLOADS[r.workload].model.ceiling_shape for r in _suite.RESULTS if r.seconds}:
        _suite.CEILINGS.setdefault(shape, []).append(matmul_flops_per_s(*shape))
    (machine0, own0, steal0), (machine1, own1, steal1) = _suite.SESSION["cpu_start"], cpu_seconds(steal=True)
    wall = time.perf_counter() - _suite.SESSION["wall_start"]
    _suite.SESSION["wall_s"] = wall
    if machine0 is not None:
        steal = steal1 - steal0 if steal0 is not None else 0.0
        _suite.SESSION["other_cpu_s"] = max(0.0, (machine1 - machine0) - (own1 - own0) - steal)
        if steal0 is not None:
            _suite.SESSION["steal_s"] = steal

    text = _suite.summary_markdown()
    terminalreporter.write_sep("=", "recjax benchmark summary (markdown)")
    terminalreporter.write_line(text)
    path = config.getoption("--bench-summary")
    if path:
        with open(path, "w") as f:
            f.write(text)
        terminalreporter.write_line(f"summary written to {path}")
