"""Compiled (batched) equals eager (plain Python recursion): values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recjax as rj
from models import (
    AST_KINDS,
    assert_trees_close,
    child_sum_lstm,
    child_sum_params,
    evaluate,
    node_subtrees,
    random_binary_tree,
    random_expression,
    random_tree,
    stdlib_functions,
    tree_lstm,
    tree_lstm_params,
)


def eager_all_nodes(fn, args_before, trees, args_after=()):
    """Eager outputs for every node of Forest.from_trees(trees), stacked in node order."""
    outs = [fn(*args_before, t, *args_after) for t in node_subtrees(trees)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def root_loss_eager(fn, trees):
    def loss(p):
        return sum(jnp.sum(fn(p, t)[0] ** 2) for t in trees)

    return loss


def root_loss_batched(fn, forest):
    def loss(p):
        h = fn.batch(p, forest)[0]
        return jnp.sum(h[forest.roots] ** 2)

    return loss


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("jit", [False, True])
def test_binary_tree_lstm_matches_eager(seed, jit):
    rng = np.random.default_rng(seed)
    trees = [random_binary_tree(rng, int(rng.integers(1, 12))) for _ in range(6)]
    forest = rj.Forest.from_trees(trees)
    p = tree_lstm_params(jax.random.key(seed))
    run = jax.jit(tree_lstm.batch) if jit else tree_lstm.batch
    assert_trees_close(run(p, forest), eager_all_nodes(tree_lstm, (p,), trees))

    grad = jax.grad(root_loss_batched(tree_lstm, forest))
    got = (jax.jit(grad) if jit else grad)(p)
    want = jax.grad(root_loss_eager(tree_lstm, trees))(p)
    assert_trees_close(got, want, atol=1e-4, rtol=1e-4)


def test_steps_mixing_levels_match_eager():
    """The planner fills a level's last step with nodes of the levels above (a batch of
    random trees): values and gradients are still those of plain recursion."""
    rng = np.random.default_rng(40)  # 98 nodes: a plan that mixes levels and blocks nodes
    trees = [random_binary_tree(rng, int(rng.integers(2, 16))) for _ in range(8)]
    forest = rj.Forest.from_trees(trees)
    plan = forest.plan
    mixed = [
        len(set(plan.height[t.node[s][t.degree[s] > 0]].tolist())) > 1
        for t in plan.phases
        for s in range(t.node.shape[0])
    ]
    assert any(mixed), plan.key  # the test needs a packed plan
    p = tree_lstm_params(jax.random.key(3))
    assert_trees_close(jax.jit(tree_lstm.batch)(p, forest), eager_all_nodes(tree_lstm, (p,), trees))
    got = jax.jit(jax.grad(root_loss_batched(tree_lstm, forest)))(p)
    want = jax.grad(root_loss_eager(tree_lstm, trees))(p)
    assert_trees_close(got, want, atol=1e-4, rtol=1e-4)


def test_child_sum_over_python_asts():
    trees = stdlib_functions()
    sizes = [rj.Forest.from_trees([t]).num_nodes for t in trees]
    # the eager reference is slow per node: keep small and medium functions
    trees = [t for t, n in zip(trees, sizes) if n <= 120][:8]
    forest = rj.Forest.from_trees(trees)
    assert max(np.diff(forest.child_ptr)) > 4  # really variable arity
    p = child_sum_params(jax.random.key(1), kinds=len(AST_KINDS))
    got = child_sum_lstm.batch(p, forest)  # values as called; the gradient under jax.jit
    want = [child_sum_lstm(p, t) for t in trees]
    roots = forest.roots
    assert_trees_close(jax.tree.map(lambda a: a[roots], got), jax.tree.map(lambda *x: jnp.stack(x), *want))

    small = trees[:3]
    small_forest = rj.Forest.from_trees(small)
    grad = jax.grad(root_loss_batched(child_sum_lstm, small_forest))
    got_g = jax.jit(grad)(p)
    want_g = jax.grad(root_loss_eager(child_sum_lstm, small))(p)
    assert_trees_close(got_g, want_g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_child_sum_random_arities_all_nodes(seed):
    rng = np.random.default_rng(seed)
    trees = [
        random_tree(rng, int(rng.integers(1, 15)), 6, lambda i: {"kind": int(rng.integers(7))})
        for _ in range(5)
    ]
    forest = rj.Forest.from_trees(trees)
    p = child_sum_params(jax.random.key(seed), kinds=7)
    assert_trees_close(child_sum_lstm.batch(p, forest), eager_all_nodes(child_sum_lstm, (p,), trees))


def exact_values(trees):
    """Every node's value by exact Python arithmetic, in Forest.from_trees order."""
    memo = {}
    for node in reversed(node_subtrees(trees)):  # children come after parents in pre-order
        if node.is_leaf:
            memo[id(node)] = node.data["value"]
        else:
            a, b = (memo[id(c)] for c in node.children)
            memo[id(node)] = (a + b, a - b, a * b)[node.data["op"]]
    return [memo[id(n)] for n in node_subtrees(trees)]


