"""Binary Tree-LSTM on SST-like trees: recjax against a per-node jitted JAX loop.

Run (not part of the test suite)::

    python benchmarks/bench_tree_lstm.py            # 256 trees, 7 repeats: about 45 s on 2 idle cores
    python benchmarks/bench_tree_lstm.py --quick    # 16 trees, 3 repeats: a smoke run

Everything is measured in one process, so the ratios hold even when absolute times drift
(shared machine): recjax's plan, trace, lower and compile times, its steady-state forward
and training step, a per-node baseline (one ``jax.jit``-ed cell per node kind, called
from a Python walk over the trees) and a FLOP ceiling from a matmul timed on the same machine.
Each steady-state number is the median of ``--repeats`` timed calls after warm-up, each
ending in ``jax.block_until_ready``. See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import recjax as rj

# The model, the trees, the per-node baseline and the timing helpers are shared with the
# pytest-benchmark suite (test_bench.py).
from _timing import (
    compile_aot,
    cpu_seconds,
    fmt_rate,
    fmt_ratio,
    matmul_seconds,
    median_seconds,
)
from _workloads import (
    EMBED,
    HIDDEN,
    VOCAB,
    JaxPerNode,
    binary_tree_lstm_model,
    count_nodes,
    make_params,
    sst_like_trees,
    tree_lstm,
)

SEED = 0
MODEL = binary_tree_lstm_model(EMBED, HIDDEN)

# Multiply-adds of one cell, counted as 2 FLOPs each: the leaf's x @ W ([300] @ [300, 450])
# and the internal node's [hl, hr] @ U ([300] @ [300, 750]). The elementwise gates are ignored.
LEAF_FLOPS = MODEL.leaf_flops
INTERNAL_FLOPS = MODEL.internal_flops
# A training step computes the forward matmul and two of the same size backward
# (the cotangent of the input and of the weights).
TRAIN_FLOP_FACTOR = 3


# ---------------------------------------------------------------------- baseline

# One jitted leaf cell and one jitted internal cell, called from a Python walk over each
# tree (the cells are the ones recjax compiles).
BASELINE = JaxPerNode(MODEL)
baseline_forward = BASELINE.forward  # every root's h, [num_trees, HIDDEN]
baseline_train = BASELINE.train  # jax.grad of the walk: not jitted, the walk is Python


def baseline_train_frozen_embedding(p, trees):
    """Reference only: the baseline's gradient without the embedding's.

    Each leaf's jitted cell has a dense ``[VOCAB, EMBED]`` embedding cotangent (a 24 MB
    scatter, then an add per leaf), which dominates the baseline training step; this
    variant shows what the per-node loop costs without it.
    """
    emb = p["emb"]
    cells = {k: v for k, v in p.items() if k != "emb"}
    return jax.grad(lambda c: BASELINE.loss({**c, "emb": emb}, trees))(cells)


# ---------------------------------------------------------------------- the run


def recjax_loss(p, forest):
    h, _ = tree_lstm.roots(p, forest)
    return jnp.sum(h ** 2)


def check_against_baseline(p, trees, h_all, roots, num_check):
    """Asserts recjax equals the per-node baseline: root h of the compiled forward program
    that is timed, and the training gradient on a small forest of the first trees."""
    sub = trees[:num_check]
    got = np.asarray(h_all)[np.asarray(roots)[:num_check]]
    want = np.asarray(baseline_forward(p, sub))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg="root h")
    max_err = float(np.abs(got - want).max())

    small = rj.Forest.from_trees(sub)
    got = jax.jit(jax.grad(recjax_loss))(p, small)
    want = baseline_train(p, sub)
    for name in p:
        g, w = np.asarray(got[name]), np.asarray(want[name])
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=1e-4 * scale, rtol=1e-3, err_msg=f"grad[{name!r}]")
    return max_err


def rate(n, seconds):
    return n / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="number of trees (default 256)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per median (default 7)")
    parser.add_argument("--baseline-trees", type=int, default=16,
                        help="trees the (slow) per-node baseline is timed on (default 16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: --batch 16 --repeats 3")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 16, 3
    num_base = min(args.baseline_trees, args.batch)

    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    print(f"# bench_tree_lstm  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"model: binary Tree-LSTM, embedding {EMBED}, hidden {HIDDEN}, vocabulary {VOCAB}, "
          f"float32; repeats {args.repeats} (median)")

    rng = np.random.default_rng(SEED)
    p = make_params(rng)
    trees = sst_like_trees(rng, args.batch)
    leaves, internal = count_nodes(trees)
    nodes = leaves + internal
    base_trees = trees[:num_base]
    base_leaves, base_internal = count_nodes(base_trees)
    base_nodes = base_leaves + base_internal

    # ---- FLOP ceiling, first sample (a second one is taken at the end; the faster counts)
    m, k, n = 1024, 3 * HIDDEN, 5 * HIDDEN
    mm_first_s = matmul_seconds(m, k, n, rng, args.repeats)

    # ---- plan (host): Forest.from_trees numbers the nodes, stacks the data and plans.
    plan_s = median_seconds(lambda: rj.Forest.from_trees(trees), args.repeats)
    forest = rj.Forest.from_trees(trees)
    key = forest.plan.key
    heights = forest.plan.height
    level_widths = np.bincount(heights)
    padded_internal = sum(ph.width * ph.steps for ph in key.phases)
    print(f"batch: {args.batch} trees, {nodes:,} nodes ({leaves:,} leaves, {internal:,} internal), "
          f"{len(level_widths) - 1} internal levels, widths {level_widths[1:].tolist()}")
    print(f"plan: {key.num_leaf_rows} leaf rows; phases (width x steps) "
          f"{[(ph.width, ph.steps) for ph in key.phases]}; {padded_internal:,} internal rows "
          f"computed for {internal:,} internal nodes (+{padded_internal / internal - 1:.0%})")

    # ---- recjax: trace / lower / compile (ahead of time, so each is timed on its own)
    fwd, fwd_c = compile_aot(jax.jit(lambda p, f: tree_lstm.batch(p, f)), p, forest)
    train, train_c = compile_aot(jax.jit(jax.grad(recjax_loss)), p, forest)

    # ---- correctness, once, before any steady-state timing, on the executable timed below
    t0 = time.perf_counter()
    h_all, _ = fwd(p, forest)
    num_check = min(4, args.batch)
    max_err = check_against_baseline(p, trees, h_all, forest.roots, num_check)
    print(f"check: recjax == per-node baseline on {num_check} trees: root h (max |diff| "
          f"{max_err:.1e}, atol 1e-4) and training gradient [{time.perf_counter() - t0:.1f} s]")

    # ---- recjax steady state
    fwd_s = median_seconds(lambda: fwd(p, forest), args.repeats)
    train_s = median_seconds(lambda: train(p, forest), args.repeats)

    # ---- baseline: per-node jitted cells, Python recursion, on the first trees
    base_fwd_s = median_seconds(lambda: baseline_forward(p, base_trees), args.repeats)
    base_train_s = median_seconds(lambda: baseline_train(p, base_trees), args.repeats)
    base_frozen_s = median_seconds(
        lambda: baseline_train_frozen_embedding(p, base_trees), args.repeats
    )

    # ---- FLOP ceiling: a matmul of the cells' size class, timed the same way
    mm_last_s = matmul_seconds(m, k, n, rng, args.repeats)
    mm_s = min(mm_first_s, mm_last_s)
    flops_per_s = 2 * m * k * n / mm_s
    fwd_flops = leaves * LEAF_FLOPS + internal * INTERNAL_FLOPS
    ceil_fwd = flops_per_s * nodes / fwd_flops
    ceil_train = ceil_fwd / TRAIN_FLOP_FACTOR
    padded_flops = key.num_leaf_rows * LEAF_FLOPS + padded_internal * INTERNAL_FLOPS

    cpu_end, wall_s = cpu_seconds(), time.perf_counter() - wall_start

    # ---- report
    r_fwd, r_train = rate(nodes, fwd_s), rate(nodes, train_s)
    b_fwd, b_train = rate(base_nodes, base_fwd_s), rate(base_nodes, base_train_s)
    print()
    print(f"| nodes/s (median of {args.repeats}) | recjax ({args.batch} trees) "
          f"| per-node jit baseline ({num_base} trees) | recjax / baseline "
          f"| FLOP ceiling | recjax % of ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| forward | {fmt_rate(r_fwd)} | {fmt_rate(b_fwd)} | {fmt_ratio(r_fwd / b_fwd)} "
          f"| {fmt_rate(ceil_fwd)} | {r_fwd / ceil_fwd:.0%} |")
    print(f"| training step | {fmt_rate(r_train)} | {fmt_rate(b_train)} | {fmt_ratio(r_train / b_train)} "
          f"| {fmt_rate(ceil_train)} | {r_train / ceil_train:.0%} |")
    print()
    print("| seconds | forward | training step |")
    print("|---|---:|---:|")
    print(f"| recjax steady state (median) | {fwd_s * 1e3:.1f} ms | {train_s * 1e3:.1f} ms |")
    print(f"| baseline steady state, {num_base} trees ({base_nodes} nodes) | "
          f"{base_fwd_s * 1e3:.1f} ms | {base_train_s * 1e3:.1f} ms |")
    print(f"| baseline training without the embedding gradient (reference) | "
          f"| {base_frozen_s * 1e3:.1f} ms ({fmt_rate(rate(base_nodes, base_frozen_s))} nodes/s) |")
    print(f"| recjax plan (`Forest.from_trees`, median) | {plan_s * 1e3:.1f} ms | |")
    for name in ("trace", "lower", "compile"):
        print(f"| recjax {name} | {fwd_c[name]:.2f} s | {train_c[name]:.2f} s |")
    print(f"| recjax first call after compile | {fwd_c['first_call'] * 1e3:.1f} ms "
          f"| {train_c['first_call'] * 1e3:.1f} ms |")
    print()
    print(f"matmul ({m}x{k}) @ ({k}x{n}) float32, median at start / end of the run: "
          f"{mm_first_s * 1e3:.3f} / {mm_last_s * 1e3:.3f} ms; ceiling uses the faster, "
          f"{flops_per_s / 1e9:.0f} GFLOP/s")
    print(f"cell FLOPs: {LEAF_FLOPS:,} per leaf, {INTERNAL_FLOPS:,} per internal node "
          f"(x{TRAIN_FLOP_FACTOR} for training); batch {fwd_flops / 1e9:.2f} GFLOP forward, "
          f"{padded_flops / 1e9:.2f} GFLOP counting recjax's padding rows "
          f"(+{padded_flops / fwd_flops - 1:.0%})")
    print(f"recjax achieved {fwd_flops / fwd_s / 1e9:.0f} GFLOP/s forward, "
          f"{TRAIN_FLOP_FACTOR * fwd_flops / train_s / 1e9:.0f} GFLOP/s training (real nodes only)")
    if cpu_start[0] is not None:
        others = (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])
        print(f"other processes used {max(others, 0.0):.1f} CPU-seconds during this "
              f"{wall_s:.0f} s run ({max(others, 0.0) / wall_s:.2f} of {os.cpu_count()} CPUs busy "
              f"on average; this process used {cpu_end[1] - cpu_start[1]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
