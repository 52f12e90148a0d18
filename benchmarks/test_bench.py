"""The benchmark suite: recjax against four peers on four workloads, in one run.

Run it by hand (the default ``pytest`` run never collects ``benchmarks/``)::

    pytest benchmarks/ --benchmark-only                          # full: about 10-15 min on 2 cores
    RECJAX_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only     # quick: batches 1 and 32
    pytest benchmarks/ --benchmark-only -k "not b256"            # any -k selection works
    pytest benchmarks/ --benchmark-only --bench-summary=summary.md

Three kinds of benchmarks, in this order:

- ``test_matmul_ceiling``: a jitted matmul of each model's largest product, the FLOP
  ceiling (timed again at the end of the run, and before and after every recjax
  timing: recjax's fraction of the ceiling uses the faster of the two next to it).
- ``test_plan``: ``rj.Forest.from_trees`` (recjax's host-side numbering, data stacking and
  plan) per workload and batch; the planner alone and the level peers' numpy plan go in
  ``extra_info``.
- ``test_throughput``: every (workload, batch, mode, system). The setup builds the system
  (compiling it ahead of time, with trace, lower and compile timed separately), checks
  its output against recjax's (root ``h`` forward, every parameter's gradient in
  training), then pytest-benchmark times calls that end when the work is complete.

The summary tables (nodes/s, ratios, ceiling fractions, one-off costs, targets) are
printed at the end of the session by ``conftest.py``. See benchmarks/README.md.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recjax as rj
from recjax import _planner
from recjax._forest import _TreeTable

import _suite
from _suite import MODES, SYSTEMS, batches
from _timing import (
    cpu_seconds, matmul_flops_per_s, median_seconds, minor_faults, paired_ceiling_fractions, timed,
)
from _workloads import WORKLOADS, Levels

CEILING_SHAPES = sorted({w.model.ceiling_shape for w in WORKLOADS.values() if batches(w)})
CASES = [(name, b) for name, w in WORKLOADS.items() for b in batches(w)]
THROUGHPUT = [(name, b, mode, system) for name, b in CASES for mode in MODES for system in SYSTEMS]
PAIRED_BATCH = 256  # the batch of the ceiling targets: recjax is also timed in pairs there
PAIRED_SECONDS = 12.0  # about how long those pairs take per case (7 to 25 pairs)
PAIRED_TORCH_BATCHES = (32, 256)  # the torch targets' batches: training is timed in pairs there


def _paired_speedups(recjax_fn, peer_fn, pairs):
    """recjax's speed-up over a peer, call by call: the peer's seconds over recjax's, one
    per pair of calls made back to back (which goes first alternates).

    Each timed call follows an untimed call of the same function, as in a training
    loop: PyTorch's OpenMP threads spin for ~10 CPU-ms after every op, so a call made
    right after a torch call shares the two cores with them (a jitted matmul alternated
    with torch matmuls ran at 59 GFLOP/s instead of 102; RESULTS.md, thirteenth session).
    """
    def steady(fn):
        fn()
        return timed(fn)[0]

    ratios = []
    for i in range(pairs):
        if i % 2:
            peer_s, recjax_s = steady(peer_fn), steady(recjax_fn)
        else:
            recjax_s, peer_s = steady(recjax_fn), steady(peer_fn)
        ratios.append(peer_s / recjax_s)
    return ratios


def _median(benchmark):
    """The median seconds pytest-benchmark measured (None when benchmarks are disabled)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


