"""Static node kinds: ``node.kind`` specialises the trace; every step runs one kind.

Compared with plain recursion (values and gradients), and with the same model written as
one template that looks its weights up by a kind id in the node data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import assert_trees_close, stdlib_functions

import recjax as rj
from recjax.data import AST_KINDS, with_ast_kinds

OPS = ["Num", "Add", "Mul", "Neg"]


@rj.recursive
def evaluate(w, node):
    """An evaluator whose Python code differs per kind (and per kind's arity)."""
    if node.kind == "Num":
        return w * node.data
    if node.kind == "Neg":
        (a,) = [evaluate(w, c) for c in node.children]
        return -a
    a, b = [evaluate(w, c) for c in node.children]
    return a + b if node.kind == "Add" else jnp.tanh(a * b)


def random_expression(rng, depth):
    if depth == 0 or rng.random() < 0.3:
        return rj.Tree(np.float32(rng.normal()), kind="Num")
    op = OPS[int(rng.integers(1, 4))]
    kids = [random_expression(rng, depth - 1) for _ in range(1 if op == "Neg" else 2)]
    return rj.Tree(np.float32(0), kids, kind=op)


def positions(trees):
    return [pos for t in trees for pos in t.walk()]


@pytest.mark.parametrize("seed", range(3))
def test_per_kind_code_matches_eager(seed):
    rng = np.random.default_rng(seed)
    trees = [random_expression(rng, 6) for _ in range(8)]
    forest = rj.Forest.from_trees(trees, kinds=OPS)
    w = jnp.float32(0.7)
    want = jnp.stack([evaluate(w, pos) for pos in positions(trees)])
    np.testing.assert_allclose(evaluate.batch(w, forest), want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda w: jnp.sum(jnp.sin(evaluate.batch(w, forest))))(w)
    ge = jax.grad(lambda w: sum(jnp.sin(evaluate(w, pos)) for pos in positions(trees)))(w)
    np.testing.assert_allclose(g, ge, rtol=1e-4)


@pytest.mark.parametrize("block", [2, 5])
def test_per_kind_leaf_blocks_run_in_row_blocks(block, monkeypatch):
    """Each kind's leaf rows in blocks of ``LEAF_BLOCK`` (shrunk here) and the rest."""
    from recjax import _executor

    monkeypatch.setattr(_executor, "LEAF_BLOCK", block)

    @rj.recursive  # defined here: nothing was compiled with another block size
    def value(w, node):
        if node.kind == "Num":
            return jnp.sin(w * node.data)
        if node.kind == "Neg":
            (a,) = [value(w, c) for c in node.children]
            return -a
        a, b = [value(w, c) for c in node.children]
        return a + b if node.kind == "Add" else jnp.tanh(a * b)

    rng = np.random.default_rng(block)
    trees = [random_expression(rng, 5) for _ in range(6)]
    forest = rj.Forest.from_trees(trees, kinds=OPS)
    assert dict(forest.plan.key.leaf_blocks)[OPS.index("Num")] > 2 * block
    w = jnp.float32(0.7)
    want = jnp.stack([value(w, pos) for pos in positions(trees)])
    np.testing.assert_allclose(value.batch(w, forest), want, rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(value.batch(w, forest)))))(w)
    ge = jax.grad(lambda w: sum(jnp.sin(value(w, pos)) for pos in positions(trees)))(w)
    np.testing.assert_allclose(g, ge, rtol=1e-4)


def test_every_step_holds_one_kind_and_leaves_are_blocks():
    rng = np.random.default_rng(5)
    trees = [random_expression(rng, 7) for _ in range(20)]
    forest = rj.Forest.from_trees(trees, kinds=OPS)
    kind = np.array([OPS.index(pos.tree.kind) for pos in positions(trees)])
    key, plan = forest._meta.key, forest.plan
    for pk, tables in zip(key.phases, plan.phases):
        real = np.asarray(tables.degree) > 0
        for t in range(pk.steps):
            nodes = np.asarray(tables.node)[t][real[t]]
            if nodes.size:
                assert set(kind[nodes]) == {key.kinds[tables.step_kind[t]]}
    start = 0
    for k, size in key.leaf_blocks:
        rows = np.asarray(plan.leaf_node)[start : start + size]
        assert set(kind[rows]) == {k}
        start += size


@rj.recursive
def by_kind(p, node):
    """Child-sum cell with a recurrent matrix per AST kind, chosen statically."""
    x = p["emb"][node.data["kind"]]
    h = node.children.map(lambda c: by_kind(p, c)).sum(initial=jnp.zeros(p["U"].shape[1]))
    return jnp.tanh(x + h @ p["U"][AST_KINDS.index(node.kind)])


@rj.recursive
def by_lookup(p, node):
    """The same cell, one template: the matrix is gathered by the kind id in the data."""
    x = p["emb"][node.data["kind"]]
    h = node.children.map(lambda c: by_lookup(p, c)).sum(initial=jnp.zeros(p["U"].shape[1]))
    return jnp.tanh(x + h @ p["U"][node.data["kind"]])


