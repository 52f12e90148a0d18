"""How much of the FLOP ceiling a plan's own matrix products allow: the forward's
products timed alone at the plan's row counts, against recjax's whole forward.

Run (not part of the test suite)::

    python benchmarks/bench_plan_products.py                 # sst, ast, full_fc, full_lstm at batch 256
    python benchmarks/bench_plan_products.py ast --batch 32

The suite's "% of ceiling" divides a batch's real-node matmul FLOPs by the throughput of
one ``[1024, k] @ [k, n]`` product. A plan computes its products at other row counts
(leaf blocks of up to ``LEAF_BLOCK`` rows, steps of 8-512 rows, a step's edge slots) and
on padding rows too, and small products run slower. This script times each product of
the cell (``Model.leaf_products``, ``internal_products``, ``edge_products``) at every row
count the plan uses, inside a ``lax.scan`` over distinct inputs whose output is carried
(it stays in cache, as a level loop's step output does), and sums them as the plan
runs them. That sum is what any program executing this plan spends in matrix products
alone; the rest of recjax's forward time is everything else (gathers, gates, row writes,
buffer creation, the node-order readout).

Printed per workload, all measured in one process (medians of alternated rounds): the
ideal time (real-node FLOPs at the ceiling), the products at the plan's shapes and the
fraction of the ceiling they allow, recjax's forward (``batch``, as the suite times it,
and ``roots``) with its fraction, and the products' share of the forward.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
from jax import lax

import recjax as rj
from recjax._executor import LEAF_BLOCK

from _timing import matmul_flops_per_s, median_seconds
from _workloads import WORKLOADS, count_nodes

#: Products per timed scan: each call runs this many, on distinct inputs.
SCAN_LENGTH = 32


def leaf_block_rows(num_leaf_rows: int) -> list[int]:
    """The row counts of the leaves' batched ops, as ``recjax._executor._in_blocks`` splits
    them: one op up to two blocks, else full blocks and the rest."""
    if num_leaf_rows <= 2 * LEAF_BLOCK:
        return [num_leaf_rows] if num_leaf_rows else []
    full, rest = divmod(num_leaf_rows, LEAF_BLOCK)
    return [LEAF_BLOCK] * full + ([rest] if rest else [])


@functools.cache
def product_seconds(m: int, k: int, n: int) -> float:
    """Seconds of one ``[m, k] @ [k, n]`` float32 product inside a ``lax.scan``."""
    x = jax.random.normal(jax.random.key(0), (SCAN_LENGTH, m, k), jnp.float32)
    w = jnp.full((k, n), 0.01, jnp.float32)

    def products(x, w):
        # the carry keeps every product live without stacking the outputs
        return lax.scan(lambda c, xt: (xt @ w + 0.5 * c, None), jnp.zeros((m, n), jnp.float32), x)[0]

    compiled = jax.jit(products).lower(x, w).compile()
    return median_seconds(lambda: compiled(x, w).block_until_ready(), 15) / SCAN_LENGTH


def plan_product_seconds(model, key) -> float:
    """The forward's matrix products, summed as the plan ``key`` runs them."""
    total = sum(
        product_seconds(rows, k, n)
        for rows in leaf_block_rows(key.num_leaf_rows)
        for k, n in model.leaf_products
    )
    for phase in key.phases:
        step = sum(product_seconds(phase.width, k, n) for k, n in model.internal_products)
        step += sum(product_seconds(phase.edges, k, n) for k, n in model.edge_products)
        total += phase.steps * step
    return total


def measure(name: str, batch: int, rounds: int) -> dict:
    workload = WORKLOADS[name]
    model = workload.model
    trees = workload.make_trees(batch)
    params = workload.make_params()
    forest = rj.Forest.from_trees(trees)
    key = forest._meta.key
    leaves, internal = count_nodes(trees)
    flops = model.flops(leaves, internal, leaves + internal - len(trees))
    programs = {
        "batch": jax.jit(lambda p, f: model.recursive.batch(p, f)).lower(params, forest).compile(),
        "roots": jax.jit(lambda p, f: model.recursive.roots(p, f)).lower(params, forest).compile(),
    }
    k, n = model.ceiling_shape
    times = {"batch": [], "roots": [], "products": [], "ceiling": []}
    for _ in range(rounds):
        for what, compiled in programs.items():
            call = lambda: jax.block_until_ready(compiled(params, forest))
            times[what].append(median_seconds(call, 10))
        product_seconds.cache_clear()
        times["products"].append(plan_product_seconds(model, key))
        times["ceiling"].append(matmul_flops_per_s(k, n))
    med = {what: statistics.median(v) for what, v in times.items()}
    ideal = flops / med["ceiling"]
    plan = " + ".join(f"{p.width}x{p.steps}" for p in key.phases)
    return {
        "workload": name, "batch": batch, "nodes": leaves + internal,
        "plan": f"{key.num_leaf_rows} leaf rows, {plan}",
        "ceiling": med["ceiling"], "ideal": ideal, "products": med["products"],
        "batch_s": med["batch"], "roots_s": med["roots"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["sst", "ast", "full_fc", "full_lstm"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        "| workload | batch | plan | ceiling GFLOP/s | ideal | products at the plan's shapes "
        "(% of ceiling they allow) | recjax `batch` (% of ceiling) | `roots` | products' share of `batch` |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    ms = lambda s: f"{s * 1e3:.1f} ms"
    for name in args.workloads:
        r = measure(name, args.batch, args.rounds)
        pct = lambda s: f"{r['ideal'] / s:.0%}"
        print(
            f"| {name} | {r['batch']} | {r['plan']} | {r['ceiling'] / 1e9:.0f} | {ms(r['ideal'])} "
            f"| {ms(r['products'])} ({pct(r['products'])}) | {ms(r['batch_s'])} ({pct(r['batch_s'])}) "
            f"| {ms(r['roots_s'])} ({pct(r['roots_s'])}) | {r['products'] / r['batch_s']:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
