"""The background batch iterator: correct, complete, race-free, few shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recjax as rj
from models import random_binary_tree
from recjax.train import batches, tree_sizes


@rj.recursive
def size(node):
    return 1.0 + node.children.map(size).sum()


def test_epoch_covers_every_tree_once_and_reshuffles():
    rng = np.random.default_rng(0)
    trees = [random_binary_tree(rng, int(rng.integers(1, 20))) for _ in range(103)]
    seen = [np.concatenate([b.indices for b in batches(trees, 8, seed=3, epoch=e)]) for e in (0, 1)]
    for s in seen:
        assert sorted(s.tolist()) == list(range(103))
    assert seen[0].tolist() != seen[1].tolist()
    again = np.concatenate([b.indices for b in batches(trees, 8, seed=3, epoch=0)])
    assert again.tolist() == seen[0].tolist()


def test_grouping_by_size_gives_few_shapes():
    rng = np.random.default_rng(1)
    trees = [random_binary_tree(rng, int(rng.integers(1, 57))) for _ in range(600)]
    shapes = lambda it: {(b.forest._meta, b.forest.roots.shape) for b in it}  # noqa: E731
    grouped = shapes(batches(trees, 32, window=8))
    assert len(grouped) <= 3  # one per window of 8 batches (19 batches -> 3 windows)


def test_many_batches_through_the_thread_are_all_correct():
    """Planning runs in a thread while the device computes: every result is checked."""
    rng = np.random.default_rng(2)
    trees = [random_binary_tree(rng, int(rng.integers(1, 30))) for _ in range(400)]
    want = tree_sizes(trees)
    run = jax.jit(size.batch)
    count = 0
    for epoch in range(3):
        for b in batches(trees, 16, seed=0, epoch=epoch, window=4, prefetch=3):
            out = run(b.forest)
            got = np.asarray(out[b.forest.roots])[: b.indices.size]
            np.testing.assert_allclose(got, want[b.indices])
            assert not b.forest.root_mask[b.indices.size :].any()
            count += b.indices.size
    assert count == 3 * 400


def test_loader_errors_reach_the_consumer_and_early_exit_stops_the_thread():
    trees = [rj.Tree(1.0)] * 5 + [rj.Tree(1)]  # an int node: schema mismatch in its batch
    with pytest.raises(ValueError, match="same structure, shapes and dtypes"):
        list(batches(trees, 3, group_by_size=False, window=1))
    good = [rj.Tree(float(i)) for i in range(100)]
    it = batches(good, 2, window=1, prefetch=1)
    next(it)
    it.close()  # the generator's cleanup stops and joins the loader thread
    import threading

    assert not any(t.name == "recjax-planner" and t.is_alive() for t in threading.enumerate())