@pytest.mark.parametrize("seed", range(3))
def test_expression_evaluator(seed):
    rng = np.random.default_rng(seed)
    exprs = [random_expression(rng, int(rng.integers(0, 6))) for _ in range(30)]
    trees = [t for t, _ in exprs]
    forest = rj.Forest.from_trees(trees)
    values = jax.jit(evaluate.batch)(forest)
    np.testing.assert_allclose(values, exact_values(trees), rtol=1e-6)
    np.testing.assert_allclose(values[forest.roots], [v for _, v in exprs], rtol=1e-6)
    # the eager meaning (plain recursion) agrees on a few whole trees
    for t, r in list(zip(trees, forest.roots))[:3]:
        np.testing.assert_allclose(evaluate(t), values[r], rtol=1e-6)


def test_expression_evaluator_gradient_wrt_data_scale():
    @rj.recursive
    def scaled(s, node):
        if node.is_leaf:
            return s * node.data["value"]
        a, b = [scaled(s, ch) for ch in node.children]
        return jax.lax.switch(node.data["op"], [lambda: a + b, lambda: a - b, lambda: a * b])

    rng = np.random.default_rng(7)
    trees = [random_expression(rng, 3)[0] for _ in range(3)]
    forest = rj.Forest.from_trees(trees)
    s = jnp.float32(0.7)
    got = jax.grad(lambda s: scaled.batch(s, forest)[forest.roots].sum())(s)
    want = jax.grad(lambda s: sum(scaled(s, t) for t in trees))(s)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_eager_reference_runs_under_jit_grad_and_vmap_of_node_data():
    # the reference call on a Tree built from traced arrays, against the batched
    # program's gradient with respect to the forest's data
    @rj.recursive
    def f(p, node):
        return jnp.tanh(node.data * p + node.children.map(lambda c: f(p, c)).sum())

    def eager(xs, p):
        return f(p, rj.Tree(xs[0], [rj.Tree(xs[1]), rj.Tree(xs[2], [rj.Tree(xs[3])])]))

    xs, p = jnp.array([0.5, 1.5, -0.5, 0.25]), jnp.float32(0.8)
    forest = rj.Forest.from_parents([-1, 0, 0, 2], xs)
    np.testing.assert_allclose(jax.jit(eager)(xs, p), f.roots(p, forest)[0], rtol=1e-6)
    got = jax.grad(lambda fo: f.roots(p, fo)[0], allow_int=True)(forest).data
    np.testing.assert_allclose(jax.grad(eager)(xs, p), got, rtol=1e-5)
    twice = jax.vmap(eager, in_axes=(0, None))(jnp.stack([xs, -xs]), p)
    np.testing.assert_allclose(twice, [eager(xs, p), eager(-xs, p)], rtol=1e-6)


