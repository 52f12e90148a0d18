"""The background batch iterator (correct, complete, race-free, few shapes) and ``fit``."""

import contextlib
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import recjax as rj
from models import random_binary_tree, tree_lstm
from recjax import demo, train
from recjax.train import (
    batches,
    binary_root_accuracy,
    fit,
    masked_mean,
    node_accuracy,
    root_accuracy,
    tree_sizes,
)


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


def test_windows_give_few_shapes_and_little_padding():
    rng = np.random.default_rng(1)
    trees = [random_binary_tree(rng, int(rng.integers(1, 57))) for _ in range(600)]

    def stats(**kw):
        out = list(batches(trees, 32, window=8, **kw))
        rows = sum(b.forest.plan.key.num_buffer_rows for b in out)
        real = sum(int(b.forest.node_mask.sum()) for b in out)
        return len({(b.forest._meta, b.forest.roots.shape) for b in out}), rows / real

    shapes, waste = stats()
    assert shapes <= 3  # one per window of 8 batches (19 batches -> 3 windows)
    _, sorted_waste = stats(group_by_size=True)
    assert waste < sorted_waste  # random batches pad together more tightly


def test_epochs_sharing_shapes_reuse_programs_and_fit_counts_its_compiles():
    rng = np.random.default_rng(4)
    trees = [random_binary_tree(rng, int(rng.integers(1, 40))) for _ in range(480)]
    shapes, new, rows, real = [], [], 0, 0
    for epoch in range(3):
        known = len(shapes)
        for b in batches(trees, 16, seed=0, epoch=epoch, window=2, shapes=shapes):
            assert any(b.forest._meta.key == s.key for s in shapes)  # padded to a listed shape
            rows += b.forest.plan.key.num_buffer_rows
            real += int(b.forest.node_mask.sum())
        new.append(len(shapes) - known)
    assert sum(new) < 3 * 15 // 2 and new[-1] < new[0]  # far fewer than one shape per window
    exact = [b.forest.plan.key.num_buffer_rows for b in batches(trees, 16, window=1)]
    assert rows / real < 1.25 * sum(exact) / (trees_nodes := sum(tree_sizes(trees)))

    traces = []

    def loss_fn(w, forest, targets):
        traces.append(forest._meta)  # runs once per compiled train step
        err = size_w.batch(w, forest)[forest.roots] - targets
        return masked_mean(err**2, forest.root_mask)

    targets = tree_sizes(trees).astype(np.float32)
    # A weakly typed parameter (a Python float): the optimizer's strongly typed update must
    # not make the first shape compile twice.
    _, _, history = fit(loss_fn, 0.5, trees, labels=targets, optimizer=optax.sgd(1e-4),
                        epochs=3, batch_size=16, window=2, progress=False)
    assert [h["new_shapes"] for h in history] == new  # the same shapes as above
    assert len(traces) == sum(new) == len(set(traces))
    assert trees_nodes == int(targets.sum())


@rj.recursive
def size_w(w, node):
    return w + node.children.map(lambda c: size_w(w, c)).sum()


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


OPS = ["Num", "Add", "Mul"]


@rj.recursive
def calc(p, node):
    if node.kind == "Num":
        return node.data * p
    a, b = [calc(p, c) for c in node.children]
    return a + b if node.kind == "Add" else a * b


def random_expression(rng, depth):
    if depth == 0 or rng.random() < 0.3:
        return rj.Tree(np.float32(rng.uniform(-1, 1)), kind="Num")
    kids = [random_expression(rng, depth - 1) for _ in range(2)]
    return rj.Tree(np.float32(0), kids, kind=OPS[1 + int(rng.integers(2))])


