"""Top-down and bidirectional passes, mutual recursion, child positions and readouts.

Every compiled result is compared with plain Python recursion (``f(position)`` for each
node of ``tree.walk()``), values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import assert_trees_close, random_tree, stdlib_functions

import recjax as rj

# ---------------------------------------------------------------------- helpers


# jax >= 0.7 exports it; jax 0.6.2 (the newest for Python 3.10) keeps it internal.
_jaxprs_in_params = getattr(jax.extend.core, "jaxprs_in_params", None)
if _jaxprs_in_params is None:
    from jax._src.core import jaxprs_in_params as _jaxprs_in_params


def random_forest(seed, num_trees=5, max_nodes=30, max_arity=4):
    rng = np.random.default_rng(seed)
    trees = [
        random_tree(
            rng,
            int(rng.integers(1, max_nodes)),
            max_arity,
            lambda i: {"x": np.float32(rng.normal()), "token": np.int32(rng.integers(7))},
        )
        for _ in range(num_trees)
    ]
    return trees, rj.Forest.from_trees(trees)


def eager_rows(fn, trees, *args):
    """``fn`` by plain recursion at every node, in ``Forest.from_trees(trees)`` order."""
    return [fn(*args, pos) for tree in trees for pos in tree.walk()]


def stack(rows):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


# ---------------------------------------------------------------------- top-down


@rj.recursive
def depth(node):
    return jnp.int32(0) if node.is_root else depth(node.parent) + 1


@rj.recursive
def path_code(node):
    """Root-to-node path as a number: 1, then digit ``index`` per step (base 8)."""
    if node.is_root:
        return jnp.float32(1)
    return path_code(node.parent) * 8 + node.index.astype(jnp.float32)


@pytest.mark.parametrize("seed", range(4))
def test_depth_and_path_encoding(seed):
    trees, forest = random_forest(seed)
    np.testing.assert_array_equal(depth.batch(forest), stack(eager_rows(depth, trees)))
    np.testing.assert_array_equal(path_code.batch(forest), stack(eager_rows(path_code, trees)))


def test_top_down_reads_leaf_flag_and_data():
    @rj.recursive
    def label(w, node):
        base = w * node.data["x"]
        if node.is_root:
            return jnp.tanh(base)
        if node.is_leaf:  # a top-down function may specialise on leaves
            return jnp.sin(label(w, node.parent) + base)
        return jnp.cos(label(w, node.parent) * base)

    trees, forest = random_forest(7)
    w = jnp.float32(0.8)
    np.testing.assert_allclose(label.batch(w, forest), stack(eager_rows(label, trees, w)), rtol=1e-5)
    g = jax.grad(lambda w: label.batch(w, forest).sum())(w)
    ge = jax.grad(lambda w: sum(eager_rows(label, trees, w)))(w)
    np.testing.assert_allclose(g, ge, rtol=1e-4)


@pytest.mark.parametrize("block", [1, 3])
def test_leaves_in_blocks_match_eager(block, monkeypatch):
    """The leaves' batched op runs in blocks of ``LEAF_BLOCK`` rows and one op for the
    rest (2,048 rows; shrunk here so a few small trees take several blocks): a bottom-up
    pass (leaves first) and a top-down one (leaves last) still give plain recursion's
    values and gradients."""
    from recjax import _executor

    monkeypatch.setattr(_executor, "LEAF_BLOCK", block)

    @rj.recursive  # defined here: nothing was compiled with another block size
    def up(w, node):
        x = w[0] * node.data["x"]
        if node.is_leaf:
            return jnp.tanh(x + w[1])
        return jnp.tanh(x + w[2] * node.children.map(lambda c: up(w, c)).sum())

    @rj.recursive
    def down(w, node):
        base = up(w, node) * w[3]
        if node.is_root:
            return jnp.sin(base)
        if node.is_leaf:
            return jnp.cos(down(w, node.parent) + base)
        return jnp.sin(down(w, node.parent) * base)

    trees, forest = random_forest(20 + block, num_trees=6, max_nodes=16)
    assert forest.plan.key.num_leaf_rows > 3 * block  # a block, a loop over blocks, the rest
    w = jnp.array([0.9, -0.3, 0.7, 1.2])
    scans = str(jax.make_jaxpr(lambda w: down.batch(w, forest))(w)).count("scan[")
    assert scans >= 2 + 2 * len(forest.plan.key.phases)  # the phases' and the leaves' loops
    np.testing.assert_allclose(down.batch(w, forest), stack(eager_rows(down, trees, w)), rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda w: jnp.sum(down.batch(w, forest) ** 2)))(w)
    ge = jax.grad(lambda w: sum(r**2 for r in eager_rows(down, trees, w)))(w)
    np.testing.assert_allclose(g, ge, rtol=1e-4, atol=1e-6)


def test_up_to_two_blocks_of_leaves_run_as_one_op(monkeypatch):
    """At most ``2 * LEAF_BLOCK`` leaf rows run as one op (no leaf loop, no second
    block): values and gradients still equal plain recursion's."""
    from recjax import _executor

    trees, forest = random_forest(7, num_trees=6, max_nodes=16)
    rows = forest.plan.key.num_leaf_rows
    w = jnp.array([0.9, -0.3, 0.7])

    def program(block):
        monkeypatch.setattr(_executor, "LEAF_BLOCK", block)

        @rj.recursive  # defined per block: nothing was compiled with another block size
        def up(w, node):
            x = w[0] * node.data["x"]
            if node.is_leaf:
                return jnp.tanh(x + w[1])
            return jnp.tanh(x + w[2] * node.children.map(lambda c: up(w, c)).sum())

        # The leaf template's tanh, once per op that computes leaves (+ the phases' loops).
        return up, str(jax.make_jaxpr(lambda w: up.batch(w, forest))(w)).count(" tanh ")

    _, one_op = program(10 * rows)
    _, in_blocks = program(rows // 3)
    up, two_blocks = program((rows + 1) // 2)
    assert in_blocks > one_op == two_blocks  # the count sees each block; one op here
    np.testing.assert_allclose(up.batch(w, forest), stack(eager_rows(up, trees, w)), rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda w: jnp.sum(up.batch(w, forest) ** 2)))(w)
    ge = jax.grad(lambda w: sum(r**2 for r in eager_rows(up, trees, w)))(w)
    np.testing.assert_allclose(g, ge, rtol=1e-4, atol=1e-6)


def test_second_derivatives_equal_plain_recursion():
    """Hessians (forward-over-reverse and reverse-over-reverse) of a top-down function,
    of a bottom-up one over children.map with child.index and of a fixed-arity one.
    A top-down pass once carried the roots' tangent through a write the second
    derivative did not see: first derivatives were right, Hessians were not."""
    rng = np.random.default_rng(3)

    @rj.recursive
    def up(w, node):
        x = node.data
        if node.is_leaf:
            return jnp.tanh(x * w[0])
        return jnp.tanh(x * w[1] + node.children.map(lambda c: up(w, c) * w[2] * (c.index + 1)).sum())

    @rj.recursive
    def binary(w, node):
        if node.is_leaf:
            return jnp.tanh(node.data * w[0])
        a, b = [binary(w, c) for c in node.children]
        return jnp.tanh(node.data * w[1] + a * w[2] - b)

    @rj.recursive
    def down(w, node):
        if node.is_root:
            return jnp.tanh(node.data * w[0])
        return jnp.sin(down(w, node.parent) * w[1] + w[2] * node.index)

    def full(k):
        return rj.Tree(np.float32(rng.normal()), [] if k == 0 else [full(k - 1), full(k - 1)])

    trees = [full(3), full(1), rj.Tree(np.float32(0.3), [full(2), rj.Tree(np.float32(-1.0))])]
    forest = rj.Forest.from_trees(trees)
    positions = [q for t in trees for q in t.walk()]
    w = jnp.array([0.5, 0.9, -0.7], jnp.float32)
    for f in (up, binary, down):
        batched = lambda w, f=f: jnp.sum(f.batch(w, forest) ** 2)
        plain = lambda w, f=f: sum(f(w, q) ** 2 for q in positions)
        want = jax.hessian(plain)(w)
        np.testing.assert_allclose(jax.hessian(batched)(w), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(jax.jacrev(jax.jacrev(batched))(w), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- bidirectional


@rj.recursive
def up_lstm(p, node):
    """Child-Sum Tree-LSTM (bottom-up)."""
    x = p["emb"][node.data["token"]]
    h_sum = node.children.map(lambda c: up_lstm(p, c)[0]).sum(initial=jnp.zeros(p["U"].shape[0]))
    i, o, u = jnp.split(x @ p["W"] + h_sum @ p["U"], 3)
    f_c = node.children.map(lambda c: jax.nn.sigmoid(x @ p["Wf"] + up_lstm(p, c)[0] @ p["Uf"]) * up_lstm(p, c)[1])
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + f_c.sum()
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


@rj.recursive
def down_lstm(p, node):
    """Top-down LSTM over the bottom-up states (Teng & Zhang 2017): parent, then own h."""
    h_up = up_lstm(p, node)[0]
    if node.is_root:
        h_prev, c_prev = jnp.zeros_like(h_up), jnp.zeros_like(h_up)
    else:
        h_prev, c_prev = down_lstm(p, node.parent)
    i, f, o, u = jnp.split(h_up @ p["Wd"] + h_prev @ p["Ud"], 4)
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + jax.nn.sigmoid(f) * c_prev
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


@rj.recursive
def bidirectional(p, node):
    """Both directions' hidden states, concatenated: a per-node readout of two passes."""
    return jnp.concatenate([up_lstm(p, node)[0], down_lstm(p, node)[0]])


def lstm_params(key, dim=4, hidden=3, vocab=7):
    k = jax.random.split(key, 7)
    n = lambda kk, shape: 0.5 * jax.random.normal(kk, shape)  # noqa: E731
    return {
        "emb": n(k[0], (vocab, dim)), "W": n(k[1], (dim, 3 * hidden)),
        "U": n(k[2], (hidden, 3 * hidden)), "Wf": n(k[3], (dim, hidden)),
        "Uf": n(k[4], (hidden, hidden)), "Wd": n(k[5], (hidden, 4 * hidden)),
        "Ud": n(k[6], (hidden, 4 * hidden)),
    }


@pytest.mark.parametrize("seed", range(2))
def test_bidirectional_tree_lstm_values_and_gradients(seed):
    # small trees: the eager reference recomputes every position's ancestors and subtrees
    trees, forest = random_forest(seed + 10, num_trees=3, max_nodes=10)
    p = lstm_params(jax.random.key(seed))
    got = bidirectional.batch(p, forest)
    want = stack(eager_rows(bidirectional, trees, p))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    loss = lambda p: jnp.sum(jnp.sin(bidirectional.batch(p, forest)))  # noqa: E731
    eager_loss = lambda p: sum(jnp.sum(jnp.sin(r)) for r in eager_rows(bidirectional, trees, p))  # noqa: E731
    assert_trees_close(jax.jit(jax.grad(loss))(p), jax.grad(eager_loss)(p), atol=1e-4, rtol=1e-4)


def test_roots_read_out_the_roots_values_and_gradients():
    """``f.roots`` is plain recursion on each tree and ``f.batch(...)[roots]``: values
    (a bottom-up function with tuple outputs, and a program with a top-down pass),
    gradients, tangents and ``vmap``; a padded forest's padding roots read node 0's row."""
    trees, forest = random_forest(30, num_trees=5, max_nodes=16)
    p = lstm_params(jax.random.key(0))
    for fn in (up_lstm, bidirectional):
        got = fn.roots(p, forest)
        assert_trees_close(got, stack([fn(p, tree) for tree in trees]), atol=1e-5, rtol=1e-5)
        every = fn.batch(p, forest)
        assert_trees_close(got, jax.tree.map(lambda a: a[forest.roots], every), atol=1e-6, rtol=1e-6)

    loss = lambda p: sum(jnp.sum(jnp.sin(a)) for a in up_lstm.roots(p, forest))  # noqa: E731
    eager = lambda p: sum(jnp.sum(jnp.sin(a)) for tree in trees for a in up_lstm(p, tree))  # noqa: E731
    assert_trees_close(jax.jit(jax.grad(loss))(p), jax.grad(eager)(p), atol=1e-4, rtol=1e-4)
    t = jax.tree.map(jnp.ones_like, p)
    np.testing.assert_allclose(jax.jvp(loss, (p,), (t,))[1], jax.jvp(eager, (p,), (t,))[1], rtol=1e-4)
    halves = jax.vmap(lambda p: up_lstm.roots(p, forest))(jax.tree.map(lambda a: jnp.stack([a, a / 2]), p))
    half = up_lstm.roots(jax.tree.map(lambda a: a / 2, p), forest)
    assert_trees_close(jax.tree.map(lambda a: a[1], halves), half, atol=1e-6, rtol=1e-5)

    padded = forest.padded(num_roots=8)
    out = jax.jit(lambda p, f: up_lstm.roots(p, f))(p, padded)
    assert out[0].shape[0] == 8 and padded.root_mask.tolist() == [True] * 5 + [False] * 3
    want = jax.tree.map(lambda a: a[np.r_[forest.roots, 0, 0, 0]], up_lstm.batch(p, forest))
    assert_trees_close(out, want, atol=1e-6, rtol=1e-6)


def test_roots_of_a_tree_is_an_error_that_names_roots():
    with pytest.raises(TypeError, match=r"up_lstm\.roots\(\.\.\.\) takes a Forest, not a Tree"):
        up_lstm.roots(lstm_params(jax.random.key(0)), rj.Tree({"x": np.float32(1), "token": np.int32(0)}))


def test_bidirectional_runs_two_passes_and_one_program_per_bucket():
    from recjax import debug

    trees, forest = random_forest(3)
    p = lstm_params(jax.random.key(0))
    program = bidirectional._prepare((p, forest), {}).program
    assert [(d, [program.fns[i].rec._name for i in fids]) for d, fids in program.passes] == [
        ("up", ["up_lstm"]),
        ("down", ["down_lstm"]),
        ("up", ["bidirectional"]),
    ]
    other = random_forest(4)[1]
    want = [bidirectional.batch(p, forest), bidirectional.batch(p, other)]
    a, b = rj.Forest.pad_all([forest, other])
    before = bidirectional._num_traces
    step = jax.jit(lambda p, f: bidirectional.batch(p, f))
    for raw, padded, w in ((forest, a, want[0]), (other, b, want[1])):
        np.testing.assert_allclose(step(p, padded)[: raw.num_nodes], w, atol=1e-6)
    assert bidirectional._num_traces == before + 1
    debug.print_templates(bidirectional, p, forest)  # prints every function's templates


# ---------------------------------------------------------------------- changing arguments


def test_changing_arguments_error_shows_the_top_down_way():
    @rj.recursive
    def with_depth(node, d):
        return d + node.children.map(lambda c: with_depth(c, d + 1)).sum(initial=0.0)

    with pytest.raises(TypeError, match=r"depth\(node.parent\) \+ 1"):
        with_depth.batch(rj.Forest.from_parents([-1, 0]), jnp.float32(0))
    with pytest.raises(TypeError, match="write a top-down function"):
        with_depth(rj.Tree(1.0, [rj.Tree(2.0)]), 0.0)


# ---------------------------------------------------------------------- mutual recursion


@rj.recursive
def stmt(p, node):
    """Statements and expressions alternate by depth; each reads the other on children."""
    own = p["s"] * node.data["x"]
    if node.is_leaf:
        return jnp.tanh(own)
    return jnp.tanh(own + node.children.map(lambda c: expr(p, c)).sum())


@rj.recursive
def expr(p, node):
    if node.is_leaf:
        return jnp.float32(0.5) * node.data["x"]
    kids = [stmt(p, c) for c in node.children]  # fixed arity: one template per arity
    return jnp.sin(p["e"] * sum(k * (i + 1) for i, k in enumerate(kids)))


@pytest.mark.parametrize("seed", range(3))
def test_mutual_recursion_values_and_gradients(seed):
    trees, forest = random_forest(seed + 20)
    p = {"s": jnp.float32(0.9), "e": jnp.float32(1.3)}
    for fn in (stmt, expr):
        np.testing.assert_allclose(fn.batch(p, forest), stack(eager_rows(fn, trees, p)), atol=1e-6)
    program = stmt._prepare((p, forest), {}).program
    assert len(program.passes) == 1 and len(program.fns) == 2  # one loop computes both

    loss = lambda p: jnp.sum(stmt.batch(p, forest) ** 2)  # noqa: E731
    eager_loss = lambda p: sum(r**2 for r in eager_rows(stmt, trees, p))  # noqa: E731
    assert_trees_close(jax.grad(loss)(p), jax.grad(eager_loss)(p), atol=1e-4)


def test_three_way_mutual_recursion_and_same_node_calls():
    @rj.recursive
    def a(node):
        return node.data["x"] + node.children.map(b).sum()

    @rj.recursive
    def b(node):
        return 2 * c(node) + node.children.map(c).sum()  # c on the same node, then children

    @rj.recursive
    def c(node):
        return jnp.cos(node.data["x"]) + node.children.map(a).max(initial=0.0)

    trees, forest = random_forest(30)
    for fn in (a, b, c):
        np.testing.assert_allclose(fn.batch(forest), stack(eager_rows(fn, trees)), rtol=1e-5, atol=1e-6)


def test_same_node_cycle_and_mixed_direction_cycle_errors():
    @rj.recursive
    def f(node):
        return g(node) + 1.0

    @rj.recursive
    def g(node):
        return f(node) * 2.0

    forest = rj.Forest.from_parents([-1, 0], {"x": [1.0, 2.0]})
    with pytest.raises(TypeError, match="same node, which recurses forever"):
        f.batch(forest)
    with pytest.raises(TypeError, match="same node"):
        f(rj.Tree(1.0))

    @rj.recursive
    def u(node):
        return 1.0 + node.children.map(d).sum()

    @rj.recursive
    def d(node):
        return jnp.float32(0) if node.is_root else u(node.parent)

    with pytest.raises(TypeError, match="no order of levels"):
        u.batch(forest)


def test_calling_another_function_with_computed_or_different_arguments_is_an_error():
    @rj.recursive
    def inner(w, node):
        return w * node.data + node.children.map(lambda c: inner(w, c)).sum()

    @rj.recursive
    def computed(w, node):
        return inner(w * 2, node)

    @rj.recursive
    def differing(w, v, node):
        return inner(w, node) + node.children.map(lambda c: inner(v, c)).sum()

    forest = rj.Forest.from_parents([-1, 0], [1.0, 2.0])
    with pytest.raises(TypeError, match="computed there"):
        computed.batch(jnp.float32(1), forest)
    with pytest.raises(TypeError, match="same non-node arguments"):
        differing.batch(jnp.float32(1), jnp.float32(2), forest)


def test_calls_itself_on_children_and_parent_is_an_error():
    @rj.recursive
    def both(node):
        if node.is_root:
            return node.children.map(both).sum()
        return both(node.parent)

    with pytest.raises(TypeError, match="cannot also read node.children"):
        both.batch(rj.Forest.from_parents([-1, 0]))


# ---------------------------------------------------------------------- child positions


@rj.recursive
def attend(p, node):
    """Attention over any number of children with a position embedding (child.index)."""
    x = p["emb"][node.data["token"]]
    if node.is_leaf:
        return jnp.tanh(x)

    def score(c):
        h = attend(p, c) + p["pos"][jnp.minimum(c.index, 3)]
        return jnp.exp(h @ x), jnp.exp(h @ x) * h

    weight, total = node.children.map(score).sum()
    return jnp.tanh(x + total / weight)


def test_attention_with_child_index_values_and_gradients():
    trees, forest = random_forest(40, max_arity=6)
    k = jax.random.split(jax.random.key(1), 2)
    p = {"emb": 0.5 * jax.random.normal(k[0], (7, 4)), "pos": 0.5 * jax.random.normal(k[1], (4, 4))}
    np.testing.assert_allclose(attend.batch(p, forest), stack(eager_rows(attend, trees, p)), atol=1e-5)
    loss = lambda p: jnp.sum(attend.batch(p, forest)[forest.roots])  # noqa: E731
    eager_loss = lambda p: sum(jnp.sum(attend(p, t)) for t in trees)  # noqa: E731
    assert_trees_close(jax.grad(loss)(p), jax.grad(eager_loss)(p), atol=1e-4)


@rj.recursive
def gated(p, node):
    """Child terms that mix a row-level product (``x @ W``, once per node) with the child's."""
    x = jnp.tanh(p["emb"][node.data["token"]])
    zeros = jnp.zeros(5)
    xw = node.children.map(lambda c: x @ p["W"]).sum(initial=zeros)  # len(children) * (x @ W)
    mixed = node.children.map(lambda c: jax.nn.sigmoid(x @ p["W"] + gated(p, c)) * gated(p, c))
    return jnp.tanh(xw + mixed.sum(initial=zeros) + x[:1])


def _dot_lhs_rows(jaxpr, rhs_shape):
    """Leading sizes of every ``dot_general`` lhs whose rhs has ``rhs_shape``, nested jaxprs too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.invars[1].aval.shape == rhs_shape:
            found.append(eqn.invars[0].aval.shape[0])
        for sub in _jaxprs_in_params(eqn.params):
            found += _dot_lhs_rows(sub, rhs_shape)
    return found


def test_map_computes_what_does_not_depend_on_the_child_once_per_node():
    """``x @ W`` inside ``children.map`` runs on the step's rows, not on its child slots,
    and the values and gradients still equal plain recursion."""
    trees, forest = random_forest(41, num_trees=6, max_nodes=40, max_arity=6)
    k = jax.random.split(jax.random.key(2), 2)
    p = {"emb": jax.random.normal(k[0], (7, 3)), "W": 0.5 * jax.random.normal(k[1], (3, 5))}
    np.testing.assert_allclose(gated.batch(p, forest), stack(eager_rows(gated, trees, p)), atol=1e-5)
    loss = lambda p: jnp.sum(gated.batch(p, forest)[forest.roots] ** 2)
    eager_loss = lambda p: sum(jnp.sum(gated(p, t) ** 2) for t in trees)
    assert_trees_close(jax.grad(loss)(p), jax.grad(eager_loss)(p), atol=1e-4)

    widths = {ph.width for ph in forest.plan.key.phases}
    edges = {ph.edges for ph in forest.plan.key.phases}
    assert not widths & edges  # so that the two are told apart below
    rows = _dot_lhs_rows(jax.make_jaxpr(gated.batch)(p, forest).jaxpr, (3, 5))
    assert rows and set(rows) <= widths, (rows, widths, edges)


def test_child_index_with_fixed_arity_and_node_index_bottom_up():
    @rj.recursive
    def weighted(node):
        own = node.data["x"] * (node.index + 1).astype(jnp.float32)
        return own + sum(c.index * weighted(c) for c in node.children)

    trees, forest = random_forest(41)
    np.testing.assert_allclose(weighted.batch(forest), stack(eager_rows(weighted, trees)), rtol=1e-5)


# ---------------------------------------------------------------------- readouts


@rj.recursive
def encode(p, node):
    return jnp.tanh(p["emb"][node.data["token"]] + node.children.map(lambda c: encode(p, c)).sum())


@rj.recursive
def score(p, node):
    """A readout: memoised ``encode`` at the node and at its children, used by another function."""
    extra = node.children.map(lambda c: encode(p, c) @ p["v"]).max(initial=0.0)
    return encode(p, node) @ p["v"] + extra


def test_per_node_readout_and_per_tree_pooling_with_gradients():
    trees, forest = random_forest(50)
    p = {"emb": jax.random.normal(jax.random.key(2), (7, 3)), "v": jnp.array([0.3, -0.2, 0.5])}
    got = score.batch(p, forest)
    np.testing.assert_allclose(got, stack(eager_rows(score, trees, p)), atol=1e-5)

    sizes = [len(t.walk()) for t in trees]
    bounds = np.cumsum([0] + sizes)
    np.testing.assert_array_equal(forest.tree_of, np.repeat(np.arange(len(trees)), sizes))
    vals = np.asarray(got)
    for op, ref in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        want = [ref(vals[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        np.testing.assert_allclose(forest.pool(got, op), want, rtol=1e-5)

    def loss(p, forest):
        return jnp.sum(forest.pool(score.batch(p, forest), "mean") ** 2)

    def eager_loss(p):
        return sum(jnp.mean(jnp.stack([score(p, pos) for pos in t.walk()])) ** 2 for t in trees)

    assert_trees_close(jax.jit(jax.grad(loss))(p, forest), jax.grad(eager_loss)(p), atol=1e-4)
    # padded forests: the padding contributes nothing, padding roots get 0
    padded = forest.padded()
    pooled = jax.jit(lambda p, f: f.pool(score.batch(p, f), "mean"))(p, padded)
    np.testing.assert_allclose(pooled[: len(trees)], forest.pool(got, "mean"), rtol=1e-5)
    assert np.all(np.asarray(pooled)[len(trees):] == 0)


def test_pool_errors():
    forest = rj.Forest.from_parents([-1, 0])
    with pytest.raises(ValueError, match="op must be"):
        forest.pool(jnp.ones(2), "median")
    with pytest.raises(ValueError, match="leading axis of num_nodes = 2"):
        forest.pool(jnp.ones(3))
    # a node in several trees would count in only one of them: refused
    leaf, mid = rj.Tree(3.0), rj.Tree(2.0)
    shared = rj.Tree(1.0, [rj.Tree(2.0, [leaf])])
    for trees in ([shared, shared], [rj.Tree(0.0, [leaf]), rj.Tree(1.0, [leaf])],
                  [rj.Tree(0.0, [mid]), rj.Tree(1.0, [rj.Tree(5.0, [mid])])],
                  # a node of one tree passed as another tree's root, after it or before
                  [rj.Tree(0.0, [mid]), mid], [mid, rj.Tree(0.0, [mid])]):
        with pytest.raises(ValueError, match="belongs to several trees"):
            rj.Forest.from_trees(trees).pool(jnp.ones(rj.Forest.from_trees(trees).num_nodes))
    # shared inside one tree only: one node, one tree, pooled once
    dag = rj.Forest.from_trees([rj.Tree(1.0, [leaf, leaf]), rj.Tree(2.0)])
    assert dag.pool(jnp.ones(dag.num_nodes), "sum").tolist() == [2.0, 1.0]


def test_pool_on_padded_forests_and_tree_of_a_shared_node():
    """Padding nodes count in no tree; a padding root's entry is 0 (not -inf for max),
    whether the forest is padded in roots or only in nodes. A node under several roots
    belongs to its first parent's tree."""
    for parents in ([-1, 0, 0, -1, 3, -1, -1, -1, -1, -1], [-1, 0, 0, -1, 3, -1, -1, -1, -1]):
        forest = rj.Forest.from_parents(parents, {"x": np.zeros(len(parents))}).padded()
        n, r = forest.num_nodes, len(forest.roots)
        assert n > len(parents)
        v = jnp.where(forest.node_mask, jnp.arange(n, dtype=jnp.float32) + 1.0, 100.0)  # padding: 100
        real = len(parents) - 3  # trees of the real roots: {1, 2, 3}, {4, 5}, then one node each
        want_mean, want_max = np.zeros(r), np.zeros(r)
        want_mean[:real] = [2.0, 4.5, *range(6, len(parents) + 1)]
        want_max[:real] = [3.0, 5.0, *range(6, len(parents) + 1)]
        np.testing.assert_allclose(forest.pool(v, "mean"), want_mean)
        np.testing.assert_allclose(forest.pool(v, "max"), want_max)
        want_min = np.zeros(r)
        want_min[:real] = [1.0, 4.0, *range(6, len(parents) + 1)]
        np.testing.assert_allclose(forest.pool(-v, "max"), -want_min)  # padding roots: 0 still
    dag = rj.Forest.from_children([[2], [2], []])  # node 2: under root 0 (first) and root 1
    assert dag.tree_of.tolist() == [0, 1, 0]


def test_pool_of_bools_counts_averages_and_ors():
    forest = rj.Forest.from_parents([-1, 0, -1, 2, 2]).padded(num_roots=3)
    flags = jnp.zeros(forest.num_nodes, bool).at[jnp.array([0, 4])].set(True)
    assert forest.pool(flags, "sum").tolist() == [1, 1, 0]
    np.testing.assert_allclose(forest.pool(flags, "mean"), [0.5, 1 / 3, 0.0])
    assert forest.pool(flags, "max").tolist() == [True, True, False]
    assert forest.pool(flags, "max").dtype == jnp.bool_


# ---------------------------------------------------------------------- DAGs and scale


def test_top_down_over_a_dag_is_an_error_before_device_work():
    forest = rj.Forest.from_children([[1, 2], [3], [3], []])
    with pytest.raises(ValueError, match="node 3 of the forest has several"):
        depth.batch(forest)
    # a Tree given as a root and also reached as a child has two contexts as well
    t = rj.Tree(1.0, [rj.Tree(2.0)])
    with pytest.raises(ValueError, match="node 0 of the forest has several"):
        depth.batch(rj.Forest.from_trees([t, rj.Tree(3.0, [t])]))
    with pytest.raises(ValueError, match=r"node 0 of the forest has several \(a DAG, or one Tree passed twice"):
        depth.batch(rj.Forest.from_trees([t, t]))


def test_top_down_over_real_code_trees_and_a_deep_chain():
    trees = stdlib_functions()[:20]
    forest = rj.Forest.from_trees(trees)
    np.testing.assert_array_equal(depth.batch(forest), stack(eager_rows(depth, trees)))
    chain = rj.Forest.from_parents(np.arange(-1, 2999))
    np.testing.assert_array_equal(depth.batch(chain), np.arange(3000))


def test_nan_in_one_tree_stays_there_top_down():
    @rj.recursive
    def down(w, node):
        own = jnp.log(node.data["x"]) * w
        return own if node.is_root else own + down(w, node.parent)

    good = random_tree(np.random.default_rng(0), 12, 3, lambda i: {"x": np.float32(1.5 + i)})
    bad = random_tree(np.random.default_rng(1), 9, 3, lambda i: {"x": np.float32(-1.0 if i == 4 else 2.0)})
    forest = rj.Forest.from_trees([good, bad])
    n_good = len(good.walk())
    out = down.batch(jnp.float32(1.0), forest)
    assert np.isfinite(np.asarray(out[:n_good])).all()

    def loss(data):
        f = rj.Forest.from_trees([good, bad])
        f._arrays = {**f._arrays, "data": data}
        return jnp.sum(down.batch(jnp.float32(1.0), f)[:n_good])

    grad = jax.grad(loss)(forest._arrays["data"])
    assert np.isfinite(np.asarray(grad["x"])).all()


def test_data_dependent_loops_name_the_construct_and_the_alternative():
    @rj.recursive
    def collatz(node):
        x = node.data["x"]
        while x > 1:  # an unbounded loop on a traced value
            x = x / 2
        return x

    @rj.recursive
    def repeat(node):
        return sum(node.data["x"] for _ in range(node.data["token"]))

    trees, forest = random_forest(60)
    with pytest.raises(TypeError, match=r"an `if`, `while`.*lax.while_loop"):
        collatz.batch(forest)
    with pytest.raises(TypeError, match=r"`range\(\)`.*lax.fori_loop"):
        repeat.batch(forest)


def test_stacked_forests_keep_a_dag_from_passing_as_a_tree():
    """Forests stacked for vmap/pmap/shard_map share one static part: a forest with a
    node of several parents (or a node in several trees) does not stack with one without
    (before, the stack took the first forest's and a top-down pass ran on the DAG), and a
    stack of such forests is refused where each forest alone is."""
    @rj.recursive
    def depth(node):
        return jnp.float32(0) if node.is_root else depth(node.parent) + 1

    stack = lambda forests: jax.tree.map(lambda *a: np.stack(a), *forests)  # noqa: E731
    shared = rj.Tree(1.0)
    dag = rj.Tree(1.0, [rj.Tree(1.0, [shared]), shared])  # shared: depth 1 and 2
    tree = rj.Tree(1.0, [rj.Tree(1.0, [rj.Tree(1.0)]), rj.Tree(1.0)])
    parts = rj.Forest.pad_all([rj.Forest.from_trees([tree]), rj.Forest.from_trees([dag])])
    with pytest.raises(ValueError, match="has_shared_node=True"):
        stack(parts)
    dags = rj.Forest.pad_all([rj.Forest.from_trees([dag]), rj.Forest.from_trees([dag])])
    with pytest.raises(ValueError, match="need one parent per node"):
        jax.vmap(depth.batch)(stack(dags))
    twice = rj.Forest.pad_all([rj.Forest.from_trees([tree, tree])] * 2)  # one Tree, two roots
    ones = jnp.ones((2, twice[0].num_nodes))
    with pytest.raises(ValueError, match="belongs to several trees"):
        jax.vmap(lambda f, v: f.pool(v))(stack(twice), ones)
    fine = rj.Forest.pad_all([rj.Forest.from_trees([tree]), rj.Forest.from_trees([tree, rj.Tree(2.0)])])
    got = jax.vmap(depth.batch)(stack(fine))  # trees stack and run as before
    for use in (lambda: depth.batch(stack(fine)), lambda: stack(fine).pool(jnp.ones((2, 4)))):
        with pytest.raises(TypeError, match="holds 2 forests stacked on a leading axis"):
            use()  # outside the vmap: refused, not a shape error from inside
    np.testing.assert_array_equal(got[0][: fine[0].num_nodes][:4], [0, 1, 2, 1])