def test_dag_shared_nodes_computed_once():
    calls = {"n": 0}

    @rj.recursive
    def f(w, node):
        calls["n"] += 1
        if node.is_leaf:
            return jnp.tanh(w * node.data)
        return jnp.tanh(w * node.data + node.children.map(lambda c: f(w, c)).sum())

    shared = rj.Tree(0.5, [rj.Tree(1.0), rj.Tree(-2.0)])
    a = rj.Tree(0.1, [shared, rj.Tree(3.0)])
    b = rj.Tree(0.2, [shared, a, shared])
    forest = rj.Forest.from_trees([b])
    assert forest.num_nodes == 6  # b, shared, 1.0, -2.0, a, 3.0
    assert forest.children(0).tolist() == [1, 4, 1]
    # every node has exactly one buffer row and the rows are distinct
    rows = forest.plan.row_of_node[: forest.num_nodes]
    assert len(set(rows.tolist())) == forest.num_nodes
    w = jnp.float32(0.9)
    got = f.batch(w, forest)
    calls["n"] = 0
    want = eager_all_nodes(f, (w,), [b])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # eager memoises shared subtrees within one call too: 6 nodes -> 6 calls for the root
    calls["n"] = 0
    f(w, b)
    assert calls["n"] == 6
    g = jax.grad(lambda w: f.batch(w, forest)[0])(w)
    np.testing.assert_allclose(g, jax.grad(lambda w: f(w, b))(w), rtol=1e-5)


def test_from_children_dag_matches_eager():
    # Node 3 has parents 1 and 2; node 4 has parents 0 and 3.
    children = [[1, 2, 4], [3], [3, 4], [4], []]
    data = {"x": np.arange(5, dtype=np.float32)}
    forest = rj.Forest.from_children(children, data)

    @rj.recursive
    def f(node):
        return node.data["x"] + 0.5 * node.children.map(lambda c: f(c)).sum()

    leaf4 = rj.Tree({"x": 4.0})
    n3 = rj.Tree({"x": 3.0}, [leaf4])
    trees = rj.Tree({"x": 0.0}, [rj.Tree({"x": 1.0}, [n3]), rj.Tree({"x": 2.0}, [n3, leaf4]), leaf4])
    want = [f(t) for t in [trees, trees.children[0], trees.children[1], n3, leaf4]]
    np.testing.assert_allclose(f.batch(forest), want, rtol=1e-6)


def test_dict_output_and_jvp_and_vmap():
    @rj.recursive
    def f(p, node):
        if node.is_leaf:
            return {"s": p["a"] * node.data, "n": jnp.float32(1)}
        kids = node.children.map(lambda c: f(p, c))
        s = kids.sum()
        return {"s": jnp.tanh(s["s"] + p["b"] * node.data), "n": 1 + s["n"]}

    rng = np.random.default_rng(3)
    trees = [random_tree(rng, 9, 3, lambda i: float(rng.normal())) for _ in range(4)]
    forest = rj.Forest.from_trees(trees)
    p = {"a": jnp.float32(0.8), "b": jnp.float32(-0.3)}
    out = f.batch(p, forest)
    assert_trees_close(out, eager_all_nodes(f, (p,), trees))
    np.testing.assert_allclose(out["n"][forest.roots], 9)

    t = {"a": jnp.float32(1.0), "b": jnp.float32(0.5)}
    _, tangent = jax.jvp(lambda p: f.batch(p, forest)["s"], (p,), (t,))
    _, want = jax.jvp(lambda p: eager_all_nodes(f, (p,), trees)["s"], (p,), (t,))
    np.testing.assert_allclose(tangent, want, rtol=1e-4, atol=1e-6)

    ps = {"a": jnp.array([0.8, -1.0]), "b": jnp.array([-0.3, 0.2])}
    batched = jax.vmap(lambda p: f.batch(p, forest)["s"])(ps)
    for i in range(2):
        pi = jax.tree.map(lambda a: a[i], ps)
        np.testing.assert_allclose(batched[i], f.batch(pi, forest)["s"], rtol=1e-5)


