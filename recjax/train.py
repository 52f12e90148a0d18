"""Training utilities: a background-planning batch iterator and a training loop.

The planner is numpy only, so a loader thread can plan the next batches while the
device computes the current one. ``batches`` does that, and groups trees of similar
size so that batches fall in few plan buckets (few compiled programs).

``fit`` is a complete training loop on top of it: one jitted step per batch shape, a
progress bar, evaluation and resumable atomic checkpoints after every epoch. The loss
and metric helpers (``masked_mean``, ``root_accuracy``, ``node_accuracy``,
``binary_root_accuracy``) mask the padding that ``batches`` adds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from ._forest import Forest, _TreeTable
from ._tree import Tree


class Batch(NamedTuple):
    """One batch: a padded Forest and which input trees its roots are.

    ``forest.roots[i]`` is the root of ``trees[indices[i]]`` (of the tree rooted at
    ``roots[indices[i]]`` when the dataset is a Forest) for ``i < len(indices)``; later
    roots are padding (``forest.root_mask`` is False there).
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
    trees: Sequence[Tree] | Forest,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    group_by_size: bool = False,
    window: int = 16,
    prefetch: int = 2,
    sizes: np.ndarray | None = None,
    shapes: list | None = None,
    kinds: Sequence[str] | None = None,
) -> Iterator[Batch]:
    """Yields one epoch of padded batches, planned in a background thread.

    Equivalent program (without the thread)::

      order = shuffle(range(len(trees)), seed, epoch)       # a new order every epoch
      if group_by_size: sort each run of window * batch_size trees by size
      groups = consecutive runs of batch_size trees, in a shuffled order
      for every `window` groups:
          forests = Forest.pad_all([Forest.from_trees(g, kinds) ...], shapes)
          yield Batch(forest, indices) for each

    Batches padded together share one compiled program, and a window that fits in a
    shape padded to before (at most 1.25 times its rows, see ``Forest.pad_all``) reuses
    it. A batch's cost is its forest's level widths, so random batches, whose totals are
    alike, pad together tightly: measured on 8,544 SST-like trees in batches of 32
    (benchmarks/RESULTS.md), random batches in windows of 16 compute 1.55 rows per real
    node with 3 distinct shapes over 3 epochs (2, 1 and 0 new when the epochs share
    ``shapes``), while sorting by size inside the window (``group_by_size=True``) puts
    small and large batches in one window and computes about twice as many. At most
    ``prefetch`` windows are planned ahead. An exception in the loader thread is
    raised here.

    Args:
      trees: the dataset: ``Tree`` objects, or a Forest of many trees as
        ``Forest.from_trees``, ``from_parents`` or ``from_children`` returned it (not
        padded, each node in one tree), whose tree ``i`` is ``roots[i]``. A Forest's
        batches are cut out of its arrays with numpy, without walking Python objects
        (planning 1.5-2x faster at batch 32, 3.6x at 256: benchmarks/RESULTS.md);
        ``kinds`` is then its own.
      batch_size: trees per batch (the last batch of the epoch may hold fewer).
      seed, epoch: the shuffle is a function of both, so epochs differ and repeat.
      group_by_size: sort trees by size within each window before batching (fewer
        sequential steps for deep trees when ``window`` is 1; more padding otherwise).
      window: batches padded together (one shape per window).
      prefetch: windows planned ahead of the consumer.
      sizes: precomputed ``tree_sizes(trees)`` (computed when needed and not given).
      shapes: the list of shapes earlier epochs padded to, updated in place (see
        ``Forest.pad_all``); pass one list to every epoch. Default: a new list.
      kinds: the vocabulary of node kinds, for trees with ``Tree.kind`` (see
        ``Forest.from_trees``): one list for every batch and epoch.

    Example:
      >>> import recjax as rj
      >>> from recjax.train import batches
      >>> trees = [rj.Tree(1.0, [rj.Tree(2.0)] * k) for k in range(10)]
      >>> sorted(b.indices.size for b in batches(trees, 4, seed=1))
      [2, 4, 4]
      >>> forest = rj.Forest.from_parents([-1, 0, -1, 2, 2, -1])   # three trees as arrays
      >>> [b.indices.tolist() for b in batches(forest, 2)]
      [[1], [2, 0]]
    """
    table = None
    if isinstance(trees, Forest):
        table, kinds = _forest_table(trees, kinds, "batches")
    return _batches(
        trees, batch_size, table, seed=seed, epoch=epoch, group_by_size=group_by_size,
        window=window, prefetch=prefetch, sizes=sizes, shapes=shapes, kinds=kinds,
    )


