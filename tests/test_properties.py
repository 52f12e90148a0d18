"""Property tests: on random forests and DAGs, batched equals eager and plans keep their invariants.

Hypothesis draws the forests (arities 0-6, chains and caterpillars up to depth ~60, single
nodes, shared subtrees, any node numbering) and a cell from a small family (output an
array, a tuple or a dict; children iterated per arity or reduced with ``map`` and
sum/max/min/mean; with or without a leaf branch). The meaning of a program is plain Python
recursion on ``rj.Tree``s, so every node's batched value, and the gradient of a loss that
reads every node, must equal the eager ones.

Compilation dominates the cost, so the forests of the batched tests are padded to one plan
key and carry an "arity gadget" tree (one node of every arity 1..6): a cell then compiles
once per variant, whatever the random structure.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recjax as rj
from recjax import _planner

MAX_ARITY = 6
H = 4  # hidden size of the cells
D = 3  # per-node feature size

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------- forests


@st.composite
def tree_parents(draw, max_nodes):
    """Parent list of one tree (parent[j] < j), of a drawn shape, at most MAX_ARITY children."""
    kind = draw(st.sampled_from(["single", "chain", "caterpillar", "balanced", "random"]))
    m = 1 if kind == "single" else draw(st.integers(1, max_nodes))
    parents = [-1]
    if kind == "chain":  # the most unbalanced tree: depth m - 1
        parents += list(range(m - 1))
    elif kind == "caterpillar":  # a spine 0, 2, 4, ... with one leaf hanging off each spine node
        parents += [j - 2 if j % 2 == 0 else j - 1 for j in range(1, m)]
    elif kind == "balanced":
        k = draw(st.integers(1, MAX_ARITY))
        parents += [(j - 1) // k for j in range(1, m)]
    elif kind == "random":
        counts = [0] * m
        for j in range(1, m):
            p = draw(st.integers(0, j - 1))
            if counts[p] >= MAX_ARITY:
                p = j - 1  # j - 1 has no children yet (children have larger ids)
            counts[p] += 1
            parents.append(p)
    return parents


@st.composite
def forest_specs(draw, max_nodes=60, max_trees=4, dags=True):
    """Children lists of a random forest or DAG, with node ids permuted at random.

    Returns ``(children, order)``: ``children[i]`` lists node i's children in order, and
    ``order`` lists every node after its children (for building ``rj.Tree`` objects).
    """
    children: list[list[int]] = []
    for _ in range(draw(st.integers(1, max_trees))):
        budget = max_nodes - len(children)
        if budget < 1:
            break
        parents = draw(tree_parents(budget))
        off = len(children)
        children += [[] for _ in parents]
        for j, p in enumerate(parents[1:], 1):
            children[off + p].append(off + j)
    n = len(children)
    if dags and n > 1:  # shared subtrees: extra edges i -> j, j > i, keep the graph acyclic
        for a, b in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=6)):
            i, j = min(a, b), max(a, b)
            if i != j and len(children[i]) < MAX_ARITY:
                children[i].insert(draw(st.integers(0, len(children[i]))), j)
    # every edge goes to a larger id: reverse id order lists children first
    perm = draw(st.permutations(range(n)))
    new = [None] * n
    for old, kids in enumerate(children):
        new[perm[old]] = [perm[c] for c in kids]
    return new, [perm[old] for old in reversed(range(n))]


def num_parents(children):
    return np.bincount(np.asarray([c for kids in children for c in kids], dtype=np.int64), minlength=len(children))


def gadget(offset):
    """A tree with one node of every arity 1..MAX_ARITY (22 nodes), ids from ``offset``."""
    children = [list(range(offset + 1, offset + 1 + MAX_ARITY))]
    children += [[] for _ in range(MAX_ARITY)]
    for k in range(1, MAX_ARITY):  # child k - 1 of the root gets k leaves
        first = offset + len(children)
        children[k] = list(range(first, first + k))
        children += [[] for _ in range(k)]
    return children


def build(children, order, data, how):
    """The Forest (built ``how``) and the ``rj.Tree`` roots that mean the same thing.

    ``data`` has one row per node id. A node with several parents is one shared ``Tree``.
    ``from_parents`` lists children by increasing id, so the spec is sorted for it first.
    """
    n = len(children)
    if how == "parents":
        children = [sorted(k) for k in children]
    node_data = [jax.tree.map(lambda a: a[i], data) for i in range(n)]
    trees: dict[int, rj.Tree] = {}
    for i in order:
        trees[i] = rj.Tree(node_data[i], [trees[c] for c in children[i]])
    roots = np.flatnonzero(num_parents(children) == 0).tolist()
    if how == "children":
        forest = rj.Forest.from_children(children, data)
    elif how == "parents":
        parent = np.full(n, -1)
        for i, kids in enumerate(children):
            parent[kids] = i
        forest = rj.Forest.from_parents(parent, data)
    else:
        forest = rj.Forest.from_trees([trees[r] for r in roots])
    if how != "trees":
        assert [forest.children(i).tolist() for i in range(n)] == children
        assert forest.roots.tolist() == roots
    return forest, [trees[r] for r in roots]


def node_data(rng, n):
    return {"x": rng.normal(size=(n, D)).astype(np.float32), "id": np.arange(n, dtype=np.int32)}


# ---------------------------------------------------------------------- cells

# Eager calls record every node's output by its id, so one call per root gives every node's
# eager value (calling the function per node would redo whole subtrees).
_RECORDS: list[dict] = []


def _record(node, out):
    if _RECORDS:  # only during eager reference calls, where the data are concrete
        _RECORDS[-1][int(node.data["id"])] = out
    return out


@functools.cache
def make_cell(out_kind: str, mode: str, leaf_branch: bool):
    """One cell of the family; cached so that each variant traces and compiles once."""

    def pack(h):
        if out_kind == "array":
            return h
        if out_kind == "tuple":
            return h, jnp.sum(h * h)
        return {"h": h, "mean": jnp.mean(h)}

    def unpack(out):
        return out if out_kind == "array" else (out[0] if out_kind == "tuple" else out["h"])

    @rj.recursive
    def cell(p, node):
        x = jnp.tanh(node.data["x"] @ p["W"] + p["b"])
        if leaf_branch and node.is_leaf:
            return _record(node, pack(x))
        if mode == "fixed":  # a weight per child position: one template per arity
            acc = sum((unpack(cell(p, c)) @ p["U"][k] for k, c in enumerate(node.children)), jnp.zeros(H))
        else:  # one template for every arity; the mapped function closes over x
            kids = node.children.map(lambda c: jnp.tanh(unpack(cell(p, c)) @ p["U"][0] + x * p["v"]))
            acc = {
                "sum": lambda: kids.sum(),  # the scalar 0 at a leaf: broadcasts
                "max": lambda: kids.max(initial=-0.5),
                "min": lambda: kids.min(initial=jnp.full(H, 0.5)),
                "mean": lambda: kids.mean(),  # needs the leaf branch
            }[mode]()
        return _record(node, pack(jnp.tanh(x + acc)))

    return cell


def cell_params(seed):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "W": 0.6 * jax.random.normal(k[0], (D, H)),
        "b": 0.1 * jax.random.normal(k[1], (H,)),
        "U": 0.5 * jax.random.normal(k[2], (MAX_ARITY, H, H)),
        "v": 0.5 * jax.random.normal(k[3], (H,)),
    }


def eager_outputs(cell, p, roots):
    """``{node id: eager output}`` for every node reachable from ``roots``."""
    rec: dict = {}
    _RECORDS.append(rec)
    try:
        for r in roots:
            cell(p, r)
    finally:
        _RECORDS.pop()
    return rec


@st.composite
def cell_cases(draw, mode, max_nodes=60):
    """A forest (with the arity gadget, padded to one key), its trees, data and a cell variant."""
    out_kind = draw(st.sampled_from(["array", "tuple", "dict"]))
    leaf_branch = True if mode == "mean" else draw(st.booleans())
    children, order = draw(forest_specs(max_nodes=max_nodes))
    g = gadget(len(children))
    order = list(range(len(children) + len(g) - 1, len(children) - 1, -1)) + order
    children = children + g
    how = draw(st.sampled_from(["children", "trees"] + (["parents"] if num_parents(children).max() <= 1 else [])))
    seed = draw(st.integers(0, 2**16))
    data = node_data(np.random.default_rng(seed), len(children))
    forest, roots = build(children, order, data, how)
    return make_cell(out_kind, mode, leaf_branch), forest, roots, seed


# One plan key for (almost) every forest of cell_cases: <= 82 nodes, levels of <= 32 nodes.
BIG = _planner.PlanKey(96, 96, (_planner.PhaseKey(8, 64, 48),))

MODES = ["fixed", "sum", "max", "min", "mean"]


def batched_rows_by_id(out, forest):
    """Row r of the batched output is node ``data["id"][r]`` of the spec."""
    n = int(np.count_nonzero(forest.node_mask))
    ids = np.asarray(forest.data["id"])[:n]
    return {int(i): jax.tree.map(lambda a: a[r], out) for r, i in enumerate(ids)}


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=3, **SETTINGS)
@given(case=st.data())
def test_batched_values_equal_eager(mode, case):
    cell, forest, roots, seed = case.draw(cell_cases(mode))
    padded = forest.padded(BIG)
    p = cell_params(seed)
    got = batched_rows_by_id(cell.batch(p, padded), padded)
    want = eager_outputs(cell, p, roots)
    assert got.keys() == want.keys()
    for i in want:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f"node {i}"), got[i], want[i])


@functools.cache
def batched_grad(cell):
    def loss(p, weight, forest):
        out = cell.batch(p, forest)
        per_node = sum(jnp.sum(a.reshape(a.shape[0], -1), axis=1) for a in jax.tree.leaves(out))
        return jnp.sum(jnp.where(forest.node_mask, weight * per_node, 0.0))

    return jax.jit(jax.grad(loss))  # the Forest is an argument: one trace per variant


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=2, **SETTINGS)
@given(case=st.data())
def test_gradients_equal_eager(mode, case):
    cell, forest, roots, seed = case.draw(cell_cases(mode, max_nodes=40))  # eager grads are slow
    padded = forest.padded(BIG)
    p = cell_params(seed)
    n = int(np.count_nonzero(padded.node_mask))
    ids = np.asarray(padded.data["id"])
    weight_of_id = np.random.default_rng(seed + 1).normal(size=n).astype(np.float32)
    weight = np.where(np.asarray(padded.node_mask), weight_of_id[np.minimum(ids, n - 1)], 0.0).astype(np.float32)
    got = batched_grad(cell)(p, weight, padded)

    def eager_loss(p):
        outs = eager_outputs(cell, p, roots)
        return sum(weight_of_id[i] * sum(jnp.sum(a) for a in jax.tree.leaves(o)) for i, o in outs.items())

    want = jax.grad(eager_loss)(p)
    for k in p:
        assert np.isfinite(got[k]).all(), k
        np.testing.assert_allclose(got[k], want[k], atol=2e-4, rtol=2e-4, err_msg=k)


# ---------------------------------------------------------------------- plan invariants


def brute_heights(children, order):
    h = np.zeros(len(children), dtype=np.int64)
    for i in order:  # children first
        h[i] = 1 + max((h[c] for c in children[i]), default=-1)
    return h


def check_plan(plan, child_ptr, child_idx, n):
    """Every invariant the executor relies on, checked with array operations."""
    key = plan.key
    degree = np.diff(child_ptr)[:n]
    rows = plan.row_of_node[:n].astype(np.int64)
    num_rows = key.num_buffer_rows
    # every node has exactly one row; padding node rows read row 0
    assert np.unique(rows).size == n and rows.min() >= 0 and rows.max() < num_rows
    assert plan.row_of_node.shape == (key.num_node_rows,) and (plan.row_of_node[n:] == 0).all()
    is_real = np.zeros(num_rows, dtype=bool)
    is_real[rows] = True
    # leaves fill rows [0, L) in node order; padding leaf rows read a real leaf's data
    leaves = np.flatnonzero(degree == 0)
    assert leaves.size >= 1 and plan.leaf_node.shape == (key.num_leaf_rows,)
    assert np.array_equal(rows[leaves], np.arange(leaves.size))
    assert np.array_equal(plan.leaf_node[: leaves.size], leaves)
    assert np.isin(plan.leaf_node[leaves.size :], leaves).all()
    assert is_real[0] and degree[plan.leaf_node[0]] == 0  # the row padding reads is a real leaf
    seen = []
    base = key.num_leaf_rows
    for pk, t in zip(key.phases, plan.phases, strict=True):
        S, K, KE = pk.steps, pk.width, pk.edges
        assert t.node.shape == t.degree.shape == t.edge_start.shape == (S, K)
        assert t.edge_child.shape == t.edge_segment.shape == (S, KE)
        # index tables in range
        assert ((t.node >= 0) & (t.node < n)).all()
        # (a step without real rows reads its copied node's children from slot 0 on,
        # clamped to the last slot when it has more children than the step has slots)
        assert ((t.degree >= 0) & (t.edge_start >= 0) & ((t.edge_start + t.degree <= KE) | (t.edge_start == 0))).all()
        assert ((t.edge_child >= 0) & (t.edge_child < num_rows)).all()
        assert ((t.edge_segment >= 0) & (t.edge_segment <= K)).all()
        assert (np.diff(t.edge_segment, axis=1) >= 0).all()  # segment ops assume sorted ids
        block_row = base + np.arange(S)[:, None] * K + np.arange(K)[None, :]
        real = rows[t.node] == block_row  # a real row holds its node's output
        # padding rows: no real node's output lives there; each copies a real node of
        # its own step (when the step has real rows) or, in a step without real rows, a
        # node whose children are all leaves (a forest without internal nodes: node 0):
        # its degree, and it reads that node's children (slots 0 .. in a step without
        # real rows, whose row r owns slot r holding child r % degree); it owns one
        # slot, holding the node's first child, so a map reduction at a padding row
        # sees a real value, never an empty sum
        assert not is_real[block_row[~real]].any()
        pad_step, pad_local = np.nonzero(~real)
        pad_node = t.node[~real].astype(np.int64)
        g = degree[pad_node]
        assert np.array_equal(t.degree[~real], g)
        assert (g > 0).all() if (degree > 0).any() else (pad_node == 0).all()
        in_real_step = real.any(axis=1)[pad_step]
        same_step = real[pad_step] & (t.node[pad_step] == pad_node[:, None])
        assert same_step[in_real_step].any(axis=1).all()  # the node is in the step
        has = g > 0
        read = np.minimum(np.repeat(t.edge_start[~real][has], g[has]) + _planner.concat_ranges(np.zeros_like(g[has]), g[has]), KE - 1)
        want_read = rows[child_idx[_planner.concat_ranges(child_ptr[pad_node[has]], g[has])]]
        exact = np.repeat(in_real_step[has] | (g[has] <= min(K, KE)), g[has])
        assert np.array_equal(t.edge_child[np.repeat(pad_step[has], g[has]), read][exact], want_read[exact])
        assert (t.edge_start[~real][~in_real_step & has] == 0).all()
        # one owned slot each (segment ids ascend: a row's slots are contiguous)
        owned = t.edge_segment[pad_step] == pad_local[:, None]
        assert (owned.sum(axis=1) == 1).all()
        pad_pos = np.argmax(owned, axis=1)
        which = np.where(in_real_step, 0, pad_local % np.maximum(g, 1))
        want_first = np.where(has, rows[child_idx[np.minimum(child_ptr[pad_node] + which, max(child_idx.size - 1, 0))]] if child_idx.size else 0, 0)
        assert np.array_equal(t.edge_child[pad_step, pad_pos], want_first)
        assert is_real[want_first].all() and (want_first < base + pad_step * K).all()
        assert (want_first[~in_real_step & has] < key.num_leaf_rows).all()
        nodes = t.node[real].astype(np.int64)
        seen.append(nodes)
        assert np.array_equal(rows[nodes], block_row[real])
        assert np.array_equal(t.degree[real], degree[nodes])
        step, local = np.nonzero(real)
        deg = t.degree[real].astype(np.int64)
        e_step = np.repeat(step, deg)
        e_pos = np.repeat(t.edge_start[real], deg) + _planner.concat_ranges(np.zeros_like(deg), deg)
        want_child = rows[child_idx[_planner.concat_ranges(child_ptr[nodes], deg)]]
        assert np.array_equal(t.edge_child[e_step, e_pos], want_child)
        assert np.array_equal(t.edge_segment[e_step, e_pos], np.repeat(local, deg))
        # every node after its children: a child's row precedes its parent's step block
        assert (want_child < base + e_step * K).all()
        assert is_real[want_child].all()  # real edges never read padding rows
        used = np.zeros((S, KE), dtype=bool)
        used[e_step, e_pos] = True
        used[pad_step, pad_pos] = True
        assert used.sum() == deg.sum() + pad_step.size  # no two edges share a slot
        # unused slots are dropped by segment ops; they read the child of the last row's
        # first slot (the row whose node-level values they borrow), never another tree's
        last_first = t.edge_child[np.arange(S), t.edge_start[:, K - 1]]
        unused_step = np.nonzero(~used)[0]
        assert (t.edge_segment[~used] == K).all()
        assert np.array_equal(t.edge_child[~used], last_first[unused_step])
        base += S * K
    assert base == num_rows
    internal = np.sort(np.concatenate(seen)) if seen else np.zeros(0, dtype=np.int64)
    assert np.array_equal(internal, np.flatnonzero(degree > 0))  # computed exactly once


@settings(max_examples=150, **SETTINGS)
@given(spec=forest_specs(max_nodes=300, max_trees=6), how=st.sampled_from(["children", "trees", "parents"]))
def test_plan_invariants(spec, how):
    children, order = spec
    if how == "parents" and num_parents(children).max(initial=0) > 1:
        how = "children"
    n = len(children)
    forest, _ = build(children, order, np.zeros((n, 1), np.float32) if how != "trees" else {"id": np.arange(n, dtype=np.int32)}, how)
    check_plan(forest.plan, forest.child_ptr, forest.child_idx, n)
    # heights are those of the spec (ids are kept except by from_trees)
    if how != "trees":
        assert np.array_equal(forest.plan.height, brute_heights(children, order))
    # steps follow the depth: at most ceil(level / width) steps per level (+ ladder rounding)
    assert forest.plan.num_steps <= 2 * sum(-(-np.bincount(forest.plan.height)[1:] // 8)) + 1


@settings(max_examples=40, **SETTINGS)
@given(specs=st.lists(forest_specs(max_nodes=120, max_trees=3), min_size=1, max_size=3))
def test_padded_plans_keep_invariants(specs):
    forests = []
    for children, order in specs:
        forests.append(build(children, order, np.zeros((len(children), 1), np.float32), "children")[0])
    padded = rj.Forest.pad_all(forests)
    assert len({f.plan.key for f in padded}) == 1
    for exact, f in zip(forests, padded):
        n = exact.num_nodes
        assert f.node_mask.tolist() == [True] * n + [False] * (f.num_nodes - n)
        check_plan(f.plan, f.child_ptr, f.child_idx, n)
        assert np.array_equal(f.plan.height, exact.plan.height)
