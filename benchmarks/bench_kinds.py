"""Per-kind weights over Python ASTs: static ``node.kind`` (rows grouped by kind) against
one template that looks the weights up by a kind id stored in the node data.

Run (not part of the test suite)::

    python benchmarks/bench_kinds.py            # 128 functions, hidden 64 and 128
    python benchmarks/bench_kinds.py --quick

The model is a Child-Sum Tree-LSTM whose recurrent matrix depends on the node's AST kind
(114 kinds): ``h_sum @ U[kind]``. Both variants compute the same numbers (checked):

- *lookup*: one template for every node; ``p["U"][node.data["kind"]]`` gathers a
  ``[hidden, 3 hidden]`` matrix per row, and the product is a batch of matrix-vector
  products;
- *static*: ``p["U"][KIND[node.kind]]`` with ``node.kind`` a static string: the trace
  specialises per kind, the planner gives every step nodes of one kind, and the step runs
  that kind's template only (``lax.switch``), as one matrix-matrix product.

Measured in one process: plan time and steps, compile time, and the median of warm,
``block_until_ready``-ed forward and training steps; the ratio static/lookup.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import recjax as rj
from recjax.data import AST_KINDS, python_functions, with_ast_kinds

KIND = {name: i for i, name in enumerate(AST_KINDS)}


def cell(p, x, h_sum, U, forget):
    i, o, u = jnp.split(x @ p["W"] + h_sum @ U + p["b"], 3)
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + forget
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def children_terms(fn, p, node, x):
    zeros = jnp.zeros(p["W_f"].shape[1])
    h_sum = node.children.map(lambda c: fn(p, c)[0]).sum(initial=zeros)

    def forget(c):
        h, cc = fn(p, c)
        return jax.nn.sigmoid(x @ p["W_f"] + h @ p["U_f"]) * cc

    return h_sum, node.children.map(forget).sum(initial=zeros)


@rj.recursive
def lookup(p, node):
    x = p["emb"][node.data["kind"]]
    h_sum, forget = children_terms(lookup, p, node, x)
    return cell(p, x, h_sum, p["U"][node.data["kind"]], forget)


@rj.recursive
def static(p, node):
    x = p["emb"][node.data["kind"]]
    h_sum, forget = children_terms(static, p, node, x)
    return cell(p, x, h_sum, p["U"][KIND[node.kind]], forget)


def params(key, embed, hidden):
    k = jax.random.split(key, 5)
    n = lambda kk, shape, s: s * jax.random.normal(kk, shape)
    return {
        "emb": n(k[0], (len(AST_KINDS), embed), 1.0),
        "W": n(k[1], (embed, 3 * hidden), embed**-0.5),
        "U": n(k[2], (len(AST_KINDS), hidden, 3 * hidden), hidden**-0.5),
        "b": jnp.zeros(3 * hidden),
        "W_f": n(k[3], (embed, hidden), embed**-0.5),
        "U_f": n(k[4], (hidden, hidden), hidden**-0.5),
    }


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", type=int, default=128)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.functions, args.hidden, args.repeats = 32, [32], 3

    import argparse as argparse_module
    import json
    import textwrap

    trees = python_functions([json.decoder, textwrap, argparse_module])[: args.functions]
    kinded = [with_ast_kinds(t) for t in trees]
    start = time.perf_counter()
    plain = rj.Forest.from_trees(trees)
    plan_plain = time.perf_counter() - start
    start = time.perf_counter()
    grouped = rj.Forest.from_trees(kinded, kinds=AST_KINDS)
    plan_grouped = time.perf_counter() - start
    n = plain.num_nodes
    kinds_used = len(set(np.asarray(plain.data["kind"]).tolist()))
    print(f"{len(trees)} functions, {n} nodes, {kinds_used} kinds; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}")
    print(f"plan: lookup {plan_plain * 1e3:.1f} ms, {plain.plan.num_steps} steps; "
          f"static {plan_grouped * 1e3:.1f} ms, {grouped.plan.num_steps} steps "
          f"({len(grouped._meta.key.kinds)} internal kinds, "
          f"{len(grouped._meta.key.leaf_blocks)} leaf kinds)")
    print()
    print("| hidden | variant | compile fwd s | fwd ms | compile train s | train ms | fwd nodes/s | train nodes/s |")
    print("|---|---|---|---|---|---|---|---|")
    for hidden in args.hidden:
        p = params(jax.random.key(0), hidden, hidden)
        rows = {}
        for name, fn, forest in (("lookup", lookup, plain), ("static", static, grouped)):
            fwd = jax.jit(lambda p, f, fn=fn: fn.batch(p, f)[0])
            loss = lambda p, f, fn=fn: jnp.sum(fn.roots(p, f)[0] ** 2)
            train = jax.jit(jax.grad(loss))
            start = time.perf_counter()
            fwd_c = fwd.lower(p, forest).compile()
            compile_fwd = time.perf_counter() - start
            start = time.perf_counter()
            train_c = train.lower(p, forest).compile()
            compile_train = time.perf_counter() - start
            out = fwd_c(p, forest)
            t_fwd = timed(fwd_c, p, forest, repeats=args.repeats)
            t_train = timed(train_c, p, forest, repeats=args.repeats)
            rows[name] = (out, t_fwd, t_train)
            print(f"| {hidden} | {name} | {compile_fwd:.2f} | {t_fwd * 1e3:.2f} | {compile_train:.2f} "
                  f"| {t_train * 1e3:.2f} | {n / t_fwd:,.0f} | {n / t_train:,.0f} |")
        np.testing.assert_allclose(rows["static"][0], rows["lookup"][0], atol=1e-4, rtol=1e-4)
        print(f"| {hidden} | lookup / static time | | {rows['lookup'][1] / rows['static'][1]:.2f}x | "
              f"| {rows['lookup'][2] / rows['static'][2]:.2f}x | | |")


if __name__ == "__main__":
    main()
