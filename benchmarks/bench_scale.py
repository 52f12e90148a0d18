"""Scale: a 1,000,000-node forest and a 100,000-node chain, convert + plan + forward.

Run (not part of the test suite)::

    python benchmarks/bench_scale.py                 # both workloads (a few minutes on 2 cores)
    python benchmarks/bench_scale.py --nodes 100000  # a smaller forest
    python benchmarks/bench_scale.py --no-chain-forward

For each workload it reports, in one process:

- convert + plan: ``rj.Forest.from_parents(parent, data)`` (validation, CSR, data packing and
  the level plan; median of ``--repeats``), and the planner alone (``_planner.plan`` on the
  CSR arrays). Baseline in the same run: ``np.argsort(parent, kind="stable")``, one numpy
  pass over the same array, so the ratio says how many such passes planning costs.
- forward: a child-sum cell of hidden size 16 written with ``node.children.map`` run with
  ``jax.jit(cell.batch)`` (the Forest is an argument). Compile (first call) is reported
  apart; then the median of ``--repeats`` calls, each ending in ``block_until_ready``.
  Baseline in the same run: the same cell arithmetic on the same number of rows, flat (one
  vmapped op, no recursion, no scan): the ratio is the price of the level-by-level schedule.
- memory: the process's peak resident set (``resource.getrusage(...).ru_maxrss``) after
  each stage (it only grows), and the plan's sizes: buffer rows, steps, edge slots and the
  bytes of its index tables.

The chain's forward runs one scan step per level (99,999 sequential steps). A 5,000-node
chain is timed first; when the 100,000-node forward would take longer than
``--chain-limit`` seconds (default 180) by linear extrapolation, it is skipped and only the
extrapolation is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import recjax as rj
from recjax import _planner

HIDDEN = 16
VOCAB = 1000


@rj.recursive
def cell(p, node):
    """Child-sum Tree-RNN: one template for every arity (segment sums over the edges)."""
    x = p["emb"][node.data["tok"]]
    h_sum = node.children.map(lambda c: cell(p, c)).sum(initial=jnp.zeros(HIDDEN))
    return jnp.tanh(x @ p["W"] + h_sum @ p["U"] + p["b"])


def flat_cell(p, tok):
    """The same arithmetic on every row at once, with a zero child sum (the baseline)."""
    x = p["emb"][tok]
    return jnp.tanh(x @ p["W"] + jnp.zeros_like(x) @ p["U"] + p["b"])


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "emb": jax.random.normal(k[0], (VOCAB, HIDDEN)),
        "W": 0.3 * jax.random.normal(k[1], (HIDDEN, HIDDEN)),
        "U": 0.3 * jax.random.normal(k[2], (HIDDEN, HIDDEN)),
        "b": jnp.zeros(HIDDEN),
    }


def random_forest_parents(rng, num_nodes, mean_size=50):
    """Random recursive trees of 30..70 nodes (mean ~50): node j's parent is uniform in 0..j-1."""
    sizes = rng.integers(mean_size - 20, mean_size + 21, size=num_nodes // (mean_size - 20) + 1)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), num_nodes) + 1]
    sizes[-1] -= sizes.sum() - num_nodes
    if sizes[-1] <= 0:  # fold a too-small remainder into the previous tree
        sizes[-2] += sizes[-1]
        sizes = sizes[:-1]
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    local = np.arange(num_nodes) - first
    parent = first + np.floor(rng.random(num_nodes) * local).astype(np.int64)
    parent[local == 0] = -1
    return parent, sizes.size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def plan_stats(forest) -> dict:
    plan = forest.plan
    tables = [plan.leaf_node, plan.row_of_node] + [a for t in plan.phases for a in vars(t).values()]
    key = plan.key
    return {
        "buffer_rows": key.num_buffer_rows,
        "leaf_rows": key.num_leaf_rows,
        "steps": plan.num_steps,
        "phases": " + ".join(f"{p.width}x{p.steps} ({p.edges} edges)" for p in key.phases) or "-",
        "table_mb": sum(a.nbytes for a in tables) / 2**20,
        "height": int(plan.height.max()),
    }


def run_workload(name, parent, repeats, forward=True):
    """Convert + plan (and the forward unless ``forward`` is False); returns (results, forest)."""
    n = parent.size
    rng = np.random.default_rng(1)
    data = {"tok": rng.integers(0, VOCAB, size=n).astype(np.int32)}
    res = {"name": name, "nodes": n}

    t_base, _ = timed(lambda: np.argsort(parent, kind="stable"), repeats)
    t_build, forest = timed(lambda: rj.Forest.from_parents(parent, data), repeats)
    t_plan, _ = timed(lambda: _planner.plan(forest.child_ptr, forest.child_idx), repeats)
    res.update(build_s=t_build, plan_s=t_plan, argsort_s=t_base, rss_after_build_mb=peak_rss_mb())
    res.update(plan_stats(forest))
    res["edges"] = int(forest.child_ptr[-1])
    print(f"[{name}] convert+plan {t_build:.3f} s (planner alone {t_plan:.3f} s, argsort baseline "
          f"{t_base:.4f} s), {res['steps']} steps, peak RSS {res['rss_after_build_mb']:.0f} MB", flush=True)
    if forward:
        run_forward(res, forest, data, repeats)
    return res, forest


def run_forward(res, forest, data, repeats):
    n = res["nodes"]
    p = make_params()
    run = jax.jit(cell.batch)
    t0 = time.perf_counter()
    jax.block_until_ready(run(p, forest))
    res["first_call_s"] = time.perf_counter() - t0  # trace + compile + one run
    t_fwd, out = timed(lambda: run(p, forest), repeats)
    res["forward_s"] = t_fwd
    assert np.isfinite(np.asarray(out)).all()

    flat = jax.jit(flat_cell)
    tok = jnp.asarray(data["tok"])
    jax.block_until_ready(flat(p, tok))
    res["flat_s"], _ = timed(lambda: flat(p, tok), repeats)
    res["rss_after_forward_mb"] = peak_rss_mb()
    print(f"[{res['name']}] forward {t_fwd:.3f} s ({n / t_fwd / 1e6:.2f} M nodes/s; first call "
          f"{res['first_call_s']:.2f} s), flat baseline {res['flat_s']:.4f} s, "
          f"peak RSS {res['rss_after_forward_mb']:.0f} MB", flush=True)


def check_small(parent):
    """The forward program agrees with eager recursion on a few small trees (sanity)."""
    n = parent.size
    tok = np.random.default_rng(1).integers(0, VOCAB, size=n).astype(np.int32)
    forest = rj.Forest.from_parents(parent, {"tok": tok})
    p = make_params()
    out = np.asarray(jax.jit(cell.batch)(p, forest))
    trees = {}
    for i in reversed(range(n)):  # children have larger ids in random_forest_parents
        trees[i] = rj.Tree({"tok": tok[i]}, [trees[j] for j in np.flatnonzero(parent == i)])
    for r in np.flatnonzero(parent < 0)[:3]:
        np.testing.assert_allclose(out[r], cell(p, trees[r]), atol=1e-5)


def run_only(args):
    """One workload in this process (so its peak RSS is its own); prints one JSON line."""
    if args.only == "forest":
        check_small(random_forest_parents(np.random.default_rng(5), 300)[0])
        parent, num_trees = random_forest_parents(np.random.default_rng(0), args.nodes)
        res, _ = run_workload(f"forest ({num_trees:,} trees)", parent, args.repeats)
        rows = [res]
    else:
        probe_n = min(5_000, args.chain)
        probe, _ = run_workload(f"chain probe ({probe_n:,})", np.arange(-1, probe_n - 1), args.repeats)
        chain_parent = np.arange(-1, args.chain - 1)
        res, chain_forest = run_workload("chain", chain_parent, args.repeats, forward=False)
        per_step = probe["forward_s"] / probe["steps"]
        res["estimate_s"] = per_step * res["steps"]
        if args.no_chain_forward or res["estimate_s"] > args.chain_limit:
            print(f"[chain] forward skipped: {res['steps']} steps x {per_step * 1e6:.1f} us/step "
                  f"= {res['estimate_s']:.0f} s estimated", flush=True)
        else:
            data = {"tok": np.random.default_rng(1).integers(0, VOCAB, size=args.chain).astype(np.int32)}
            run_forward(res, chain_forest, data, args.repeats)
        rows = [res, probe]
    print("RESULT " + json.dumps(rows), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1_000_000)
    ap.add_argument("--chain", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chain-limit", type=float, default=180.0, help="seconds allowed for the chain forward")
    ap.add_argument("--no-chain-forward", action="store_true")
    ap.add_argument("--only", choices=["forest", "chain"], help="run one workload in this process")
    args = ap.parse_args()
    if args.only:
        return run_only(args)

    print(f"date {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, JAX {jax.__version__}, "
          f"{jax.devices()[0].platform}", flush=True)
    t_start = time.perf_counter()
    rows = []
    for only in ("forest", "chain"):  # one process each: ru_maxrss is a per-process peak
        cmd = [sys.executable, __file__, "--only", only] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write("".join(l + "\n" for l in proc.stdout.splitlines() if not l.startswith("RESULT ")))
        if proc.returncode:
            sys.stdout.write(proc.stderr)
            return proc.returncode
        rows += json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])

    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s\n")
    print("| workload | nodes | height | steps | phases (width x steps) | plan tables | convert+plan | planner alone | argsort baseline | forward (median) | first call | flat baseline | peak RSS |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fwd = f"{r['forward_s']:.3f} s" if "forward_s" in r else f"skipped (est. {r.get('estimate_s', 0):.0f} s)"
        first = f"{r['first_call_s']:.2f} s" if "first_call_s" in r else "-"
        flat = f"{r['flat_s'] * 1e3:.1f} ms" if "flat_s" in r else "-"
        rss = r.get("rss_after_forward_mb", r["rss_after_build_mb"])
        print(f"| {r['name']} | {r['nodes']:,} | {r['height']:,} | {r['steps']:,} | {r['phases']} | "
              f"{r['table_mb']:.1f} MB | {r['build_s']:.3f} s | {r['plan_s']:.3f} s | {r['argsort_s'] * 1e3:.1f} ms | "
              f"{fwd} | {first} | {flat} | {rss:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
