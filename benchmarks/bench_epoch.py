"""Training epochs over 8,544 SST-like trees in batches of 32: compiles, padding, loader waits.

Run (not part of the test suite)::

    python benchmarks/bench_epoch.py              # 3 epochs, both batching policies
    python benchmarks/bench_epoch.py --epochs 1 --trees 2000

The performance issue's targets: an epoch compiles at most 3 programs, the first compile
takes under 3 s, and planning is never what the device waits for. The loop is ``fit``'s
(its loader planning in a background thread, the jitted ``_train_step``),
with every step ``block_until_ready``-ed so that the time spent waiting for the next batch
is time the device had nothing to do. Two policies in one process, each with its own
loss function (so they share no compiled programs):

- *shared shapes* (``fit``'s default): windows of 16 batches padded together, and the
  epochs share the list of shapes, so a window that fits in an earlier shape (at most
  1.25 times its rows) reuses its program;
- *per-window shapes* (the baseline): windows of 16, each padded to its own union.

Reported per epoch: new shapes (= compiles), their first-call seconds (trace + compile
+ run), the median steady step, the loader waits, rows computed per real node.
The first shape is also compiled ahead of time with trace / lower / compile timed apart.

Batches are cut out of one walk of the dataset (``train._dataset_table``), as ``fit``
plans them. The loader's CPU per batch is reported both ways, cut from that table and
converted tree by tree as ``batches`` does (the baseline), on the same windows.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _timing import cpu_seconds  # noqa: E402
from _workloads import make_params, sst_like_trees, tree_lstm  # noqa: E402

from recjax import train  # noqa: E402
from recjax._forest import Forest  # noqa: E402
from recjax.train import masked_mean  # noqa: E402


def make_loss():
    """A fresh root-classification loss (a new function: its own compiled programs)."""

    def loss_fn(p, forest, labels):
        h, _ = tree_lstm.roots(p, forest)
        logits = h @ p["out"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
        return masked_mean(nll, forest.root_mask)

    return loss_fn


def loader_cpu_ms(trees, table, window, rounds=3):
    """Median loader CPU (thread time) per batch of 32 over every window of an epoch:
    cut from ``table`` as ``fit`` does, and converted tree by tree as ``batches`` does."""
    order = np.random.default_rng(1).permutation(len(trees))
    groups = [order[i : i + 32] for i in range(0, order.size, 32)]
    cut, walked = [], []
    for _ in range(rounds):
        for start in range(0, len(groups), window):
            w = groups[start : start + window]
            t0 = time.thread_time()
            Forest._pad_parts([table.arrays(g) for g in w], None, [])
            t1 = time.thread_time()
            Forest._pad_trees([[trees[j] for j in g] for g in w], None, [])
            t2 = time.thread_time()
            cut.append(1e3 * (t1 - t0) / len(w))
            walked.append(1e3 * (t2 - t1) / len(w))
    return statistics.median(cut), statistics.median(walked)


def run_policy(name, trees, table, labels, params, epochs, shared, window, aot=False):
    loss_fn, opt = make_loss(), optax.adagrad(0.05)
    state = opt.init(params)
    shapes: list | None = [] if shared else None
    seen = set()
    report = []
    for epoch in range(epochs):
        it = train._batches(  # what fit iterates
            trees, 32, table, seed=0, epoch=epoch, group_by_size=False, window=window,
            prefetch=2, sizes=None, shapes=shapes, kinds=None,
        )
        waits, steps, compiles, rows, real = [], [], [], 0, 0
        t_epoch = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            b = next(it, None)
            waits.append(time.perf_counter() - t0)
            if b is None:
                break
            rows_b = train._root_rows(labels, b)
            shape = (b.forest._meta, b.forest.roots.shape)
            if aot and not seen:
                t1 = time.perf_counter()
                traced = train._train_step.trace(loss_fn, opt, params, state, b.forest, rows_b)
                t2 = time.perf_counter()
                lowered = traced.lower()
                t3 = time.perf_counter()
                lowered.compile()
                aot_s = {"trace": t2 - t1, "lower": t3 - t2, "compile": time.perf_counter() - t3}
                print(f"  {name}: first shape ahead of time: trace {aot_s['trace']:.2f} s, lower "
                      f"{aot_s['lower']:.2f} s, compile {aot_s['compile']:.2f} s", flush=True)
            t0 = time.perf_counter()
            params, state, loss = jax.block_until_ready(
                train._train_step(loss_fn, opt, params, state, b.forest, rows_b)
            )
            dt = time.perf_counter() - t0
            (steps if shape in seen else compiles).append(dt)
            seen.add(shape)
            rows += b.forest.plan.key.num_buffer_rows
            real += int(np.count_nonzero(b.forest.node_mask))
        report.append({
            "epoch": epoch + 1,
            "compiles": len(compiles),
            "compile_s": compiles,
            "step_ms": 1e3 * statistics.median(steps) if steps else float("nan"),
            "wait_s": sum(waits[1:]),  # the first wait is the loader's start-up
            "first_wait_s": waits[0],
            "waits_over_1ms": sum(w > 1e-3 for w in waits[1:]),
            "epoch_s": time.perf_counter() - t_epoch,
            "rows_per_real": rows / real,
            "nodes_per_s": real / (time.perf_counter() - t_epoch),
            "loss": float(loss),
        })
        r = report[-1]
        print(f"  {name} epoch {r['epoch']}: {r['compiles']} compiles "
              f"({', '.join(f'{s:.2f}' for s in compiles)} s), step {r['step_ms']:.1f} ms, "
              f"loader waits {r['wait_s']:.2f} s ({r['waits_over_1ms']} over 1 ms; start-up "
              f"{r['first_wait_s']:.2f} s), epoch {r['epoch_s']:.1f} s, rows/real "
              f"{r['rows_per_real']:.2f}", flush=True)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", type=int, default=8544)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--window", type=int, default=16)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    trees = sst_like_trees(rng, args.trees)
    nodes = int(train.tree_sizes(trees).sum())
    print(f"{args.trees} SST-like trees, {nodes} nodes ({time.perf_counter() - t0:.1f} s to "
          f"generate); JAX {jax.__version__}, {jax.devices()[0].platform}", flush=True)
    labels = rng.integers(5, size=args.trees).astype(np.int32)
    params = make_params(np.random.default_rng(0))
    params["out"] = jnp.asarray(0.1 * rng.standard_normal((150, 5)), jnp.float32)

    t0 = time.perf_counter()
    table = train._dataset_table(trees, None)
    print(f"one walk of the dataset (fit's check and table): {time.perf_counter() - t0:.2f} s")
    cut, walked = loader_cpu_ms(trees, table, args.window)
    print(f"loader CPU per batch of 32: cut from the table {cut:.2f} ms, tree by tree "
          f"{walked:.2f} ms ({walked / cut:.2f}x)", flush=True)

    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    results = {}
    for name, shared, aot in (("shared shapes", True, True), ("per-window shapes", False, False)):
        results[name] = run_policy(
            name, trees, table, labels, params, args.epochs, shared, args.window, aot
        )
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()
    if busy0 is not None:
        print(f"wall {wall:.0f} s; CPU-seconds used by other processes: "
              f"{(busy1 - busy0) - (own1 - own0):.0f}")

    print("\n| policy | epoch | compiles | first calls (s) | step median (ms) | loader waits (s) "
          "| epoch (s) | rows / real node | nodes/s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, report in results.items():
        for r in report:
            print(f"| {name} | {r['epoch']} | {r['compiles']} | "
                  f"{', '.join(f'{s:.2f}' for s in r['compile_s']) or '-'} | {r['step_ms']:.1f} | "
                  f"{r['wait_s']:.2f} | {r['epoch_s']:.1f} | {r['rows_per_real']:.2f} | "
                  f"{r['nodes_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