def test_kind_read_in_one_branch_only():
    """node.kind read only at leaves (per-kind leaf blocks, one internal template), or
    only at internal nodes: values and gradients equal plain recursion. The Num leaves
    take a log that is -inf at the Var leaf's data: a padding row of the Num block must
    read a Num leaf (leaf 0 is a Var here), or the gradient is NaN."""
    @rj.recursive
    def at_leaves(w, node):
        if node.is_leaf:
            return w * jnp.log(node.data) if node.kind == "Num" else w
        return node.children.map(lambda c: at_leaves(w, c)).sum() + node.data

    @rj.recursive
    def inside(w, node):
        if node.is_leaf:
            return w * node.data
        kids = node.children.map(lambda c: inside(w, c))
        return kids.sum() if node.kind == "Add" else kids.max() * w

    Var = lambda: rj.Tree(np.float32(0.0), kind="Var")
    Num = lambda v: rj.Tree(np.float32(v), kind="Num")
    chain = Num(5.0)
    for v in (4.0, 3.0):
        chain = rj.Tree(np.float32(0.5), [Num(v), chain], kind="Add")
    trees = [rj.Tree(np.float32(1.0), [Var(), chain], kind="Mul"),
             rj.Tree(np.float32(2.0), [Num(1.5), Var(), Num(2.5)], kind="Add")]
    forest = rj.Forest.from_trees(trees, kinds=["Var", "Num", "Add", "Mul"])
    assert forest.plan.key.leaf_blocks[1][1] > 5  # the Num block holds padding rows
    w = jnp.float32(0.5)
    for f in (at_leaves, inside):
        want = jnp.stack([f(w, p) for p in positions(trees)])
        np.testing.assert_allclose(f.batch(w, forest), want, rtol=1e-5)
        g = jax.grad(lambda w: jnp.sum(f.batch(w, forest)))(w)
        g_want = jax.grad(lambda w: sum(f(w, p) for p in positions(trees)))(w)
        assert np.isfinite(g)
        np.testing.assert_allclose(g, g_want, rtol=1e-5)


def test_static_kinds_equal_weight_lookup_on_code_trees():
    plain = stdlib_functions()[:12]
    trees = [with_ast_kinds(t) for t in plain]
    k1, k2 = jax.random.split(jax.random.key(0))
    p = {"emb": jax.random.normal(k1, (len(AST_KINDS), 4)),
         "U": 0.5 * jax.random.normal(k2, (len(AST_KINDS), 4, 4))}
    static_forest = rj.Forest.from_trees(trees, kinds=AST_KINDS)
    lookup_forest = rj.Forest.from_trees(plain)
    got = by_kind.batch(p, static_forest)
    np.testing.assert_allclose(got, by_lookup.batch(p, lookup_forest), atol=1e-5)
    np.testing.assert_allclose(got[0], by_kind(p, trees[0]), atol=1e-5)

    def loss(fn, forest):
        return lambda p: jnp.sum(fn.batch(p, forest)[forest.roots] ** 2)

    assert_trees_close(jax.grad(loss(by_kind, static_forest))(p),
                       jax.grad(loss(by_lookup, lookup_forest))(p), atol=1e-4)


def test_padded_forests_with_different_kinds_share_one_program():
    rng = np.random.default_rng(9)
    a = rj.Forest.from_trees([random_expression(rng, 5) for _ in range(4)], kinds=OPS)
    b = rj.Forest.from_trees([rj.Tree(np.float32(1), [rj.Tree(np.float32(2), kind="Num")], kind="Neg")], kinds=OPS)
    pa, pb = rj.Forest.pad_all([a, b])
    want_a = evaluate.batch(jnp.float32(1), a)
    step = jax.jit(lambda w, f: evaluate.batch(w, f))
    before = evaluate._num_traces
    np.testing.assert_allclose(step(jnp.float32(1), pb)[:2], [-2.0, 2.0])
    np.testing.assert_allclose(step(jnp.float32(1), pa)[: a.num_nodes], want_a, rtol=1e-6)
    assert evaluate._num_traces == before + 1


def test_kind_errors():
    t = rj.Tree(1.0, [rj.Tree(2.0, kind="Num")], kind="Neg")
    with pytest.raises(ValueError, match="node 0 has kind 'Neg' but no kinds= vocabulary"):
        rj.Forest.from_trees([t])
    with pytest.raises(ValueError, match="node 1 has kind 'Num', which is not in the kinds="):
        rj.Forest.from_trees([t], kinds=["Neg"])
    with pytest.raises(ValueError, match="lists a kind twice"):
        rj.Forest.from_trees([t], kinds=["Neg", "Num", "Neg"])
    with pytest.raises(ValueError, match="kind has 1 entries for 2 nodes"):
        rj.Forest.from_parents([-1, 0], kind=["Neg"], kinds=OPS)
    with pytest.raises(TypeError, match="the forest has no kinds"):
        evaluate.batch(jnp.float32(1), rj.Forest.from_parents([-1, 0], [1.0, 2.0]))

    @rj.recursive
    def down(node):
        return jnp.float32(0) if node.is_root else down(node.parent) + (node.kind == "Num")

    kinded = rj.Forest.from_parents([-1, 0], [1.0, 2.0], kind=["Neg", "Num"], kinds=OPS)
    with pytest.raises(TypeError, match="node.kind in a top-down function"):
        down.batch(kinded)
    other = rj.Forest.from_parents([-1], [1.0], kind=["Num"], kinds=["Num"])
    with pytest.raises(ValueError, match="different kind vocabularies"):
        rj.Forest.pad_all([kinded, other])
    # from_parents with kinds runs like from_trees
    np.testing.assert_allclose(evaluate.batch(jnp.float32(2), kinded), [-4.0, 4.0])

    @rj.recursive
    def total(node):  # a childless "Sum" returns the int 0 of an empty sum
        return node.data if node.kind == "Num" else node.children.map(total).sum()

    sums = rj.Tree(0.0, [rj.Tree(1.0, kind="Num"), rj.Tree(0.0, kind="Sum")], kind="Sum")
    with pytest.raises(TypeError, match="at a leaf of kind 'Sum' but float32"):  # named, not 1
        total.batch(rj.Forest.from_trees([sums], kinds=["Num", "Sum"]))