def test_batches_and_fit_take_a_kind_vocabulary():
    rng = np.random.default_rng(5)
    trees = [random_expression(rng, 5) for _ in range(40)]
    p = jnp.float32(0.9)
    want = np.array([calc(p, t) for t in trees])
    for b in batches(trees, 8, window=2, kinds=OPS):
        got = np.asarray(calc.roots(p, b.forest))[: b.indices.size]
        np.testing.assert_allclose(got, want[b.indices], rtol=1e-5, atol=1e-6)
    labels = jnp.asarray(want * 0.5)  # any per-root target

    def loss(p, forest, y):
        return masked_mean((calc.roots(p, forest) - y) ** 2, forest.root_mask)

    result = fit(loss, p, trees, labels=labels, optimizer=optax.sgd(0.01), epochs=2,
                 batch_size=8, kinds=OPS, progress=False)
    assert np.isfinite(result.params) and all(np.isfinite(h["loss"]) for h in result.history)
    with pytest.raises(ValueError, match="kinds="):
        next(batches(trees, 8))


@pytest.mark.parametrize("shared", [False, True])
def test_fit_cuts_its_batches_out_of_one_walk_of_the_trees(monkeypatch, shared):
    """fit walks the training trees once (a _TreeTable) and cuts every epoch's batches out
    of it: the same run as converting each batch's trees, which it does instead when a
    subtree is in several trees."""
    rng = np.random.default_rng(6)
    trees = [random_expression(rng, 5) for _ in range(40)]
    if shared:
        trees[7] = rj.Tree(np.float32(0), [trees[3], trees[5]], kind="Add")
    labels = jnp.asarray(np.array([calc(jnp.float32(0.9), t) for t in trees]) * 0.5)

    def loss(p, forest, y):
        return masked_mean((calc.roots(p, forest) - y) ** 2, forest.root_mask)

    tables = []
    walk_once = train._dataset_table
    monkeypatch.setattr(train, "_dataset_table", lambda *a: tables.append(walk_once(*a)) or tables[-1])
    kw = dict(labels=labels, optimizer=optax.adam(0.01), epochs=3, batch_size=8, window=2,
              kinds=OPS, progress=False)
    cut = fit(loss, jnp.float32(0.3), trees, **kw)
    assert (tables[0] is None) == shared
    monkeypatch.setattr(train, "_dataset_table", lambda *a: None)
    walked = fit(loss, jnp.float32(0.3), trees, **kw)
    assert float(cut.params) == float(walked.params) != 0.3
    for a, b in zip(cut.history, walked.history, strict=True):
        assert (a["loss"], a["new_shapes"]) == (b["loss"], b["new_shapes"])


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


# ---------------------------------------------------------------------- fit
# Compiling a Tree-LSTM train step takes seconds on a shared CPU, and ``fit`` shares its
# compiled step between calls with the same loss_fn, optimizer and batch shapes: the
# tests reuse them (one optimizer object, one training set) to compile few programs.

HIDDEN = 4
TRAIN = demo.load_dataset(demo.TRAIN_FILE, limit=32)
ADAM = optax.adam(0.05)


def _params(seed=0):
    """Tree-LSTM parameters (numpy: no device work to initialise them)."""
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=0.4: (s * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    dim, vocab = 4, len(demo.VOCAB)
    return {"emb": n(vocab, dim, s=1.0), "W": n(dim, 3 * HIDDEN), "b": n(3 * HIDDEN, s=0.1),
            "U": n(2 * HIDDEN, 5 * HIDDEN), "bu": n(5 * HIDDEN, s=0.1),
            "out": n(HIDDEN, demo.NUM_CLASSES, s=0.5)}


def _cross_entropy(p, h, labels):
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["out"], labels)


def root_loss(p, forest, labels):
    """Per-root cross entropy (the calculator task), padding roots masked."""
    h, _ = tree_lstm.batch(p, forest)
    return masked_mean(_cross_entropy(p, h[forest.roots], labels), forest.root_mask)


def root_and_node_loss(p, forest, labels):
    """Per-root cross entropy plus per-node cross entropy (labels in the node data, SST style)."""
    h, _ = tree_lstm.batch(p, forest)
    per_node = masked_mean(_cross_entropy(p, h, forest.data["label"]), forest.node_mask)
    return masked_mean(_cross_entropy(p, h[forest.roots], labels), forest.root_mask) + per_node