def _batches(
    trees, batch_size, table: _TreeTable | None, *, seed, epoch, group_by_size, window,
    prefetch, sizes, shapes, kinds,
) -> Iterator[Batch]:
    """``batches``, converting each batch from ``table`` (``trees``' ``_TreeTable``) when
    one is given rather than walking its trees."""
    if batch_size < 1 or window < 1 or prefetch < 1:
        raise ValueError("batch_size, window and prefetch must be at least 1.")
    num_trees = len(trees) if table is None else table.start.size
    if not num_trees:
        raise ValueError("batches: no trees.")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_trees)
    span = window * batch_size
    if group_by_size:
        if sizes is None:
            sizes = tree_sizes(trees) if table is None else table.sizes
        sizes = np.asarray(sizes)
        for start in range(0, order.size, span):
            chunk = order[start : start + span]
            order[start : start + span] = chunk[np.argsort(sizes[chunk], kind="stable")]
    groups = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    windows = [groups[i : i + window] for i in range(0, len(groups), window)]
    for w in windows:  # batch order within a window is shuffled too
        rng.shuffle(w)

    shapes = [] if shapes is None else shapes  # appended to by the loader thread only

    def plan_window(w):
        try:
            if table is None:
                forests = Forest._pad_trees([[trees[j] for j in g] for g in w], kinds, shapes)
            else:
                forests = Forest._pad_parts([table.arrays(g) for g in w], kinds, shapes)
        except (ValueError, TypeError) as e:
            if isinstance(trees, Forest):  # checked when it was built: not expected
                raise
            raise _naming_the_tree(e, trees, np.concatenate(w), kinds) from None
        return [Batch(f, g) for f, g in zip(forests, w)]

    yield from _background(plan_window, windows, prefetch)


def _forest_table(
    forest: Forest, kinds, where: str, training: bool = False
) -> tuple[_TreeTable, list | None]:
    """A Forest given as the dataset, checked, as a ``_TreeTable`` of its trees; and the
    kinds vocabulary its batches take (the Forest's own). ``training``: ``kinds`` is the
    training set's vocabulary (``fit``'s evaluation Forest must have it), not an argument."""
    forest._check_not_stacked(where)
    own = forest._meta.kinds
    if forest.child_ptr is None or (own is not None and forest._kind is None):
        raise ValueError(
            f"{where}: this Forest has lost its host-side structure (it went through "
            "jax.tree.map, device_put or a transformation); pass the Forest that "
            "Forest.from_trees, from_parents or from_children returned."
        )
    if not (np.all(forest.node_mask) and np.all(forest.root_mask)):
        raise ValueError(
            f"{where}: this Forest is padded (node_mask or root_mask has False entries); "
            "pass it as Forest.from_trees, from_parents or from_children returned it, "
            "before padded() or pad_all(): each batch is padded on its own."
        )
    if forest._meta.cross_tree_node >= 0:
        raise ValueError(
            f"{where}: node {forest._meta.cross_tree_node} of this Forest belongs to "
            "several trees, and a batch holds whole trees; give each tree its own copy "
            "of the nodes it shares (or pass the Tree objects, which are batched tree "
            "by tree)."
        )
    if training and (None if kinds is None else tuple(kinds)) != own:
        raise ValueError(
            f"{where}: this Forest's kinds vocabulary ({None if own is None else list(own)}) "
            f"differs from the training set's ({None if kinds is None else list(kinds)}); "
            "build the training and evaluation sets with one kinds= list."
        )
    if kinds is not None and (own is None or tuple(kinds) != own):
        raise ValueError(
            f"{where}: kinds={list(kinds)} differs from this Forest's vocabulary "
            f"({None if own is None else list(own)}); leave kinds= out: a Forest's "
            "batches take its own."
        )
    return _TreeTable.of_forest(forest), None if own is None else list(own)


def _dataset_table(trees: list[Tree], kinds) -> _TreeTable | None:
    """The training trees walked once (``fit`` plans every epoch's batches from it), or
    None when a node is in several trees. A tree the walk refuses is named by
    ``_check_trees``, as ``batches`` would name it."""
    try:
        return _TreeTable.build(trees, kinds)
    except (ValueError, TypeError):
        _check_trees(trees, kinds, "trees")  # raises, naming the tree
        return None  # not expected: then plan as batches does, tree by tree