def test_reductions_mean_max_min_with_initial():
    @rj.recursive
    def f(node):
        kids = node.children.map(lambda c: f(c)[0][0])
        return jnp.stack([
            node.data + kids.max(initial=-1.0),
            node.data + kids.min(initial=5.0),
            kids.sum(initial=0.25),
        ]), node.data

    @rj.recursive
    def g(node):  # mean needs a leaf branch
        if node.is_leaf:
            return node.data
        return node.data + node.children.map(g).mean()

    rng = np.random.default_rng(0)
    trees = [random_tree(rng, 12, 5, lambda i: float(rng.normal())) for _ in range(5)]
    forest = rj.Forest.from_trees(trees)
    assert_trees_close(f.batch(forest), eager_all_nodes(f, (), trees))
    np.testing.assert_allclose(g.batch(forest), eager_all_nodes(g, (), trees), rtol=1e-5)

    def plain(t):  # f in plain Python numbers: independent of recjax's reductions
        kids = [plain(c)[0] for c in t.children]
        return [t.data + max(kids + [-1.0]), t.data + min(kids + [5.0]), sum(kids) + 0.25]

    got = np.asarray(f.batch(forest)[0])[forest.roots]
    np.testing.assert_allclose(got, [plain(t) for t in trees], rtol=1e-5, atol=1e-5)


def test_reductions_have_jnp_dtypes_and_precision():
    """A reduction over children (and Forest.pool) gives what jnp.sum/mean/max over
    them gives: bools count (int32) and 'any', float16 and bfloat16 accumulate in
    float32, small ints widen to int32 (a leaf returning int8 is then a dtype error)."""
    @rj.recursive
    def counts(node):  # how many children are positive, and whether any is
        x = node.data
        pos = node.children.map(lambda c: counts(c)[0] > 0)
        return x, pos.sum(initial=jnp.int32(0)), pos.max(initial=jnp.bool_(False))

    rng = np.random.default_rng(3)
    trees = [random_tree(rng, 15, 5, lambda i: np.float32(rng.normal())) for _ in range(4)]
    forest = rj.Forest.from_trees(trees)
    _, n_pos, any_pos = counts.batch(forest)
    want = [(sum(c.data > 0 for c in t.children), any(c.data > 0 for c in t.children)) for t in trees]
    assert [(int(n_pos[r]), bool(any_pos[r])) for r in forest.roots] == want
    assert n_pos.dtype == jnp.int32 and any_pos.dtype == jnp.bool_
    assert_trees_close(counts.batch(forest), eager_all_nodes(counts, (), trees))

    @rj.recursive
    def total(node):
        if node.is_leaf:
            return node.data, node.data
        kids = node.children.map(lambda c: total(c)[0])
        return node.data + kids.sum(), kids.mean()

    for dtype in (jnp.float16, jnp.bfloat16):
        wide = rj.Tree(jnp.asarray(0, dtype), [rj.Tree(jnp.asarray(0.1, dtype)) for _ in range(3000)])
        wide_forest = rj.Forest.from_trees([wide])
        s, m = total.batch(wide_forest)
        assert s.dtype == dtype
        np.testing.assert_allclose(float(s[0]), 300.0, rtol=1e-2)  # 256 (float16), 32 (bfloat16) before
        np.testing.assert_allclose(float(m[0]), 0.1, rtol=1e-2)
        np.testing.assert_allclose(float(total(wide)[0]), float(s[0]), rtol=1e-2)
        pooled = wide_forest.pool(jnp.full(wide_forest.num_nodes, 0.1, dtype), "sum")
        np.testing.assert_allclose(float(pooled[0]), 300.1, rtol=1e-2)

    int8 = rj.Forest.from_trees([rj.Tree(np.int8(1), [rj.Tree(np.int8(1)) for _ in range(200)])])
    with pytest.raises(TypeError, match=r"returns \('int32\[\]', 'float32\[\]'\) at an internal node but \('int8\[\]', 'int8\[\]'\) at a leaf"):
        total.batch(int8)  # eager: int32 at the root, int8 at the leaves; 200 wrapped to -56 before
    assert int8.pool(jnp.ones(int8.num_nodes, jnp.int8), "sum").tolist() == [201]