@pytest.mark.parametrize("shape", CEILING_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_ceiling(benchmark, shape):
    k, n = shape
    m = 1024
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    matmul = jax.jit(jnp.matmul).trace(a, b).lower().compile()
    benchmark.group = "ceiling"
    benchmark.pedantic(lambda: matmul(a, b).block_until_ready(), rounds=20, warmup_rounds=3)
    seconds = _median(benchmark)
    if seconds:
        flops = 2 * m * k * n / seconds
        _suite.CEILINGS.setdefault(shape, []).append(flops)
        benchmark.extra_info.update(gflop_per_s=flops / 1e9)


@pytest.mark.parametrize("workload,batch", CASES, ids=[f"{w}-b{b}" for w, b in CASES])
def test_plan(benchmark, workload, batch):
    case = _suite.case(workload, batch)
    trees, forest, nodes = case.trees, case.forest, case.nodes
    first, _ = timed(lambda: rj.Forest.from_trees(trees))
    rounds, warmup = _suite.rounds_for(first)
    benchmark.group = "plan"
    benchmark.pedantic(rj.Forest.from_trees, args=(trees,), rounds=rounds, warmup_rounds=warmup)
    from_trees_s = _median(benchmark) or first
    planner_s = median_seconds(lambda: _planner.plan(forest.child_ptr, forest.child_idx), rounds)
    levels_s = median_seconds(lambda: Levels.from_trees(trees), rounds)
    # fit walks its dataset once and cuts each batch out of that walk: the same forest
    # as from_trees, without the per-batch Python walk.
    table, everything = _TreeTable.build(trees), np.arange(len(trees))

    def cut_and_plan():
        ptr, idx, data, roots, kind = table.arrays(everything)
        return rj.Forest._build(ptr, idx, data, roots, kind=kind)

    assert cut_and_plan()._meta == forest._meta
    cut_s = median_seconds(cut_and_plan, rounds)
    _suite.PLANS[(workload, batch)] = {
        "from_trees_s": from_trees_s, "planner_s": planner_s, "levels_s": levels_s,
        "cut_s": cut_s,
    }
    benchmark.extra_info.update(
        nodes=nodes,
        from_trees_nodes_per_s=nodes / from_trees_s,
        planner_s=planner_s,
        planner_nodes_per_s=nodes / planner_s,
        cut_and_plan_nodes_per_s=nodes / cut_s,
        peer_levels_s=levels_s,
        steps=forest.plan.num_steps,
    )


@pytest.mark.parametrize(
    "workload,batch,mode,system", THROUGHPUT, ids=["-".join(map(str, (w, f"b{b}", m, s))) for w, b, m, s in THROUGHPUT]
)
def test_throughput(benchmark, workload, batch, mode, system):
    result = _suite.record(_suite.Result(workload, batch, mode, system))
    if system.startswith("torch"):
        try:
            pytest.importorskip("torch")
        except pytest.skip.Exception:
            result.skipped = "torch is not installed (pip install -e '.[bench]')"
            raise
    case = _suite.case(workload, batch)
    reason = case.skip_reason(system, mode)
    if reason:
        result.skipped = reason
        pytest.skip(reason)

    run = case.runner(system, mode)  # builds, compiles and checks against recjax
    rounds, warmup = _suite.rounds_for(run.steady_s)
    benchmark.group = f"{workload}-b{batch}-{mode}"
    # recjax's timing is bracketed by two ceiling samples: this machine's speed drifts by
    # 1.5x within a run, so its fraction of the ceiling uses the samples taken next to it.
    shape = case.model.ceiling_shape if system == "recjax" else None
    before = matmul_flops_per_s(*shape) if shape else None
    faults, steal, start = minor_faults(), cpu_seconds(steal=True)[2], time.perf_counter()
    benchmark.pedantic(run.fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if faults is not None:
        run.info["faults_per_call"] = (minor_faults() - faults) / (rounds + warmup)
    if steal is not None:  # the share of the CPUs the hypervisor held back meanwhile
        cpus = os.cpu_count() or 1
        run.info["steal"] = (cpu_seconds(steal=True)[2] - steal) / ((time.perf_counter() - start) * cpus)

    result.nodes, result.seconds, result.info = run.nodes, _median(benchmark), dict(run.info)
    if shape:
        result.info["ceiling_flops"] = max(before, matmul_flops_per_s(*shape))
        if batch == PAIRED_BATCH and result.seconds:
            # The targets' reading: recjax and the ceiling alternated call by call.
            pairs = int(np.clip(PAIRED_SECONDS / (2 * result.seconds), 7, 25))
            fractions = paired_ceiling_fractions(run.fn, _suite.cell_flops(workload, batch, mode), *shape, pairs)
            run.info["paired_fractions"] = result.info["paired_fractions"] = fractions
    if system == "torch_levels" and mode == "train" and batch in PAIRED_TORCH_BATCHES and result.seconds:
        # The torch targets' reading: recjax and torch levels alternated call by call.
        rj_fn = case.runner("recjax", mode).fn
        pairs = int(np.clip(PAIRED_SECONDS / (4 * result.seconds), 7, 25))  # four calls a pair
        run.info["paired_ratios"] = result.info["paired_ratios"] = _paired_speedups(rj_fn, run.fn, pairs)
    info = {"nodes": run.nodes, **run.info}
    if result.rate:
        info["nodes_per_s"] = result.rate
        ref = _suite._find(workload, batch, mode, "recjax")
        if system == "recjax":
            fraction = _suite.ceiling_fraction(result)
            if fraction is not None:
                info["ceiling_fraction"] = fraction
            if _suite.paired_fraction(result) is not None:
                info["paired_ceiling_fraction"] = _suite.paired_fraction(result)
        elif ref is not None and ref.rate:
            info["recjax_ratio"] = ref.rate / result.rate
        if "paired_ratios" in result.info:
            info["paired_recjax_ratio"] = float(np.median(result.info["paired_ratios"]))
    benchmark.extra_info.update(info)