def _check_trees(trees: list[Tree], kinds, name: str, reference=None, chunk: int = 2048):
    """Refuses a tree that planning a batch would refuse, before any training.

    Chunks of trees are walked as ``Forest.from_trees`` walks them (no plans), and each
    chunk's node data must have the first chunk's structure, shapes and dtypes (or
    ``reference``'s: the training trees' for the evaluation trees). An error names the
    tree by its position in ``trees``, as ``batches`` does. Returns the data's layout.
    """
    for start in range(0, len(trees), chunk):
        indices = np.arange(start, min(start + chunk, len(trees)))
        try:
            layout = Forest._check_trees([trees[j] for j in indices], kinds)
        except (ValueError, TypeError) as e:
            raise _naming_the_tree(e, trees, indices, kinds, "fit", name) from None
        if reference is None:
            reference = layout
        elif layout != reference:
            if start > 0:  # some tree of this chunk differs from trees[0]: name it
                error = ValueError(f"fit: {name}: node data differ between trees.")
                raise _naming_the_tree(error, trees, np.concatenate([[0], indices]), kinds, "fit", name)
            raise _layouts_differ(name, layout, reference)
    return reference


def _layouts_differ(name, layout, reference) -> ValueError:
    return ValueError(
        f"fit: the node data of {name} differ from the training trees' "
        f"(structure {layout[0]} with (dtype, shape) {list(layout[1])}, against "
        f"{reference[0]} with {list(reference[1])}); give both the same fields, "
        "shapes and dtypes."
    )


def _naming_the_tree(error, trees, indices, kinds, caller="batches", name="trees"):
    """``error`` (raised by a window's forest, whose node ids are the window's) re-raised
    for the first tree that fails alone, or against the window's first tree (a schema that
    differs between trees): node ids then count within that tree, or that pair."""
    first = int(indices[0])
    for j in map(int, indices):
        for pair in ([j], [j, first]):
            try:
                Forest.from_trees([trees[k] for k in pair], kinds=kinds)
            except (ValueError, TypeError) as e:
                who = f"{name}[{j}]" if len(pair) == 1 else (
                    f"{name}[{j}] does not match {name}[{first}] (nodes numbered in "
                    f"pre-order, {name}[{j}]'s first)"
                )
                return type(e)(f"{caller}: {who}: {e}")
    return error


# ---------------------------------------------------------------------- losses and metrics


def masked_mean(values: Any, mask: Any) -> jax.Array:
    """Mean of ``values`` over the rows where ``mask`` is True; 0 when no row is.

    Equivalent to ``np.mean(values[mask])`` (every element of the kept rows counts),
    written with ``jnp.where`` so that it is jittable and the padding rows' values and
    gradients never reach the result. Use it for losses over a padded Forest: per root
    with ``forest.root_mask``, per node with ``forest.node_mask``.

    Args:
      values: ``[N, ...]`` array, one row per root or per node.
      mask: ``[N]`` bool array.

    Example:
      >>> import jax.numpy as jnp
      >>> float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False])))
      2.0
    """
    values, mask = jnp.asarray(values), jnp.asarray(mask)
    if mask.ndim != 1 or values.shape[:1] != mask.shape:
        raise ValueError(
            f"masked_mean: mask must be 1-D with one entry per row of values; got values of "
            f"shape {values.shape} and mask of shape {mask.shape}."
        )
    mask = mask.astype(bool)
    per_row = int(np.prod(values.shape[1:], dtype=np.int64))
    total = jnp.sum(jnp.where(mask.reshape(mask.shape + (1,) * (values.ndim - 1)), values, 0))
    count = jnp.sum(mask) * per_row
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _check_rows(logits, labels, mask, name):
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or labels.shape != np.shape(mask):
        raise ValueError(
            f"{name}: expected logits [M, classes] and labels [M] with M = {np.shape(mask)[0]} "
            f"(one row per entry of the mask); got logits {logits.shape} and labels {labels.shape}."
        )
    return logits, labels


def _count(hit, keep):
    """``(sum(hit & keep), sum(keep))`` as int32 scalars."""
    return jnp.sum(hit & keep, dtype=jnp.int32), jnp.sum(keep, dtype=jnp.int32)


def _accuracy(logits, labels, mask, name):
    logits, labels = _check_rows(logits, labels, mask, name)
    return _count(jnp.argmax(logits, axis=-1) == labels, mask)


def root_accuracy(logits: Any, labels: Any, forest: Forest) -> tuple[jax.Array, jax.Array]:
    """``(correct, count)`` of argmax predictions over the real roots of a padded Forest.

    Equivalent to ``correct = sum(argmax(logits[i]) == labels[i] for real roots i)`` and
    ``count`` = the number of real roots (``forest.root_mask``). Return the pair from an
    ``eval_fn``: ``fit`` sums both over the evaluation batches and reports the ratio.

    Args:
      logits: ``[len(forest.roots), classes]``, e.g. from ``fn.roots(...)``.
      labels: ``[len(forest.roots)]`` integer classes, e.g. the ``labels`` row of ``fit``.
      forest: the (padded) batch.

    Example:
      >>> import jax.numpy as jnp, recjax as rj
      >>> f = rj.Forest.from_parents([-1] * 5, {"x": [0.0] * 5}).padded()  # 6 roots, 1 padding
      >>> logits = jnp.eye(2)[jnp.array([1, 0, 1, 1, 0, 1])]  # predicts 1, 0, 1, 1, 0, (1)
      >>> [int(x) for x in root_accuracy(logits, jnp.array([1, 1, 1, 0, 0, 1]), f)]
      [3, 5]
    """
    return _accuracy(logits, labels, forest.root_mask, "root_accuracy")