def root_metrics(p, forest, labels):
    h, _ = tree_lstm.batch(p, forest)
    return {"accuracy": root_accuracy(h[forest.roots] @ p["out"], labels, forest)}


def with_node_labels(tree):
    """A copy of a calculator tree whose every node carries a label (its token mod 5)."""
    token = tree.data["token"]
    return rj.Tree({"token": token, "label": token % 5}, [with_node_labels(c) for c in tree.children])


@pytest.fixture(scope="module")
def whole_run():
    """Four uninterrupted epochs on the calculator task, evaluated after each."""
    test_trees, test_labels = demo.load_dataset(demo.TEST_FILE, limit=21)
    trees, labels = TRAIN
    result = fit(root_loss, _params(), trees, labels=labels, optimizer=ADAM, epochs=4, batch_size=16,
                 eval_fn=root_metrics, eval_trees=test_trees, eval_labels=test_labels, progress=False)
    return result, test_trees, test_labels


def test_fit_loss_decreases_and_eval_counts_every_eval_tree(whole_run):
    (p, state, history), test_trees, test_labels = whole_run
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(h["nodes_per_s"] > 0 and h["seconds"] > 0 for h in history)
    assert int(state[0].count) == 4 * 2  # adam's step count: 2 batches per epoch
    # The metric over padded eval batches equals plain accuracy on the unpadded eval forest.
    forest = rj.Forest.from_trees(test_trees)
    h, _ = tree_lstm.batch(p, forest)
    predicted = np.asarray(jnp.argmax(h[forest.roots] @ p["out"], axis=-1))
    assert history[-1]["metrics"]["accuracy"] == pytest.approx(np.mean(predicted == test_labels))


