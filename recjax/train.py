"""Training utilities: a batch iterator that plans in the background.

The planner is numpy only, so a loader thread can plan the next batches while the
device computes the current one. ``batches`` does that, and groups trees of similar
size so that batches fall in few plan buckets (few compiled programs).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from ._forest import Forest
from ._tree import Tree


class Batch(NamedTuple):
    """One batch: a padded Forest and which input trees its roots are.

    ``forest.roots[i]`` is the root of ``trees[indices[i]]`` for ``i < len(indices)``;
    later roots are padding (``forest.root_mask`` is False there).
    """

    forest: Forest
    indices: np.ndarray


def tree_sizes(trees: Sequence[Tree]) -> np.ndarray:
    """Number of distinct nodes in each tree (iterative; a shared subtree counts once)."""
    sizes = np.zeros(len(trees), dtype=np.int64)
    for i, root in enumerate(trees):
        seen = {id(root)}
        stack = [root]
        while stack:
            for c in stack.pop().children:
                if id(c) not in seen:
                    seen.add(id(c))
                    stack.append(c)
        sizes[i] = len(seen)
    return sizes


def batches(
    trees: Sequence[Tree],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    group_by_size: bool = True,
    window: int = 16,
    prefetch: int = 2,
    sizes: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Yields one epoch of padded batches, planned in a background thread.

    Equivalent program (without the thread)::

      order = shuffle(range(len(trees)), seed, epoch)       # a new order every epoch
      if group_by_size: sort each run of window * batch_size trees by size
      groups = consecutive runs of batch_size trees, in a shuffled order
      for every `window` groups: forests = Forest.pad_all([Forest.from_trees(g) ...])
      yield Batch(forest, indices) for each

    Batches padded together share one compiled program; grouping by size keeps the
    padding small and the number of distinct shapes low. At most ``prefetch`` windows
    are planned ahead. An exception in the loader thread is raised here.

    Args:
      trees: the dataset.
      batch_size: trees per batch (the last batch of the epoch may hold fewer).
      seed, epoch: the shuffle is a function of both, so epochs differ and repeat.
      group_by_size: sort trees by size within each window before batching.
      window: batches padded together (one shape per window).
      prefetch: windows planned ahead of the consumer.
      sizes: precomputed ``tree_sizes(trees)`` (computed when needed and not given).

    Example:
      >>> import recjax as rj
      >>> from recjax.train import batches
      >>> trees = [rj.Tree(1.0, [rj.Tree(2.0)] * k) for k in range(10)]
      >>> sorted(b.indices.size for b in batches(trees, 4, seed=1))
      [2, 4, 4]
    """
    if batch_size < 1 or window < 1 or prefetch < 1:
        raise ValueError("batch_size, window and prefetch must be at least 1.")
    if not len(trees):
        raise ValueError("batches: no trees.")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(trees))
    span = window * batch_size
    if group_by_size:
        sizes = tree_sizes(trees) if sizes is None else np.asarray(sizes)
        for start in range(0, order.size, span):
            chunk = order[start : start + span]
            order[start : start + span] = chunk[np.argsort(sizes[chunk], kind="stable")]
    groups = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    windows = [groups[i : i + window] for i in range(0, len(groups), window)]
    for w in windows:  # batch order within a window is shuffled too
        rng.shuffle(w)

    def plan_window(w):
        forests = Forest.pad_all([Forest.from_trees([trees[j] for j in g]) for g in w])
        return [Batch(f, g) for f, g in zip(forests, w)]

    yield from _background(plan_window, windows, prefetch)


_DONE = object()


def _background(fn, items, depth) -> Iterator:
    """``for x in items: yield from fn(x)``, with ``fn`` running ahead in a thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(("ok", fn(item)))
            q.put(("ok", _DONE))
        except BaseException as e:  # handed to the consumer, raised there
            q.put(("error", e))

    thread = threading.Thread(target=work, name="recjax-planner", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if value is _DONE:
                return
            yield from value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