def node_accuracy(logits: Any, labels: Any, forest: Forest) -> tuple[jax.Array, jax.Array]:
    """``(correct, count)`` of argmax predictions over the real nodes of a padded Forest.

    Like ``root_accuracy`` with one row per node, masked by ``forest.node_mask`` (for
    example SST's every-phrase accuracy, labels in ``forest.data["label"]``).

    Example:
      >>> import jax.numpy as jnp, recjax as rj
      >>> f = rj.Forest.from_parents([-1, 0, 0, 1, 1], {"label": [1, 0, 1, 1, 0]}).padded()
      >>> logits = jnp.zeros((f.num_nodes, 2)).at[:, 1].set(1.0)  # predicts class 1 everywhere
      >>> [int(x) for x in node_accuracy(logits, f.data["label"], f)]
      [3, 5]
    """
    return _accuracy(logits, labels, forest.node_mask, "node_accuracy")


def binary_root_accuracy(logits: Any, labels: Any, forest: Forest) -> tuple[jax.Array, jax.Array]:
    """``(correct, count)`` of negative/positive predictions at the real, non-neutral roots.

    For SST-style 5-class sentiment (0, 1 negative; 2 neutral; 3, 4 positive) scored as
    the binary task: roots labelled 2 are left out, the true class is ``label >= 3``, and
    the prediction is positive when the softmax puts more mass on classes 3-4 than on
    0-1 (so a 5-class model is scored without retraining). Equivalent to::

      keep = root_mask & (labels != 2)
      p = softmax(logits)
      correct = sum((p[:, 3:].sum(1) > p[:, :2].sum(1)) == (labels >= 3) over keep)
      count = sum(keep)

    Args:
      logits: ``[len(forest.roots), 5]``.
      labels: ``[len(forest.roots)]`` integers 0-4.
      forest: the (padded) batch.

    Example:
      >>> import jax.numpy as jnp, recjax as rj
      >>> f = rj.Forest.from_parents([-1, -1, -1], {"x": [0.0] * 3}).padded()
      >>> logits = jnp.array([[3.0, 0, 0, 0, 0], [0, 0, 9, 0, 1], [0, 0, 0, 0, 3]])
      >>> [int(x) for x in binary_root_accuracy(logits, jnp.array([1, 2, 1]), f)]
      [1, 2]
    """
    logits, labels = _check_rows(logits, labels, forest.root_mask, "binary_root_accuracy")
    if logits.shape[1] != 5:
        raise ValueError(
            f"binary_root_accuracy expects [roots, 5] logits (SST's 5 classes); got {logits.shape}."
        )
    positive = jax.nn.logsumexp(logits[:, 3:], axis=-1) > jax.nn.logsumexp(logits[:, :2], axis=-1)
    return _count(positive == (labels >= 3), forest.root_mask & (labels != 2))


# ---------------------------------------------------------------------- the training loop


class FitResult(NamedTuple):
    """What ``fit`` returns: the trained state and one dict per epoch.

    Each ``history`` entry: ``epoch`` (1-based), ``loss`` (mean of the epoch's batch
    losses), ``metrics`` (``{name: sum / count}`` from ``eval_fn``; ``{}`` without one),
    ``nodes_per_s`` (real nodes trained on per second of the epoch's training, compilation
    included), ``seconds`` (training plus evaluation) and ``new_shapes`` (batch shapes
    first padded to in the epoch, so train-step programs it compiled unless an earlier
    ``fit`` with the same ``loss_fn`` and ``optimizer`` compiled them). Entries are plain
    numbers, so the history is JSON.

    Example:
      >>> FitResult(params={"w": 1.0}, opt_state=(), history=[])._fields
      ('params', 'opt_state', 'history')
    """

    params: Any
    opt_state: Any
    history: list


#: The file name of ``fit``'s checkpoint inside ``checkpoint_dir``.
CHECKPOINT_FILE = "checkpoint.npz"