def test_fit_masks_padding_per_root_and_per_node():
    """One padded batch, plain SGD: loss and update equal those on the unpadded forest.

    The loss is a per-root mean plus a per-node mean; padding leaking into either (or a
    label row gathered for the wrong root) changes the value and the gradient.
    """
    trees, labels = [with_node_labels(t) for t in TRAIN[0][:5]], TRAIN[1][:5]
    (batch,) = list(batches(trees, 8, seed=0, epoch=0))
    real_nodes = int(tree_sizes(trees).sum())
    assert batch.forest.num_nodes > real_nodes and len(batch.forest.roots) > 5  # padded both ways
    assert batch.indices.tolist() != list(range(5))  # shuffled: labels must follow their roots

    p0 = _params()
    p, _, history = fit(root_and_node_loss, p0, trees, labels=labels, optimizer=optax.sgd(1.0),
                        epochs=1, batch_size=8, progress=False)
    plain = rj.Forest.from_trees(trees)
    assert plain.num_nodes == real_nodes and bool(np.all(plain.node_mask))
    want, grads = jax.jit(jax.value_and_grad(root_and_node_loss))(p0, plain, labels)
    assert history[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    jax.tree.map(lambda a, b, g: np.testing.assert_allclose(a, b - g, atol=1e-6), p, p0, grads)


def _close(a, b, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def test_resume_after_a_crash_equals_an_uninterrupted_run(whole_run, tmp_path, monkeypatch):
    whole = whole_run[0]
    trees, labels = TRAIN
    kw = dict(labels=labels, optimizer=ADAM, epochs=4, batch_size=16, progress=False,
              checkpoint_dir=tmp_path)
    real_batches = train._batches  # what fit calls

    def crashing_batches(*args, epoch, **kwargs):  # the process dies after a step of epoch 3
        with contextlib.closing(real_batches(*args, epoch=epoch, **kwargs)) as epoch_batches:
            for i, b in enumerate(epoch_batches):
                if epoch == 2 and i == 1:
                    raise KeyboardInterrupt
                yield b

    monkeypatch.setattr(train, "_batches", crashing_batches)
    with pytest.raises(KeyboardInterrupt):
        fit(root_loss, _params(), trees, **kw)
    monkeypatch.setattr(train, "_batches", real_batches)
    assert os.listdir(tmp_path) == [train.CHECKPOINT_FILE]  # no temporary file left
    with np.load(tmp_path / train.CHECKPOINT_FILE, allow_pickle=False) as saved:
        assert json.loads(str(saved["meta"]))["epoch"] == 2  # epoch 3's first step is lost

    resumed = fit(root_loss, _params(seed=99), trees, **kw)  # initial values unused
    _close(resumed.params, whole.params)
    _close(resumed.opt_state, whole.opt_state)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-6)

    again = fit(root_loss, _params(), trees, **kw)  # nothing left to do
    _close(again.params, resumed.params, atol=0)
    assert len(again.history) == 4

    # Resuming under other settings would not reproduce the run: refused, naming the mismatch.
    with pytest.raises(ValueError, match="seed is 0 in the checkpoint and 1 now"):
        fit(root_loss, _params(), trees, seed=1, **dict(kw, epochs=5))
    p = _params()
    p["out"] = p["out"][:, :3]
    with pytest.raises(ValueError, match=r"params\['out'\] is float32\[4, 10\] in the checkpoint"):
        fit(root_loss, p, trees, **dict(kw, epochs=5))
    with pytest.raises(ValueError, match="window is 16 in the checkpoint and 4 now"):
        fit(root_loss, _params(), trees, window=4, **dict(kw, epochs=5))
    with pytest.raises(ValueError, match=r"the labels \(hash\) is \w+ in the checkpoint and \w+ now"):
        fit(root_loss, _params(), trees, **dict(kw, epochs=5, labels=(labels + 1) % 10))
    swapped = [trees[1], trees[0], *trees[2:]]  # same count, another order of sizes
    assert tree_sizes(swapped).tolist() != tree_sizes(trees).tolist()
    with pytest.raises(ValueError, match=r"the trees' sizes \(hash\) is \w+ in the checkpoint"):
        fit(root_loss, _params(), swapped, **dict(kw, epochs=5))
    with pytest.raises(ValueError, match=r"holds 4 epochs, more than epochs=3"):
        fit(root_loss, _params(), trees, **dict(kw, epochs=3))


def test_a_refused_tree_is_named_by_its_position_in_trees():
    """The loader plans a window at a time; a refused tree is named by its index in the
    input list (its node ids count within it), not by node ids of the window's forest."""
    good = [rj.Tree(1.0, [rj.Tree(2.0)]) for _ in range(9)]
    odd = list(good)
    odd[6] = rj.Tree(1, [rj.Tree(2)])  # ints where the others hold floats
    with pytest.raises(ValueError, match=r"(?s)batches: trees\[6\] does not match trees\[\d+\] .*node 2: data has shape \(\) and dtype float64; node 0 has shape \(\) and dtype int64"):
        list(batches(odd, 2, seed=0))
    inner = list(good)
    inner[4] = rj.Tree(1.0, [rj.Tree(2.0, [rj.Tree(np.zeros(2))])])  # differs within itself
    with pytest.raises(ValueError, match=r"(?s)batches: trees\[4\]: node data must have the same structure.*node 2: data has shape \(2,\)"):
        list(batches(inner, 3, seed=0))


def test_fit_refuses_a_bad_tree_before_training():
    """fit walks every training and evaluation tree before its first step: a tree the
    loader would refuse in the last window (or an evaluation tree, planned after the first
    epoch) stops it before any device work, named by its position."""
    calls = []

    def loss_fn(w, forest, targets):
        calls.append(1)
        return jnp.sum(w)

    good = [rj.Tree(1.0, [rj.Tree(2.0)]) for _ in range(2100)]  # two chunks of the check
    kw = dict(optimizer=optax.sgd(0.1), epochs=1, batch_size=4, progress=False)
    odd = list(good)
    odd[2090] = rj.Tree(1, [rj.Tree(2)])
    with pytest.raises(ValueError, match=r"(?s)fit: trees\[2090\] does not match trees\[\d+\] .*dtype int64"):
        fit(loss_fn, jnp.float32(0), odd, **kw)
    cyclic = list(good)
    loop = rj.Tree(1.0, [rj.Tree(2.0)])
    loop.children[0].children = (loop,)  # only by reassigning children
    cyclic[7] = loop
    with pytest.raises(ValueError, match=r"fit: trees\[7\]: the forest has a cycle"):
        fit(loss_fn, jnp.float32(0), cyclic, **kw)
    evals = [rj.Tree(1.0), rj.Tree(1.0, [rj.Tree(np.zeros(2))])]
    eval_fn = lambda w, forest, labels: {"n": (jnp.sum(forest.root_mask), 1)}
    with pytest.raises(ValueError, match=r"(?s)fit: eval_trees\[1\]: node data must have the same structure"):
        fit(loss_fn, jnp.float32(0), good[:8], eval_fn=eval_fn, eval_trees=evals, **kw)
    ints = [rj.Tree(1, [rj.Tree(2)])]  # all alike, but not like the training trees
    with pytest.raises(ValueError, match=r"fit: the node data of eval_trees differ from the training trees'"):
        fit(loss_fn, jnp.float32(0), good[:8], eval_fn=eval_fn, eval_trees=ints, **kw)
    late = good[:2048] + [rj.Tree(1, [rj.Tree(2)])] * 52  # a whole chunk unlike the first
    with pytest.raises(ValueError, match=r"(?s)fit: trees\[2048\] does not match trees\[0\]"):
        fit(loss_fn, jnp.float32(0), late, **kw)
    with pytest.raises(ValueError, match="fit: kinds= lists a kind twice"):
        fit(loss_fn, jnp.float32(0), good[:8], kinds=["a", "a"], **kw)
    assert not calls  # nothing was traced, let alone run


# A model small enough that the checkpoint and progress tests compile in a blink.
@rj.recursive
def weighted_size(w, node):
    return w * node.data + node.children.map(lambda c: weighted_size(w, c)).sum()


def size_loss(w, forest, targets):
    return masked_mean((weighted_size.batch(w, forest)[forest.roots] - targets) ** 2, forest.root_mask)


SMALL = [rj.Tree(1.0, [rj.Tree(2.0) for _ in range(k)]) for k in range(6)]
SMALL_KW = dict(labels=np.array([3.0 * (1 + 2 * k) for k in range(6)], np.float32),
                optimizer=optax.sgd(0.005), batch_size=2)


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    kw = dict(SMALL_KW, checkpoint_dir=tmp_path, progress=False)
    fit(size_loss, jnp.array(0.0), SMALL, epochs=1, **kw)
    path = tmp_path / train.CHECKPOINT_FILE
    good = path.read_bytes()

    def torn_savez(f, **arrays):  # the disk fills up halfway through epoch 2's checkpoint
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(train.np, "savez", torn_savez)
    with pytest.raises(OSError, match="disk full"):
        fit(size_loss, jnp.array(0.0), SMALL, epochs=2, **kw)
    monkeypatch.undo()
    assert path.read_bytes() == good  # the good checkpoint survives
    assert os.listdir(tmp_path) == [train.CHECKPOINT_FILE]  # and the temporary file is gone

    # A leftover temporary file (a crash between write and rename) is ignored.
    (tmp_path / (train.CHECKPOINT_FILE + ".x1y2.tmp")).write_bytes(b"garbage")
    w, _, history = fit(size_loss, jnp.array(0.0), SMALL, epochs=2, **kw)
    assert [h["epoch"] for h in history] == [1, 2]
    whole = fit(size_loss, jnp.array(0.0), SMALL, epochs=2, progress=False, **SMALL_KW)
    np.testing.assert_allclose(w, whole.params, atol=1e-6)

    # A damaged checkpoint is an error that says what to do, not a silent restart.
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cannot be read.*resume=False"):
        fit(size_loss, jnp.array(0.0), SMALL, epochs=3, **kw)
    fit(size_loss, jnp.array(0.0), SMALL, epochs=1, resume=False, **kw)
    with np.load(path, allow_pickle=False) as saved:
        assert saved["params_0"].dtype == np.float32


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_loss_and_nodes_per_second_only_when_asked(capfd, monkeypatch):
    fit(size_loss, jnp.array(0.0), SMALL, epochs=2, progress=False, **SMALL_KW)
    assert capfd.readouterr() == ("", "")
    fit(size_loss, jnp.array(0.0), SMALL, epochs=1, progress=True, **SMALL_KW)  # stderr: no TTY
    assert capfd.readouterr() == ("", "")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fit(size_loss, jnp.array(0.0), SMALL, epochs=2, progress=True, **SMALL_KW)
    shown = terminal.getvalue()
    assert "epoch 1/2" in shown and "epoch 2/2" in shown and "3/3" in shown
    assert "loss " in shown and "nodes/s" in shown


def test_metric_helpers_match_plain_numpy():
    rng = np.random.default_rng(0)
    parents = [-1, 0, 0, -1, 3, 3, -1, -1, -1, -1, -1]  # 11 nodes, 7 roots
    forest = rj.Forest.from_parents(parents, {"x": np.zeros(11)}).padded()
    n, r = forest.num_nodes, len(forest.roots)
    assert n > 11 and r > 7  # padding on both axes
    nm, rm = np.asarray(forest.node_mask), np.asarray(forest.root_mask)
    logits_n, labels_n = rng.normal(size=(n, 5)), rng.integers(0, 5, n)
    logits_r, labels_r = rng.normal(size=(r, 5)), rng.integers(0, 5, r)
    labels_r[:3] = 2  # neutral roots, left out of the binary score
    labels_r[3:7] = [3, 3, 1, 4]  # every other label, 3 (positive) included

    correct, count = node_accuracy(logits_n, labels_n, forest)
    assert (int(correct), int(count)) == (np.sum((logits_n.argmax(1) == labels_n)[nm]), 11)
    correct, count = root_accuracy(logits_r, labels_r, forest)
    assert (int(correct), int(count)) == (np.sum((logits_r.argmax(1) == labels_r)[rm]), 7)
    prob = np.exp(logits_r) / np.exp(logits_r).sum(1, keepdims=True)
    keep = rm & (labels_r != 2)
    hit = (prob[:, 3:].sum(1) > prob[:, :2].sum(1)) == (labels_r >= 3)
    correct, count = binary_root_accuracy(logits_r, labels_r, forest)
    assert (int(correct), int(count)) == (np.sum(hit[keep]), np.sum(keep))
    x = rng.normal(size=(n, 3))
    np.testing.assert_allclose(masked_mean(x, forest.node_mask), x[nm].mean(), rtol=1e-5)


def test_fit_rejects_misaligned_labels_and_bad_eval_fn():
    kw = dict(SMALL_KW, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"labels must be arrays with one row per tree \(6 rows\)"):
        fit(size_loss, jnp.array(0.0), SMALL, **dict(kw, labels=np.zeros(5)))
    # A plain list is one array (as in Forest.from_parents): the same run as its array.
    as_list = fit(size_loss, jnp.array(0.0), SMALL, **dict(kw, labels=kw["labels"].tolist()))
    as_array = fit(size_loss, jnp.array(0.0), SMALL, **kw)
    assert float(as_list.params) == float(as_array.params) != 0.0
    with pytest.raises(ValueError, match="eval_fn and eval_trees together"):
        fit(size_loss, jnp.array(0.0), SMALL, eval_trees=SMALL, **kw)
    with pytest.raises(TypeError, match=r"dict of \(sum, count\) pairs.*'mse' is a"):
        fit(size_loss, jnp.array(0.0), SMALL, eval_trees=SMALL, eval_labels=kw["labels"],
            eval_fn=lambda w, f, y: {"mse": size_loss(w, f, y)}, **kw)


# ---------------------------------------------------------------------- a Forest as the dataset


@rj.recursive
def weighted(p, node):
    """Order-sensitive (child k weighs k + 1.5) and kind-sensitive."""
    out = node.data["x"] * (p if node.kind == "A" else 1.0 - p)
    for k, c in enumerate(node.children):
        out = out + (k + 1.5) * jnp.tanh(weighted(p, c))
    return out


def interleaved_parents(rng, num_trees):
    """A parent array of random trees (arity <= 3) whose node ids are shuffled across
    trees, so a tree's nodes are not contiguous and its root is rarely its first node;
    with the Tree objects that mean the same trees, in the Forest's root order."""
    parents, sizes = [], []
    for _ in range(num_trees):
        n = int(rng.integers(1, 12))
        parent = [-1]
        for i in range(1, n):
            while True:
                q = int(rng.integers(i))
                if parent.count(q) < 3:
                    break
            parent.append(q)
        parents.append(parent)
        sizes.append(n)
    offsets = np.cumsum([0] + sizes[:-1])
    local = np.concatenate([np.array(p) + (p_ >= 0) * o for p, o in zip(parents, offsets) for p_ in [np.array(p)]])
    perm = rng.permutation(local.size)  # old id -> new id
    parent = np.full(local.size, -1)
    parent[perm[local >= 0]] = perm[local[local >= 0]]
    x = rng.normal(size=local.size).astype(np.float32)
    kind = [("A", "B")[int(k)] for k in rng.integers(2, size=local.size)]
    forest = rj.Forest.from_parents(parent, {"x": x}, kind=kind, kinds=("A", "B"))

    def tree(i):  # children in increasing id, as from_parents orders them
        kids = np.flatnonzero(parent == i)
        return rj.Tree({"x": x[i]}, [tree(int(j)) for j in kids], kind=kind[i])

    return forest, [tree(int(r)) for r in forest.roots]


@pytest.mark.parametrize("seed", range(3))
def test_batches_of_a_parent_array_forest_match_plain_recursion(seed):
    rng = np.random.default_rng(seed)
    forest, trees = interleaved_parents(rng, 37)
    p = jnp.float32(0.7)
    want = np.array([weighted(p, t) for t in trees])
    grad_want = np.array([jax.grad(lambda p, t=t: weighted(p, t))(p) for t in trees])
    seen = []
    for b in batches(forest, 8, seed=seed, window=2):
        k = b.indices.size
        np.testing.assert_allclose(np.asarray(weighted.roots(p, b.forest))[:k], want[b.indices], rtol=1e-5, atol=1e-6)
        grads = jax.jacrev(lambda p: weighted.roots(p, b.forest)[:k])(p)
        np.testing.assert_allclose(np.asarray(grads), grad_want[b.indices], rtol=1e-4, atol=1e-5)
        seen.extend(b.indices.tolist())
    assert sorted(seen) == list(range(37))


@pytest.mark.parametrize("seed", range(2))
def test_batches_of_a_forest_of_trees_equal_batches_of_the_trees(seed):
    rng = np.random.default_rng(seed)
    trees = [random_expression(rng, 4) for _ in range(50)]
    forest = rj.Forest.from_trees(trees, kinds=OPS)
    shapes_a, shapes_b = [], []
    for epoch in range(2):
        pairs = zip(batches(forest, 8, epoch=epoch, window=3, shapes=shapes_a),
                    batches(trees, 8, epoch=epoch, window=3, shapes=shapes_b, kinds=OPS), strict=True)
        for a, b in pairs:
            assert a.indices.tolist() == b.indices.tolist() and a.forest._meta == b.forest._meta
            for x, y in zip(jax.tree.leaves(a.forest), jax.tree.leaves(b.forest), strict=True):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(a.forest.child_idx, b.forest.child_idx)
    assert shapes_a == shapes_b
    sized = [b.indices.tolist() for b in batches(forest, 8, group_by_size=True)]
    assert sized == [b.indices.tolist() for b in batches(trees, 8, group_by_size=True, kinds=OPS)]


def test_fit_on_a_forest_equals_fit_on_its_trees():
    rng = np.random.default_rng(7)
    trees = [random_expression(rng, 5) for _ in range(40)]
    held = [random_expression(rng, 5) for _ in range(9)]
    labels = jnp.asarray(np.array([calc(jnp.float32(0.9), t) for t in trees]) * 0.5)
    held_labels = jnp.asarray(np.array([calc(jnp.float32(0.9), t) for t in held]) * 0.5)

    def loss(p, forest, y):
        return masked_mean((calc.roots(p, forest) - y) ** 2, forest.root_mask)

    def metrics(p, forest, y):
        err = jnp.where(forest.root_mask, (calc.roots(p, forest) - y) ** 2, 0.0)
        return {"mse": (jnp.sum(err), jnp.sum(forest.root_mask))}

    kw = dict(labels=labels, optimizer=optax.adam(0.01), epochs=2, batch_size=8, window=2,
              eval_fn=metrics, eval_labels=held_labels, progress=False)
    of_trees = fit(loss, jnp.float32(0.3), trees, eval_trees=held, kinds=OPS, **kw)
    of_forests = fit(loss, jnp.float32(0.3), rj.Forest.from_trees(trees, kinds=OPS),
                     eval_trees=rj.Forest.from_trees(held, kinds=OPS), **kw)
    assert float(of_trees.params) == float(of_forests.params) != 0.3
    for a, b in zip(of_trees.history, of_forests.history, strict=True):
        assert (a["loss"], a["metrics"], a["new_shapes"]) == (b["loss"], b["metrics"], b["new_shapes"])


def test_a_forest_dataset_is_refused_when_batches_cannot_cut_it():
    leaf = rj.Tree(1.0)
    good = rj.Forest.from_trees([rj.Tree(0.0, [leaf]), rj.Tree(2.0)])
    cases = [
        (good.padded(num_roots=4), ValueError, "batches: this Forest is padded"),
        (rj.Forest.from_trees([rj.Tree(0.0, [leaf]), rj.Tree(2.0, [leaf])]), ValueError,
         "batches: node 1 of this Forest belongs to several trees"),
        (jax.tree.map(lambda a: a, good), ValueError, "lost its host-side structure"),
        (jax.tree.map(lambda *a: np.stack(a), good, good), TypeError, "stacked on a leading axis"),
    ]
    for forest, error, message in cases:
        with pytest.raises(error, match=message):
            batches(forest, 2)
    with pytest.raises(ValueError, match=r"kinds=\['A'\] differs from this Forest's vocabulary \(None\)"):
        batches(good, 2, kinds=["A"])
    with pytest.raises(ValueError, match="fit: trees: this Forest is padded"):
        fit(lambda p, f, y: 0.0, 0.0, good.padded(num_roots=4), optimizer=optax.sgd(0.1), epochs=1, batch_size=2)
    tagged = rj.Forest.from_parents([-1, 0, -1], np.ones(3, np.float32), kind=["A"] * 3, kinds=["A", "B"])
    for trees, held in ((tagged, good), (good, tagged), (tagged, rj.Forest.from_parents(
            [-1, 0, -1], np.ones(3, np.float32), kind=["A"] * 3, kinds=["B", "A"]))):
        with pytest.raises(ValueError, match="fit: eval_trees: this Forest's kinds vocabulary .* "
                           "differs from the training set's"):
            fit(lambda p, f, y: 0.0, 0.0, trees, optimizer=optax.sgd(0.1), epochs=1, batch_size=2,
                eval_fn=lambda p, f, y: {}, eval_trees=held)
    ints = rj.Forest.from_trees([rj.Tree(1), rj.Tree(2)])
    with pytest.raises(ValueError, match="the node data of eval_trees differ from the training trees'"):
        fit(lambda p, f, y: 0.0, 0.0, good, optimizer=optax.sgd(0.1), epochs=1, batch_size=2,
            eval_fn=lambda p, f, y: {}, eval_trees=ints)