def test_padding_never_makes_nan_gradients():
    # sqrt and log have infinite derivatives at 0: padding rows must not read zeros.
    @rj.recursive
    def f(w, node):
        if node.is_leaf:
            return jnp.sqrt(w * node.data + 1.0)
        m = node.children.map(lambda c: jnp.log(f(w, c))).max()
        return jnp.sqrt(jnp.exp(m) + w)

    rng = np.random.default_rng(1)
    trees = [random_tree(rng, int(rng.integers(1, 30)), 4, lambda i: float(rng.random())) for _ in range(7)]
    forest = rj.Forest.from_trees(trees)
    w = jnp.float32(0.5)
    g = jax.grad(lambda w: f.batch(w, forest).sum())(w)
    assert np.isfinite(g)
    np.testing.assert_allclose(g, jax.grad(lambda w: eager_all_nodes(f, (w,), trees).sum())(w), rtol=1e-4)


def test_same_bucket_does_not_retrace():
    @rj.recursive
    def f(p, node):
        if node.is_leaf:
            return p * node.data["token"].astype(jnp.float32)
        l, r = [f(p, c) for c in node.children]
        return jnp.tanh(l + r)

    rng = np.random.default_rng(0)
    f1, f2 = rj.Forest.pad_all(
        [rj.Forest.from_trees([random_binary_tree(rng, 10) for _ in range(8)]) for _ in range(2)]
    )
    assert f1._meta == f2._meta  # same bucket; the trees differ
    assert f1.child_idx.tolist() != f2.child_idx.tolist()
    p = jnp.float32(0.1)
    a = f.batch(p, f1)
    b = f.batch(p, f2)
    assert f._num_traces == 1
    # different results, so the second call really used the second plan
    assert not np.allclose(a[f1.roots], b[f2.roots])

    # the Forest as an argument of an outer jit: one trace for both batches
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, forest):
        return jax.grad(lambda p: f.batch(p, forest)[forest.roots].sum())(p)

    step(p, f1)
    step(p, f2)
    np.testing.assert_allclose(
        step(p, f2), jax.grad(lambda p: sum(f(p, t) for t in [None] if False) + f.batch(p, f2)[f2.roots].sum())(p), rtol=1e-5
    )


def test_single_node_and_all_leaf_forests():
    @rj.recursive
    def f(node):
        return 2.0 * node.data + node.children.map(f).sum()

    forest = rj.Forest.from_trees([rj.Tree(1.0), rj.Tree(2.0)])
    np.testing.assert_allclose(f.batch(forest), [2.0, 4.0])
    forest = rj.Forest.from_parents([-1], {"x": [3.0]})
    np.testing.assert_allclose(jax.tree.leaves(rj.recursive(lambda n: n.data).batch(forest)), [[3.0]])


def test_deep_chain_plans_and_runs():
    n = 100_000
    parent = np.arange(-1, n - 1)  # node i's parent is i - 1: a chain of depth n - 1
    forest = rj.Forest.from_parents(parent, {"x": np.ones(n, np.float32)})
    assert forest.plan.num_steps >= n - 1  # sequential steps follow the depth
    # Tree objects nested 100,000 deep convert without recursion
    t = rj.Tree(1.0)
    for _ in range(n - 1):
        t = rj.Tree(1.0, [t])
    assert rj.Forest.from_trees([t]).num_nodes == n

    @rj.recursive
    def count(node):
        return node.data["x"] + node.children.map(count).sum()

    short = rj.Forest.from_parents(np.arange(-1, 499), {"x": np.ones(500, np.float32)})
    np.testing.assert_allclose(count.batch(short), np.arange(500, 0, -1))


def test_steps_grow_with_depth_not_nodes():
    rng = np.random.default_rng(0)
    small = rj.Forest.from_trees([random_binary_tree(rng, 16)])
    big = rj.Forest.from_trees([random_binary_tree(rng, 16) for _ in range(400)])
    depth_small = int(small.plan.height.max())
    depth_big = int(big.plan.height.max())
    # steps are at most a few per level, however many nodes
    assert big.plan.num_steps <= 4 * depth_big + 8
    assert big.num_nodes > 100 * small.num_nodes
    assert depth_big < 4 * depth_small + 20