def fit(
    loss_fn: Callable[[Any, Forest, Any], jax.Array],
    params: Any,
    trees: Sequence[Tree] | Forest,
    *,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    labels: Any = None,
    seed: int = 0,
    window: int = 16,
    eval_fn: Callable[[Any, Forest, Any], dict] | None = None,
    eval_trees: Sequence[Tree] | Forest | None = None,
    eval_labels: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    kinds: Sequence[str] | None = None,
) -> FitResult:
    """Trains ``params`` on ``trees`` for ``epochs`` epochs; evaluates and checkpoints each.

    Equivalent program (plus timing, a progress bar and checkpoints)::

      opt_state, shapes = optimizer.init(params), []
      for epoch in range(epochs):          # from the checkpoint's next epoch when resuming
          for batch in batches(trees, batch_size, seed=seed, epoch=epoch, window=window,
                               shapes=shapes, kinds=kinds):
              rows = labels[batch.indices], padded to len(batch.forest.roots)
              loss, grads = jax.value_and_grad(loss_fn)(params, batch.forest, rows)
              updates, opt_state = optimizer.update(grads, opt_state, params)
              params = optax.apply_updates(params, updates)
          for batch in batches(eval_trees, batch_size, kinds=kinds):   # planned once, reused
              pairs = eval_fn(params, batch.forest, eval_labels rows)
          metrics = {name: sum of sums / sum of counts over the batches}

    The step is one ``jax.jit``-ed function, compiled once per batch shape; ``loss_fn``
    and ``optimizer`` are its static (hashed) arguments, so calls of ``fit`` with the
    same ones share the compiled programs. The epochs share their batch shapes (see
    ``batches``): 8,544 SST-like trees in batches of 32 compile 2, 1 and 0 new programs
    in their first three epochs; the history's ``new_shapes`` counts them. Batches are padded
    (see ``Forest.padded``): ``loss_fn`` must mask the padding, per root with
    ``forest.root_mask`` and per node with ``forest.node_mask`` (``masked_mean`` does
    both). Per-root targets come in ``labels``, aligned with ``trees``; per-node targets
    belong in the trees' node data (``forest.data["label"]``). Rows of padding roots
    copy the batch's first real row.

    The training trees are read once, before the first step: they are checked and walked
    into arrays (a copy of their node data) that every epoch's batches are cut from, so
    changing them during ``fit`` changes nothing. When a subtree is shared between trees
    the batches are converted tree by tree instead, as ``batches`` does. A Forest of
    the whole training set is cut into batches directly.

    Args:
      loss_fn: ``loss_fn(params, forest, labels) -> scalar``; ``labels`` is the batch's
        rows of ``labels`` (``None`` without labels).
      params: initial parameters (a pytree of arrays). When resuming they only give the
        structure, which must match the checkpoint's.
      trees: the training set: ``Tree`` objects, or a Forest of many trees (see
        ``batches``).
      optimizer: an optax transformation.
      epochs: total number of epochs, counting those already in the checkpoint.
      batch_size: trees per batch.
      labels: optional pytree of arrays with leading axis ``len(trees)`` (row ``i``
        belongs to ``trees[i]``).
      seed: the shuffle seed; epoch ``e`` uses ``batches(..., seed=seed, epoch=e)``.
      window: batches padded together (see ``batches``): larger windows compile fewer
        programs and compute more padding rows.
      eval_fn: ``eval_fn(params, forest, labels) -> {name: (sum, count)}`` on a padded
        evaluation batch, jitted; ``root_accuracy`` and friends return such pairs. For a
        mean of per-root values ``x``, return ``(jnp.sum(jnp.where(forest.root_mask, x,
        0)), jnp.sum(forest.root_mask))``.
      eval_trees, eval_labels: the evaluation set, like ``trees`` and ``labels``.
      checkpoint_dir: where to write ``CHECKPOINT_FILE`` after every epoch (atomically:
        a temporary file in the same directory, fsync-ed, then ``os.replace``). It holds
        params, optimizer state, the epoch, the seed and the history as numpy arrays and
        JSON, never pickles.
      resume: continue from ``checkpoint_dir``'s checkpoint when there is one; the result
        equals an uninterrupted run. ``False`` starts over (and overwrites it).
      progress: show a ``tqdm`` bar per epoch with the loss and real nodes per second
        (only when stderr is a terminal).
      kinds: the vocabulary of node kinds, for trees with ``Tree.kind`` (see ``batches``).

    Returns:
      ``FitResult(params, opt_state, history)``, the history covering every epoch (see
      ``FitResult``).

    Raises:
      ValueError: bad sizes, ``labels`` not aligned with ``trees``, ``eval_fn`` without
        ``eval_trees`` (or the reverse), a checkpoint that cannot be read, holds more
        than ``epochs`` epochs, or does not match ``params``, the optimizer state's
        structure, ``seed``, ``batch_size``, ``window``, the trees' sizes or ``labels``
        (the optimizer's hyperparameters, a learning rate, are not recorded), or a tree
        of ``trees`` or ``eval_trees`` whose data or structure ``Forest.from_trees``
        refuses (all are checked before training, and the error names the tree's
        position).
      TypeError: ``eval_fn`` does not return a dict of ``(sum, count)`` pairs.

    Example:
      >>> import jax.numpy as jnp, optax, recjax as rj
      >>> from recjax.train import fit, masked_mean
      >>> @rj.recursive
      ... def total(w, node):
      ...     return w * node.data + node.children.map(lambda c: total(w, c)).sum()
      >>> trees = [rj.Tree(1.0, [rj.Tree(2.0)] * k) for k in range(5)]
      >>> def loss_fn(w, forest, targets):
      ...     err = total.batch(w, forest)[forest.roots] - targets
      ...     return masked_mean(err**2, forest.root_mask)
      >>> targets = jnp.array([1.0 + 2.0 * k for k in range(5)]) * 3.0   # the answer: w = 3
      >>> w, _, history = fit(loss_fn, jnp.array(0.0), trees, labels=targets,
      ...                     optimizer=optax.sgd(0.005), epochs=10, batch_size=2, progress=False)
      >>> round(float(w), 3), len(history), history[-1]["loss"] < history[0]["loss"]
      (3.0, 10, True)
    """
    if epochs < 0 or batch_size < 1 or window < 1:
        raise ValueError(
            f"fit needs epochs >= 0, batch_size >= 1 and window >= 1; got {epochs}, "
            f"{batch_size} and {window}."
        )
    if kinds is not None and len(set(kinds)) != len(list(kinds)):
        raise ValueError("fit: kinds= lists a kind twice; give each kind once.")
    table = None
    if isinstance(trees, Forest):
        table, kinds = _forest_table(trees, kinds, "fit: trees")
        num_trees = table.start.size
    else:
        trees = list(trees)
        num_trees = len(trees)
    if not num_trees:
        raise ValueError("fit: no training trees.")
    labels = _rows_array(labels, num_trees, "labels")
    if (eval_fn is None) != (eval_trees is None):
        raise ValueError("fit: pass eval_fn and eval_trees together (or neither).")
    eval_table = None
    if eval_trees is not None:
        if isinstance(eval_trees, Forest):
            eval_table, _ = _forest_table(eval_trees, kinds, "fit: eval_trees", training=True)
            num_eval = eval_table.start.size
        else:
            eval_trees = list(eval_trees)
            num_eval = len(eval_trees)
        if not num_eval:
            raise ValueError("fit: eval_trees is empty.")
        eval_labels = _rows_array(eval_labels, num_eval, "eval_labels")
    elif eval_labels is not None:
        raise ValueError("fit: eval_labels without eval_trees.")
    if table is None:
        table = _dataset_table(trees, kinds)
    layout = _check_trees(trees, kinds, "trees") if table is None else table.layout
    if eval_table is not None:
        if eval_table.layout != layout:
            raise _layouts_differ("eval_trees", eval_table.layout, layout)
    elif eval_trees is not None:
        _check_trees(eval_trees, kinds, "eval_trees", reference=layout)

    # Strongly typed arrays: the optimizer returns strong types, so weakly typed params
    # (a Python float, ``jnp.array(0.5)``) would compile the first shape's step twice.
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), params)
    opt_state = optimizer.init(params)
    history: list[dict] = []
    sizes = tree_sizes(trees) if table is None else table.sizes
    config = {
        "seed": int(seed), "batch_size": int(batch_size), "num_trees": num_trees,
        "window": int(window), "tree_sizes": _digest(sizes), "labels": _digest(labels),
    }
    path = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE)
        if resume and os.path.exists(path):
            params, opt_state, history = _load_checkpoint(path, params, opt_state, config)
            if len(history) > epochs:
                raise ValueError(
                    f"the checkpoint {path} holds {len(history)} epochs, more than "
                    f"epochs={epochs} (the total, counting those done); pass "
                    f"epochs >= {len(history)}, or resume=False to start over."
                )

    num_batches = -(-num_trees // batch_size)
    eval_batches = None
    shapes: list = []  # batch shapes padded to so far: the compiled train steps
    for epoch in range(len(history), epochs):
        start = time.perf_counter()
        bar = tqdm(
            total=num_batches,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            disable=None if progress else True,  # None: off when stderr is not a TTY
            file=sys.stderr,
        )
        with bar, contextlib.closing(
            _batches(
                trees, batch_size, table, seed=seed, epoch=epoch, group_by_size=False,
                window=window, prefetch=2, sizes=sizes, shapes=shapes, kinds=kinds,
            )
        ) as epoch_batches:
            known = len(shapes)
            losses, nodes, shown = [], [], _Shown()
            for b in epoch_batches:
                rows = _root_rows(labels, b)
                params, opt_state, loss = _train_step(
                    loss_fn, optimizer, params, opt_state, b.forest, rows
                )
                losses.append(loss)
                nodes.append(int(np.count_nonzero(b.forest.node_mask)))
                bar.update()
                if not bar.disable and time.perf_counter() - shown.at > 0.5:
                    shown.refresh(bar, losses, nodes, start)
            losses = np.asarray(jax.device_get(losses), dtype=np.float64)
            train_s = time.perf_counter() - start
            entry = {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "metrics": {},
                "nodes_per_s": float(sum(nodes) / max(train_s, 1e-9)),
                "seconds": 0.0,
                "new_shapes": len(shapes) - known,
            }
            if eval_fn is not None:
                if eval_batches is None:
                    eval_batches = list(batches(eval_trees, batch_size, kinds=kinds))
                entry["metrics"] = _evaluate(eval_fn, params, eval_batches, eval_labels)
            entry["seconds"] = time.perf_counter() - start
            bar.set_postfix_str(
                f"loss {entry['loss']:.4f}, {entry['nodes_per_s']:,.0f} nodes/s"
                + "".join(f", {k} {v:.4f}" for k, v in entry["metrics"].items()),
                refresh=True,
            )
        history.append(entry)
        if path is not None:
            meta = dict(config, epoch=epoch + 1, history=history)
            _save_checkpoint(path, params, opt_state, meta)
    return FitResult(params, opt_state, history)


class _Shown:
    """Progress-bar state: how many losses were read back, their sum, when."""

    def __init__(self):
        self.at, self.read, self.total = time.perf_counter(), 0, 0.0

    def refresh(self, bar, losses, nodes, start):
        new = jax.device_get(losses[self.read :])  # waits for the latest step
        self.total += float(np.sum(new, dtype=np.float64))
        self.read = len(losses)
        self.at = time.perf_counter()
        rate = sum(nodes) / max(self.at - start, 1e-9)
        bar.set_postfix_str(
            f"loss {self.total / self.read:.4f}, {rate:,.0f} nodes/s", refresh=False
        )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(loss_fn, optimizer, params, opt_state, forest, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, forest, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(eval_fn, params, forest, labels):
    return eval_fn(params, forest, labels)


def _evaluate(eval_fn, params, eval_batches, eval_labels) -> dict:
    outs = [_eval_step(eval_fn, params, b.forest, _root_rows(eval_labels, b)) for b in eval_batches]
    first = outs[0]
    bad = (
        [f"it returned a {type(first).__name__}"]
        if not isinstance(first, dict)
        else [
            f"{name!r} is a {type(v).__name__}"
            for name, v in first.items()
            if not (isinstance(v, (tuple, list)) and len(v) == 2)
        ]
    )
    if bad:
        raise TypeError(
            "eval_fn must return a dict of (sum, count) pairs, such as "
            "{'accuracy': root_accuracy(logits, labels, forest)}; "
            + "; ".join(bad)
            + ". For a mean of per-root values x, return "
            "(jnp.sum(jnp.where(forest.root_mask, x, 0)), jnp.sum(forest.root_mask))."
        )
    sums = {name: [0.0, 0.0] for name in first}
    for out in jax.device_get(outs):
        for name, (total, count) in out.items():
            sums[name][0] += float(np.sum(total, dtype=np.float64))
            sums[name][1] += float(np.sum(count, dtype=np.float64))
    return {name: (t / c if c else float("nan")) for name, (t, c) in sums.items()}


def _rows_array(values, n, name):
    """``values`` as a pytree of numpy arrays whose leading axis is ``n`` (checked)."""
    if values is None:
        return None
    # A list is one array ([0, 1, 1] or nested lists), as in Forest.from_parents.
    flat, treedef = jax.tree_util.tree_flatten_with_path(values, is_leaf=lambda x: isinstance(x, list))
    out, problems = [], []
    for p, leaf in flat:
        a = np.asarray(leaf)
        a = a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)  # as jit would see it
        if a.ndim == 0 or a.shape[0] != n:
            problems.append(f"{name}{jax.tree_util.keystr(p)} has shape {a.shape}")
        out.append(a)
    if problems or not flat:
        raise ValueError(
            f"fit: {name} must be arrays with one row per tree ({n} rows); "
            + ("; ".join(problems) or "got no arrays")
            + ". Row i belongs to tree i; per-node targets go in the trees' node data."
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _root_rows(values, batch: Batch):
    """Rows ``batch.indices`` of ``values``, padded to one per root with copies of the first."""
    if values is None:
        return None
    pad = np.shape(batch.forest.roots)[0] - batch.indices.size
    idx = np.concatenate([batch.indices, np.full(pad, batch.indices[0], batch.indices.dtype)])
    return jax.tree.map(lambda a: a[idx], values)


# ---------------------------------------------------------------------- checkpoints


def _save_checkpoint(path, params, opt_state, meta) -> None:
    """Writes params, opt_state and ``meta`` (JSON) to ``path`` as one npz, atomically."""
    p_leaves, p_def = jax.tree.flatten(params)
    o_leaves, o_def = jax.tree.flatten(opt_state)
    p_leaves, o_leaves = jax.device_get((p_leaves, o_leaves))
    arrays = {f"params_{i}": np.asarray(a) for i, a in enumerate(p_leaves)}
    arrays.update({f"opt_state_{i}": np.asarray(a) for i, a in enumerate(o_leaves)})
    meta = dict(meta, format=1, params_treedef=str(p_def), opt_state_treedef=str(o_def))
    # npy stores extension dtypes such as bfloat16 as raw bytes ("V2"): keep their names.
    meta["dtypes"] = {k: str(a.dtype) for k, a in arrays.items()}
    arrays["meta"] = np.array(json.dumps(meta))
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _atomic_write(path, write_fn) -> None:
    """``write_fn(file)`` into a temporary file beside ``path``, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or the new one at ``path``, never a
    partial one; a failed write removes its temporary file.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _load_checkpoint(path, params, opt_state, config):
    """The state saved at ``path``, checked against ``params``/``opt_state``'s structure."""
    fix = "delete it, pass resume=False, or use another checkpoint_dir to start over"
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    o_flat, o_def = jax.tree_util.tree_flatten_with_path(opt_state)
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            saved = {}
            for name, flat, treedef in (("params", p_flat, p_def), ("opt_state", o_flat, o_def)):
                if meta[f"{name}_treedef"] == str(treedef):
                    keys = [f"{name}_{i}" for i in range(len(flat))]
                    saved[name] = [_with_dtype(z[k], meta["dtypes"][k]) for k in keys]
    except Exception as e:  # a zip, npy or JSON error: the file is damaged
        raise ValueError(
            f"the checkpoint {path} cannot be read ({type(e).__name__}: {e}); {fix}."
        ) from None
    named = {"tree_sizes": "the trees' sizes (hash)", "labels": "the labels (hash)"}
    problems = [
        f"{named.get(key, key)} is {meta[key]} in the checkpoint and {value} now"
        for key, value in config.items()
        if key in meta and meta[key] != value  # keys older checkpoints lack are not checked
    ]
    for name, flat, treedef in (("params", p_flat, p_def), ("opt_state", o_flat, o_def)):
        if name not in saved:
            problems.append(
                f"the {name} structure differs: checkpoint {meta[name + '_treedef']}, now {treedef}"
            )
            continue
        for (kp, ref), a in zip(flat, saved[name]):
            ref_shape, ref_dtype = np.shape(ref), jnp.result_type(ref)
            if a.shape != ref_shape or a.dtype != ref_dtype:
                problems.append(
                    f"{name}{jax.tree_util.keystr(kp)} is {a.dtype}{list(a.shape)} in the "
                    f"checkpoint and {ref_dtype}{list(ref_shape)} now"
                )
    if problems:
        raise ValueError(
            f"the checkpoint {path} does not match this call of fit:\n  "
            + "\n  ".join(problems)
            + "\nPass the params, optimizer, seed, batch_size, window, trees and labels it "
            + f"was written with, or {fix}."
        )
    params, opt_state = (
        jax.tree.unflatten(treedef, [jnp.asarray(a) for a in saved[name]])
        for name, treedef in (("params", p_def), ("opt_state", o_def))
    )
    return params, opt_state, meta["history"]


def _saved_epochs(checkpoint_dir) -> int:
    """The epochs done in ``checkpoint_dir``'s checkpoint; 0 without one (or unreadable:
    ``fit`` then says why)."""
    try:
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE)
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            return int(json.loads(str(z["meta"]))["epoch"])
    except Exception:
        return 0


def _digest(arrays) -> str | None:
    """A short hash of a pytree of numpy arrays (shapes, dtypes and bytes), for checkpoints."""
    if arrays is None:
        return None
    h = hashlib.sha256()
    for a in jax.tree.leaves(arrays):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _with_dtype(a: np.ndarray, name: str) -> np.ndarray:
    """A loaded array with its saved dtype (npy reads bfloat16 and friends as raw bytes)."""
    if a.dtype.kind == "V" and str(a.dtype) != name:
        return a.view(jnp.dtype(name))
    return a


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
