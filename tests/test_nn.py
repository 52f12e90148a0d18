"""The model zoo (recjax.nn): compiled equals eager recursion, values and gradients."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals
from models import assert_trees_close, node_subtrees, random_binary_tree, random_tree

import recjax as rj
from recjax import nn

VOCAB, EMBED, HIDDEN = 11, 5, 4
CLASSES = 3
SEEDS = (0, 1, 2)  # random forests compared with eager recursion on every node


# ---------------------------------------------------------------------- forests


def binary_trees(rng):
    return [random_binary_tree(rng, int(rng.integers(1, 6)), vocab=VOCAB) for _ in range(5)]


def arity_tree(rng, num_nodes, max_arity):
    """A random tree of at most ``num_nodes`` nodes whose arities are drawn from 0..max_arity."""
    kids = [[]]
    frontier = [0]
    while frontier:
        i = frontier.pop(int(rng.integers(len(frontier))))
        k = min(int(rng.integers(max_arity + 1)), num_nodes - len(kids))
        kids[i] = list(range(len(kids), len(kids) + k))
        kids += [[] for _ in range(k)]
        frontier += kids[i]
    built = {}
    for i in reversed(range(len(kids))):  # children have larger ids than parents
        built[i] = rj.Tree({"token": int(rng.integers(VOCAB))}, [built[c] for c in kids[i]])
    return built[0]


def staircase(rng, max_arity):
    """A tree with one node of every arity 1..max_arity: each first child has one child less."""
    token = lambda: {"token": int(rng.integers(VOCAB))}
    node = rj.Tree(token())
    for k in range(1, max_arity + 1):
        node = rj.Tree(token(), [node] + [rj.Tree(token()) for _ in range(k - 1)])
    return node


def trees_up_to(max_arity):
    def make(rng):
        trees = [arity_tree(rng, int(rng.integers(1, 9)), max_arity) for _ in range(3)]
        return trees + [staircase(rng, max_arity)]

    return make


def random_dag(rng, n=16, max_arity=4):
    """Children lists of a random DAG (node i's children are later nodes) and its tokens."""
    children = []
    for i in range(n):
        later = np.arange(i + 1, n)
        k = int(rng.integers(0, min(max_arity, later.size) + 1))
        children.append(rng.choice(later, size=k, replace=False).tolist())
    return children, rng.integers(VOCAB, size=n)


def dag_as_trees(children, tokens):
    """One shared ``rj.Tree`` per node of the DAG (children before parents)."""
    built = {}
    for i in reversed(range(len(children))):
        built[i] = rj.Tree({"token": int(tokens[i])}, [built[c] for c in children[i]])
    return [built[i] for i in range(len(children))]


# ---------------------------------------------------------------------- the models


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: rj.Recursive
    init: Callable  # key -> params
    forest_kind: str  # "binary", "arity3", "any" (arities 0-5) or "dag"
    hidden: Callable = lambda out: out  # the model's output -> h

    def __str__(self):
        return self.name

    def sample(self, seed):
        """A random forest, the ``Tree`` of each of its nodes in node order, and its roots."""
        rng = np.random.default_rng(seed)
        if self.forest_kind == "dag":
            children, tokens = random_dag(rng)
            forest = rj.Forest.from_children(children, {"token": tokens})
            nodes = dag_as_trees(children, tokens)
            roots = [nodes[r] for r in forest.roots.tolist()]
        else:
            make = {"binary": binary_trees, "arity3": trees_up_to(3), "any": trees_up_to(5)}
            roots = make[self.forest_kind](rng)
            forest = rj.Forest.from_trees(roots)
            nodes = node_subtrees(roots)
        return forest, nodes, roots


def _first(out):
    return out[0]


CASES = [
    Case("tree_rnn", nn.tree_rnn, lambda k: nn.init_tree_rnn(k, VOCAB, EMBED, HIDDEN), "binary"),
    Case("rntn", nn.rntn, lambda k: nn.init_rntn(k, VOCAB, HIDDEN), "binary"),
    Case("tree_fc", nn.tree_fc, lambda k: nn.init_tree_fc(k, VOCAB, HIDDEN), "binary"),
    Case(
        "tree_lstm_binary",
        nn.tree_lstm,
        lambda k: nn.init_tree_lstm(k, VOCAB, EMBED, HIDDEN, arity=2),
        "binary",
        _first,
    ),
    Case(
        "tree_lstm_arity3",
        nn.tree_lstm,
        lambda k: nn.init_tree_lstm(k, VOCAB, EMBED, HIDDEN, arity=3),
        "arity3",
        _first,
    ),
    Case(
        "child_sum_tree_lstm",
        nn.child_sum_tree_lstm,
        lambda k: nn.init_child_sum_tree_lstm(k, VOCAB, EMBED, HIDDEN),
        "any",
        _first,
    ),
    Case("tree_gru", nn.tree_gru, lambda k: nn.init_tree_gru(k, VOCAB, EMBED, HIDDEN), "any"),
    Case(
        "child_attention",
        nn.child_attention,
        lambda k: nn.init_child_attention(k, VOCAB, EMBED, HIDDEN),
        "any",
    ),
    Case("dag_rnn", nn.dag_rnn, lambda k: nn.init_dag_rnn(k, VOCAB, EMBED, HIDDEN), "dag"),
]


def stack(outs):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


# ---------------------------------------------------------------------- compiled == eager


def test_forests_have_the_intended_shapes():
    for case in CASES:
        for seed in SEEDS + (10,):
            forest, nodes, _ = case.sample(seed)
            assert forest.num_nodes == len(nodes) <= 45, case.name
            arities = {len(forest.children(i)) for i in range(forest.num_nodes)}
            if case.forest_kind == "binary":
                assert arities == {0, 2}, case.name
            elif case.forest_kind == "arity3":
                assert {0, 1, 2, 3} == arities, case.name
            elif case.forest_kind == "any":
                assert arities == set(range(6)), case.name
            else:  # a DAG: some node has several parents
                edges = np.concatenate([forest.children(i) for i in range(forest.num_nodes)])
                assert np.bincount(edges).max() >= 2, case.name


@functools.cache
def padded_samples(case):
    """Every seed's forest, padded to one shape so that a case compiles its programs once."""
    samples = [case.sample(seed) for seed in SEEDS]
    forests = rj.Forest.pad_all([forest for forest, _, _ in samples])
    return [(padded, nodes, roots) for padded, (_, nodes, roots) in zip(forests, samples)]


# A scalar loss: a linear readout of the roots' h and a cross entropy against labels.


def params_with_readout(case, key):
    key_model, key_out = jax.random.split(key)
    readout = 0.5 * jax.random.normal(key_out, (HIDDEN, CLASSES))
    return {"model": case.init(key_model), "out": readout}


def root_labels(num_roots, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(CLASSES, size=num_roots))


@jax.jit
def readout_loss(h, out, roots, root_mask, labels):
    """Mean cross entropy of ``h[roots] @ out`` over the real roots (jitted by itself, so
    that the non-jitted path runs ``.batch`` outside jit and little else op by op)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(h[roots] @ out, labels)
    mask = root_mask.astype(ce.dtype)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def batched_loss(case, params, forest, labels):
    """The loss over the forest's roots, and every node's output (aux)."""
    out = case.model.batch(params["model"], forest)
    h = case.hidden(out)
    return readout_loss(h, params["out"], forest.roots, forest.root_mask, labels), out


def eager_loss(case, params, roots, labels):
    h = jnp.stack([case.hidden(case.model(params["model"], r)) for r in roots])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"], labels).mean()


@functools.cache
def value_and_grad(case, jit):
    f = jax.value_and_grad(functools.partial(batched_loss, case), has_aux=True)
    return jax.jit(f) if jit else f


def padded_problem(case, seed):
    forest, nodes, roots = padded_samples(case)[SEEDS.index(seed)]
    labels = root_labels(len(roots), seed)
    padded_labels = jnp.zeros(forest.roots.shape, labels.dtype).at[: len(roots)].set(labels)
    return forest, nodes, roots, labels, padded_labels


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_gradients_match_eager(case, seed):
    forest, nodes, roots, labels, padded_labels = padded_problem(case, seed)
    params = params_with_readout(case, jax.random.key(seed))
    want_out = stack([case.model(params["model"], n) for n in nodes])
    want_loss, want_grad = jax.value_and_grad(eager_loss, argnums=1)(case, params, roots, labels)
    for jit in (False, True):
        (loss, out), grad = value_and_grad(case, jit)(params, forest, padded_labels)
        # every node's output (the padding rows after them are meaningless)
        assert_trees_close(jax.tree.map(lambda a: a[: len(nodes)], out), want_out)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        assert_trees_close(grad, want_grad, atol=1e-4, rtol=1e-4)
    for name, g in want_grad["model"].items():  # every parameter takes part
        assert np.abs(np.asarray(g)).max() > 0, (case.name, name)


ADAM = optax.adam(0.05)


@jax.jit
def adam_update(grads, state, params):
    updates, state = ADAM.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_adam_steps_lower_the_loss():
    for case in CASES:
        forest, _, _, _, labels = padded_problem(case, SEEDS[0])  # compiled by the test above
        params = params_with_readout(case, jax.random.key(1))
        state = ADAM.init(params)
        losses = []
        for _ in range(6):
            (loss, _), grads = value_and_grad(case, True)(params, forest, labels)
            params, state = adam_update(grads, state, params)
            losses.append(float(loss))
        assert np.isfinite(losses).all(), case.name
        assert losses[-1] < losses[0] - 0.05, (case.name, losses)


# ---------------------------------------------------------------------- what the models mean


def test_dag_rnn_from_shared_trees_equals_from_children():
    children, tokens = random_dag(np.random.default_rng(3), n=10)
    nodes = dag_as_trees(children, tokens)
    p = nn.init_dag_rnn(jax.random.key(3), VOCAB, EMBED, HIDDEN)
    by_children = rj.Forest.from_children(children, {"token": tokens})
    root_trees = [nodes[r] for r in by_children.roots.tolist()]
    by_trees = rj.Forest.from_trees(root_trees)
    assert by_trees.num_nodes == len(nodes)  # shared objects are one node each
    # node j of by_trees is the Tree node_subtrees(...)[j], node i of by_children is nodes[i]
    index = {id(n): i for i, n in enumerate(nodes)}
    order = [index[id(n)] for n in node_subtrees(root_trees)]
    np.testing.assert_allclose(
        nn.dag_rnn.batch(p, by_trees),
        nn.dag_rnn.batch(p, by_children)[np.array(order)],
        rtol=1e-5,
        atol=1e-6,
    )


def test_tree_lstm_uses_the_first_k_position_blocks():
    """Nodes with k < arity children compute what an arity-k Tree-LSTM computes."""
    p3 = nn.init_tree_lstm(jax.random.key(4), VOCAB, EMBED, HIDDEN, arity=3)
    chain = rj.Tree({"token": 1}, [rj.Tree({"token": 2}, [rj.Tree({"token": 3})])])
    trees = {1: chain, 2: random_binary_tree(np.random.default_rng(4), 4, vocab=VOCAB)}
    for k, tree in trees.items():
        keep = np.arange((3 + k) * HIDDEN)  # columns [i, o, u, f_0, ..., f_{k-1}]
        pk = {"emb": p3["emb"], "W": p3["W"][:, keep], "b": p3["b"][keep]}
        pk["U"] = p3["U"][:k][:, :, keep]
        assert_trees_close(nn.tree_lstm(p3, tree), nn.tree_lstm(pk, tree))


def test_child_attention_with_one_child_takes_it_whole():
    p = nn.init_child_attention(jax.random.key(5), VOCAB, EMBED, HIDDEN)
    child = rj.Tree({"token": 2}, [rj.Tree({"token": 7}), rj.Tree({"token": 1})])
    h_child = nn.child_attention(p, child)
    x = p["emb"][4]
    want = jnp.tanh(x @ p["W"] + h_child @ p["U"] + p["b"])
    only_child = rj.Tree({"token": 4}, [child])
    np.testing.assert_allclose(nn.child_attention(p, only_child), want, rtol=1e-5)
    # identical children share the weight equally, so the context is that child's h
    twins = rj.Tree({"token": 4}, [child, child, child])
    np.testing.assert_allclose(nn.child_attention(p, twins), want, rtol=1e-5)


def test_fixed_arity_models_reject_wider_nodes():
    ternary = rj.Tree({"token": 0}, [rj.Tree({"token": k}) for k in range(3)])
    forest = rj.Forest.from_trees([ternary])
    for case in [c for c in CASES if c.forest_kind == "binary"]:  # Tree-LSTM: arity=2
        p = case.init(jax.random.key(0))
        with pytest.raises(ValueError, match="children"):
            case.model(p, ternary)
        with pytest.raises(ValueError, match="3 children"):
            case.model.batch(p, forest)


# ---------------------------------------------------------------------- recjax bugs found here


def _softmax_pool(normalise_inside_map):
    """A scalar softmax-weighted pool of the children: the pattern of child_attention."""

    @rj.recursive
    def f(w, node):
        x = w * node.data
        if node.is_leaf:
            return jnp.tanh(x)
        s = node.children.map(lambda c: jnp.exp(f(w, c))).sum()  # > 0 at every real node
        if normalise_inside_map:
            return jnp.tanh(x + node.children.map(lambda c: jnp.exp(f(w, c)) / s * f(w, c)).sum())
        return jnp.tanh(x + node.children.map(lambda c: jnp.exp(f(w, c)) * f(w, c)).sum() / s)

    return f


def test_padding_rows_never_divide_by_an_empty_sum():
    # Regression: padding rows once had no children in map mode, so a node-level
    # children.map(...).sum() was 0 there and x / sum made NaN gradients. Now every
    # padding row owns one edge to a real leaf (see recjax._planner).
    f = _softmax_pool(normalise_inside_map=False)
    tree = rj.Tree(0.3, [rj.Tree(0.5, [rj.Tree(1.0), rj.Tree(-2.0)]), rj.Tree(0.7)])
    forest = rj.Forest.from_trees([tree])
    w = jnp.float32(0.9)
    np.testing.assert_allclose(f.batch(w, forest)[0], f(w, tree), rtol=1e-6)  # values are right
    want = jax.grad(lambda w: f(w, tree))(w)
    np.testing.assert_allclose(jax.grad(lambda w: f.batch(w, forest)[0])(w), want, rtol=1e-5)  # NaN


def test_unused_edge_slots_never_read_an_empty_sum():
    # Regression: unused edge slots borrow the last row's node-level values, which was a
    # padding row with an empty sum (0); dividing by it inside map made NaN gradients.
    f = _softmax_pool(normalise_inside_map=True)
    # one step of a binary node, then one of a unary node: the second has a padding edge
    tree = rj.Tree(0.3, [rj.Tree(0.5, [rj.Tree(1.0), rj.Tree(-2.0)])])
    forest = rj.Forest.from_trees([tree])
    w = jnp.float32(0.9)
    np.testing.assert_allclose(f.batch(w, forest)[0], f(w, tree), rtol=1e-6)  # values are right
    want = jax.grad(lambda w: f(w, tree))(w)
    np.testing.assert_allclose(jax.grad(lambda w: f.batch(w, forest)[0])(w), want, rtol=1e-5)  # NaN


def test_bidirectional_tree_lstm_matches_eager_at_every_node():
    rng = np.random.default_rng(3)
    trees = [
        random_tree(rng, int(rng.integers(1, 12)), 4, lambda i: {"token": np.int32(rng.integers(VOCAB))})
        for _ in range(3)
    ]
    forest = rj.Forest.from_trees(trees)
    positions = [pos for t in trees for pos in t.walk()]
    p = nn.init_bidirectional_tree_lstm(jax.random.key(0), vocab=VOCAB, embed=4, hidden=HIDDEN)
    want = stack([nn.bidirectional_tree_lstm(p, pos) for pos in positions])
    assert_trees_close(nn.bidirectional_tree_lstm.batch(p, forest), want)

    def loss(p):  # every node's top-down state (a tagging loss reads them all)
        return jnp.sum(jnp.tanh(nn.bidirectional_tree_lstm.batch(p, forest)[0]))

    def eager(p):
        return sum(jnp.sum(jnp.tanh(nn.bidirectional_tree_lstm(p, pos)[0])) for pos in positions)

    assert_trees_close(jax.jit(jax.grad(loss))(p), jax.grad(eager)(p), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- activations

def _exact_slope_sigmoid(x):  # float64: sigmoid(x) * sigmoid(-x)
    return np.exp(-np.logaddexp(0, -x) - np.logaddexp(0, x))


def _exact_slope_tanh(x):
    return 1 / np.cosh(x) ** 2


ACTIVATIONS = [
    (nn.sigmoid, jax.nn.sigmoid, _exact_slope_sigmoid),
    (nn.tanh, jnp.tanh, _exact_slope_tanh),
]
# Saturated, steep and flat points alike: the slope is recomputed from the output, so
# it must stay as accurate as JAX's where the output rounds to +-1 or 0.
POINTS = jnp.concatenate([jnp.linspace(-40.0, 40.0, 161), jnp.array([-1e-3, 1e-3, 0.0])])


@pytest.mark.parametrize("ours, theirs, exact", ACTIVATIONS, ids=["sigmoid", "tanh"])
def test_activations_match_jax_in_every_mode(ours, theirs, exact):
    np.testing.assert_array_equal(ours(POINTS), theirs(POINTS))
    slope = lambda f: np.asarray(jax.vmap(jax.grad(f))(POINTS), np.float64)
    truth = exact(np.asarray(POINTS, np.float64))
    # float32 rounding of y near saturation: both forms are off by up to a few ulps of 1.
    assert np.abs(slope(ours) - truth).max() <= np.abs(slope(theirs) - truth).max() + 1e-9
    np.testing.assert_allclose(slope(ours), truth, rtol=1e-5, atol=1e-6)
    tangent = jnp.cos(POINTS)
    np.testing.assert_allclose(
        jax.jvp(ours, (POINTS,), (tangent,))[1], jax.jvp(theirs, (POINTS,), (tangent,))[1],
        rtol=1e-5, atol=1e-6,
    )
    curvature = lambda f: jax.vmap(jax.grad(jax.grad(f)))(POINTS)
    np.testing.assert_allclose(curvature(ours), curvature(theirs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ours, theirs, _", ACTIVATIONS, ids=["sigmoid", "tanh"])
def test_activations_save_only_their_output(ours, theirs, _, capsys):
    """Reverse mode keeps one array per call (the output), where JAX's keeps two."""
    w = jnp.arange(5.0)

    def saved(f):
        print_saved_residuals(lambda x, w: jnp.sum(f(x) * w), POINTS[:5], w)
        lines = capsys.readouterr().out.strip().splitlines()
        return [line for line in lines if "argument" not in line]  # w: needed by both

    assert len(saved(theirs)) == 2
    assert len(saved(ours)) == 1


def test_a_scanned_cell_stacks_fewer_arrays():
    """Inside a scan every saved array is stacked over the steps: the models' case."""

    def cell(act_sig, act_tanh):
        def run(w, xs):
            def step(c, x):
                c = act_sig(x @ w) * act_tanh(c) + c
                return c, None

            return jnp.sum(lax.scan(step, jnp.zeros(3), xs)[0])

        return run

    w, xs = jnp.eye(3), jnp.ones((7, 3))
    size = lambda f: jax.jit(jax.grad(f)).lower(w, xs).compile().memory_analysis().temp_size_in_bytes
    assert size(cell(nn.sigmoid, nn.tanh)) < size(cell(jax.nn.sigmoid, jnp.tanh))


def test_models_equal_their_documented_equations():
    """child_attention, tree_gru and tree_fc against their docstrings' equations written
    out here in plain jnp (the other tests compare each model with its own eager call,
    which shares the model's code), and the Child-Sum forget-gate bias starts at 1."""
    key = jax.random.key(0)
    tree = rj.Tree({"token": 0}, [rj.Tree({"token": 1}),
                                  rj.Tree({"token": 2}, [rj.Tree({"token": 3}), rj.Tree({"token": 4})]),
                                  rj.Tree({"token": 2})])
    forest = rj.Forest.from_trees([tree])

    p = jax.tree.map(lambda a: 3.0 * a, nn.init_child_attention(key, vocab=5, embed=3, hidden=4, attention=6))

    def attention(t):  # scores = q . (h W_k) / sqrt(attention), softmax over the children
        x = p["emb"][t.data["token"]]
        if not t.children:
            return jnp.tanh(x @ p["W"] + p["b"])
        hs = [attention(c) for c in t.children]
        q = x @ p["W_q"]
        w = jax.nn.softmax(jnp.stack([q @ (h @ p["W_k"]) / jnp.sqrt(6.0) for h in hs]))
        return jnp.tanh(x @ p["W"] + sum(wi * h for wi, h in zip(w, hs)) @ p["U"] + p["b"])

    np.testing.assert_allclose(nn.child_attention.roots(p, forest)[0], attention(tree), atol=1e-5)

    g = jax.tree.map(lambda a: a + 0.3, nn.init_tree_gru(key, vocab=5, embed=3, hidden=4))

    def gru(t):  # z * h_sum + (1 - z) * candidate; the reset gate per child
        x = g["emb"][t.data["token"]]
        hs = [gru(c) for c in t.children]
        h_sum = sum(hs, jnp.zeros(4))
        z = jax.nn.sigmoid(x @ g["W_z"] + h_sum @ g["U_z"] + g["b_z"])
        r_h = sum((jax.nn.sigmoid(x @ g["W_r"] + h @ g["U_r"] + g["b_r"]) * h for h in hs), jnp.zeros(4))
        return z * h_sum + (1 - z) * jnp.tanh(x @ g["W_h"] + r_h @ g["U_h"] + g["b_h"])

    np.testing.assert_allclose(nn.tree_gru.roots(g, forest)[0], gru(tree), atol=1e-5)

    binary = rj.Tree({"token": 0}, [rj.Tree({"token": 1}),
                                    rj.Tree({"token": 0}, [rj.Tree({"token": 3}), rj.Tree({"token": 4})])])
    f = nn.init_tree_fc(key, vocab=5, hidden=4)

    def fc(t):  # tanh([h_left, h_right] W + b)
        if not t.children:
            return f["emb"][t.data["token"]]
        h_l, h_r = [fc(c) for c in t.children]
        return jnp.tanh(jnp.concatenate([h_l, h_r]) @ f["W"] + f["b"])

    np.testing.assert_allclose(nn.tree_fc.roots(f, rj.Forest.from_trees([binary]))[0], fc(binary), atol=1e-5)
    np.testing.assert_array_equal(nn.init_child_sum_tree_lstm(key, vocab=5, embed=3, hidden=2)["b_f"], [1.0, 1.0])