def test_padded_forests_share_one_trace_and_mask_padding():
    @rj.recursive
    def f(p, node):
        if node.is_leaf:
            return p * node.data["token"].astype(jnp.float32)
        l, r = [f(p, c) for c in node.children]
        return jnp.tanh(l + r + 0.1)

    rng = np.random.default_rng(5)
    batches = [[random_binary_tree(rng, int(rng.integers(1, 30))) for _ in range(int(rng.integers(3, 9)))] for _ in range(6)]
    forests = [rj.Forest.from_trees(b) for b in batches]
    assert len({(fo._meta, fo.roots.shape) for fo in forests}) > 1  # exact shapes differ
    padded = rj.Forest.pad_all(forests)
    assert len({(fo._meta, fo.roots.shape) for fo in padded}) == 1

    @jax.jit
    @chex.assert_max_traces(n=1)
    def root_sum(p, forest):
        out = f.batch(p, forest)
        return jnp.sum(jnp.where(forest.root_mask, out[forest.roots], 0.0)), out

    p = jnp.float32(0.05)
    results = [root_sum(p, pad) for pad in padded]
    assert f._num_traces == 1  # the executor too: one program for every padded batch
    for trees, exact, pad, (total, out) in zip(batches, forests, padded, results):
        n = exact.num_nodes
        np.testing.assert_allclose(out[:n], f.batch(p, exact), rtol=1e-6)
        assert pad.node_mask.tolist() == [True] * n + [False] * (pad.num_nodes - n)
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(total, sum(f(p, t) for t in trees), rtol=1e-5)


def test_pad_all_unites_arities_for_per_arity_functions():
    @rj.recursive
    def weighted(w, node):  # iterates children: one template per arity
        return node.data + sum(w * (i + 1) * weighted(w, c) for i, c in enumerate(node.children))

    rng = np.random.default_rng(4)
    a = [random_tree(rng, 12, 2, lambda i: float(rng.normal())) for _ in range(3)]
    b = [random_tree(rng, 12, 3, lambda i: float(rng.normal())) for _ in range(3)]
    fa, fb = rj.Forest.from_trees(a), rj.Forest.from_trees(b)
    assert fa._meta.arities != fb._meta.arities
    pa, pb = rj.Forest.pad_all([fa, fb])
    assert pa._meta == pb._meta and pa._meta.arities == tuple(sorted(set(fa._meta.arities) | set(fb._meta.arities)))
    w = jnp.float32(0.3)
    run = jax.jit(weighted.batch)
    for trees, exact, pad in ((a, fa, pa), (b, fb, pb)):
        np.testing.assert_allclose(run(w, pad)[: exact.num_nodes], eager_all_nodes(weighted, (w,), trees), rtol=1e-5)
    assert weighted._num_traces == 1


def test_from_parents_keeps_children_in_increasing_id_with_interleaved_parents():
    """``children`` of a node are the j with ``parent[j] == i`` in increasing j (documented);
    an order-sensitive function on two roots whose 198 children interleave equals plain
    recursion on the same trees built by hand (an unstable sort would permute them)."""
    rng = np.random.default_rng(0)
    n = 200
    parent = np.concatenate([[-1, -1], rng.integers(0, 2, n - 2)])
    x = rng.normal(size=n).astype(np.float32)
    forest = rj.Forest.from_parents(parent, {"x": x})
    for r in (0, 1):
        np.testing.assert_array_equal(forest.children(r), np.flatnonzero(parent == r))

    @rj.recursive
    def positional(node):
        return node.data["x"] + node.children.map(lambda c: (c.index + 1.0) * positional(c)).sum()

    trees = [rj.Tree({"x": x[r]}, [rj.Tree({"x": x[c]}) for c in np.flatnonzero(parent == r)]) for r in (0, 1)]
    np.testing.assert_allclose(positional.roots(forest), [positional(t) for t in trees], rtol=1e-5)
