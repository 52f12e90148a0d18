"""Plan invariants on random forests and DAGs (numpy only)."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import recjax as rj
from models import random_binary_tree, random_tree
from recjax import _planner, train
from recjax._forest import _TreeTable, _tree_arrays


def random_dag(rng, n, max_children, share):
    """Children lists where node i's children are drawn from nodes > i (so it is acyclic)."""
    children = []
    for i in range(n):
        k = int(rng.integers(0, max_children + 1)) if i < n - 1 else 0
        pool = np.arange(i + 1, n)
        if share:
            kids = rng.choice(pool, size=min(k, pool.size), replace=True) if pool.size else []
        else:
            kids = []
        children.append([int(c) for c in kids])
    return children


def brute_heights(children):
    n = len(children)
    h = [0] * n
    for i in reversed(range(n)):  # children have larger ids
        h[i] = 1 + max((h[c] for c in children[i]), default=-1)
    return h


@pytest.mark.parametrize("seed", range(20))
def test_plan_invariants(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    if seed % 2:
        children = random_dag(rng, n, 4, share=True)
    else:
        parent = np.array([-1] + [int(rng.integers(max(0, i - 30), i)) for i in range(1, n)])
        forest = rj.Forest.from_parents(parent, np.zeros(n, np.float32))
        children = [forest.children(i).tolist() for i in range(n)]
    forest = rj.Forest.from_children(children, np.zeros(n, np.float32)) if seed % 2 else forest
    plan = forest.plan
    key = plan.key
    assert plan.height.tolist() == brute_heights(children)

    # every real node has its own row; padding rows of row_of_node point to row 0
    rows = plan.row_of_node[:n]
    assert len(set(rows.tolist())) == n
    assert (plan.row_of_node[n:] == 0).all()
    assert rows.max() < key.num_buffer_rows

    # leaves first; every internal node appears in exactly one table cell
    leaves = [i for i in range(n) if not children[i]]
    assert sorted(rows[leaves].tolist()) == list(range(len(leaves)))
    seen = []
    base = key.num_leaf_rows
    for pk, t in zip(key.phases, plan.phases):
        assert t.node.shape == (pk.steps, pk.width) and t.edge_child.shape == (pk.steps, pk.edges)
        for s in range(pk.steps):
            for r in range(pk.width):
                row = base + s * pk.width + r
                d = t.degree[s, r]
                node = int(t.node[s, r])
                g = len(children[node])
                if rows[node] != row:
                    # padding: a copy of a real internal node (the step's own when it
                    # has real rows): its data and degree; it reads that node's children
                    # and owns one slot holding its first child
                    assert g and d == g, "padding copies an internal node"
                    step_nodes = [int(v) for v in t.node[s] if rows[v] >= base + s * pk.width]
                    step_nodes = [v for v in step_nodes if rows[v] < base + (s + 1) * pk.width]
                    assert not step_nodes or node in step_nodes
                    own = [e for e in range(pk.edges) if t.edge_segment[s, e] == r]
                    assert len(own) == 1
                    # a step of padding: row r's slot holds the node's child r % degree
                    # (slots 0 .. degree - 1 hold its children in order)
                    first = children[node][0 if step_nodes else r % g]
                    assert t.edge_child[s, own[0]] == rows[first]
                    if not step_nodes:
                        assert t.edge_start[s, r] == 0 and own[0] == r
                        assert all(rows[c] < key.num_leaf_rows for c in children[node])  # leaves
                else:
                    seen.append(node)
                assert d == g
                slots = range(t.edge_start[s, r], t.edge_start[s, r] + d)
                got = [int(t.edge_child[s, min(e, pk.edges - 1)]) for e in slots]  # clamped, as read
                if rows[node] == row or step_nodes or g <= min(pk.width, pk.edges):
                    assert got == [int(rows[c]) for c in children[node]]
                if rows[node] == row:
                    assert all(t.edge_segment[s, e] == r for e in slots)
                # children were computed before this step began
                assert all(c < base + s * pk.width for c in got)
            # every row owns at least one slot; unused slots are dropped and read the
            # last row's first child
            assert set(range(pk.width)) <= set(t.edge_segment[s].tolist())
            pad = t.edge_segment[s] == pk.width
            assert (t.edge_child[s][pad] == t.edge_child[s, t.edge_start[s, -1]]).all()
            assert (t.edge_segment[s] <= pk.width).all()
        base += pk.steps * pk.width
    assert sorted(seen) == [i for i in range(n) if children[i]]
    assert base == key.num_buffer_rows


def test_ladder_is_geometric_and_monotone():
    values = [_planner.ladder(n) for n in range(0, 5000)]
    assert all(v >= n for n, v in enumerate(values))
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(v <= 1.5 * n for n, v in enumerate(values) if n >= 4)
    assert len(set(values)) < 30  # few buckets


def test_fine_ladder_pads_at_most_a_quarter_and_pad_all_rounds_up_the_coarse_one():
    values = [_planner.fine_ladder(n) for n in range(5000)]
    assert all(v >= n for n, v in enumerate(values))
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(v <= 1.25 * n for n, v in enumerate(values) if n >= 1)
    assert {_planner.ladder(n) for n in range(4097)} <= set(values)  # coarse rungs are rungs
    np.testing.assert_array_equal(_planner._fine_ladders(np.arange(5000)), values)  # vectorised
    rng = np.random.default_rng(0)
    forests = [rj.Forest.from_trees([random_binary_tree(rng, 20) for _ in range(40)]) for _ in range(2)]
    for f in rj.Forest.pad_all(forests):
        key = f.plan.key
        assert key.num_leaf_rows == _planner.ladder(key.num_leaf_rows)
        assert all(p.steps == _planner.ladder(p.steps) for p in key.phases)


def _level_layout_steps(plan, width_of_level):
    """Steps if every level started a step: the layout before steps were packed."""
    h = plan.height[plan.height > 0]
    sizes = np.bincount(h)[1:]
    return int(np.sum(-(-sizes // width_of_level)))


def test_steps_are_filled_across_levels():
    """A batch of random binary trees: a level's last step is topped up with nodes of the
    levels above whose children are done, so steps hold several heights and the plan
    computes few padding rows."""
    rng = np.random.default_rng(0)
    sizes = np.clip(np.rint(rng.gamma(4.5, 19 / 4.5, 256)), 2, 56).astype(int)  # SST-like
    forest = rj.Forest.from_trees([random_binary_tree(rng, int(n)) for n in sizes])
    plan, key = forest.plan, forest.plan.key
    pk, t = key.phases[0], plan.phases[0]
    real = t.degree > 0
    heights = [set(plan.height[t.node[s][real[s]]].tolist()) for s in range(pk.steps)]
    assert max(len(h) for h in heights) > 1  # steps mix levels
    internal = int(np.count_nonzero(plan.height > 0))
    rows = sum(p.width * p.steps for p in key.phases)
    assert rows <= 1.2 * internal, (rows, internal)
    assert pk.steps < _level_layout_steps(plan, pk.width)
    # children always come first (as in test_plan_invariants, on this packed plan)
    row = plan.row_of_node
    for s in range(pk.steps):
        for r in np.flatnonzero(real[s]):
            kids = forest.children(int(t.node[s, r]))
            assert (row[kids] < key.num_leaf_rows + s * pk.width + sum(
                p.width * p.steps for p in key.phases[: key.phases.index(pk)])).all()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("width", [8, 32, 128])
def test_packing_takes_the_fewest_steps(seed, width):
    """``_pack`` on one phase of random trees takes ``max_j (j + ceil(n_j / width))``
    steps (``n_j``: internal nodes at least ``j`` below their root), a lower bound for
    any schedule (those nodes take that many steps, then the chain above the last one
    ``j`` more), so the packing is optimal; and every node comes after its children."""
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:  # random arity, deep and shallow trees mixed
        n = int(rng.integers(50, 3000))
        parent = np.array([-1] + [int(rng.integers(max(0, i - int(rng.integers(1, 60))), i)) for i in range(1, n)])
        forest = rj.Forest.from_parents(parent)
    else:
        sizes = rng.integers(2, 60 if seed % 3 == 1 else 400, int(rng.integers(1, 120)))
        forest = rj.Forest.from_trees([random_binary_tree(rng, int(s)) for s in sizes])
    n = forest.num_nodes
    height = forest.plan.height
    internal = np.flatnonzero(height > 0)
    nodes = internal[np.argsort(height[internal], kind="stable")]  # level by level
    parent = _planner._parents(forest.child_ptr, forest.child_idx)
    depth = _planner._depth_in_class(parent, (height > 0).astype(np.int64))
    scratch = np.ones(n, dtype=np.int64)
    slot = _planner._pack(nodes, depth[nodes], width, forest.child_ptr, forest.child_idx, scratch)
    assert (scratch == 1).all() and len(set(slot.tolist())) == nodes.size
    step = np.full(n, -1)
    step[nodes] = slot // width
    for v in nodes:
        assert (step[forest.children(int(v))] < step[v]).all()
    below = np.bincount(depth[nodes])[::-1].cumsum()[::-1]  # n_j
    assert step.max() + 1 == max(j + -(-int(nj) // width) for j, nj in enumerate(below))


def test_similar_batches_share_a_bucket():
    rng = np.random.default_rng(0)
    keys, shapes, padded = set(), [], set()
    for _ in range(30):
        n = int(rng.integers(900, 1000))
        parent = np.array([-1] + [int(rng.integers(max(0, i - 3), i)) for i in range(1, n)])
        forest = rj.Forest.from_parents(parent, np.zeros(n))
        keys.add(forest.plan.key)
        padded.add(rj.Forest.pad_all([forest], shapes)[0].plan.key)
    assert len(keys) <= 10  # alone, on the fine ladder
    assert len(padded) <= 4  # through pad_all (as fit does), on the coarse one


def _assert_same_plan(a, b):
    assert a.key == b.key
    for name in ("leaf_node", "row_of_node", "height", "class_steps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for x, y in zip(a.phases, b.phases, strict=True):
        for name in x.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kinds", [False, True])
def test_plan_reusing_a_layout_equals_a_fresh_plan(seed, kinds):
    # pad_all plans each forest at its window's classes, then at the window's shape; the
    # second plan takes the first one's layout and must equal planning from scratch.
    rng = np.random.default_rng(seed)
    trees = [random_binary_tree(rng, int(rng.integers(2, 40))) for _ in range(int(rng.integers(1, 40)))]
    forest = rj.Forest.from_trees(trees)
    kind = rng.integers(0, 3, forest.child_ptr.size - 1) if kinds else None
    first = _planner.plan(forest.child_ptr, forest.child_idx, kind=kind)
    classes = _planner.shared_classes([first.class_steps])
    narrow = _planner.plan(forest.child_ptr, forest.child_idx, classes, kind, reuse=first)
    _assert_same_plan(narrow, _planner.plan(forest.child_ptr, forest.child_idx, classes, kind))
    grow = lambda p: p._replace(steps=p.steps + int(rng.integers(0, 9)), edges=2 * p.edges)
    key = narrow.key._replace(
        num_leaf_rows=narrow.key.num_leaf_rows + int(rng.integers(0, 50)),
        phases=tuple(grow(p) for p in narrow.key.phases),
    ).coarse()
    bigger = _planner.plan(forest.child_ptr, forest.child_idx, key, kind, reuse=narrow)
    assert bigger.layout is narrow.layout  # same classes: the layout was taken over
    _assert_same_plan(bigger, _planner.plan(forest.child_ptr, forest.child_idx, key, kind))


def test_planner_does_not_import_jax():
    path = pathlib.Path(_planner.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('planner', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['planner'] = m; spec.loader.exec_module(m)\n"
        "m.plan(__import__('numpy').array([0, 2, 2, 2]), __import__('numpy').array([1, 2]))\n"
        "assert 'jax' not in sys.modules, 'the planner imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_narrowest_class_only_for_long_one_node_runs():
    chain = rj.Forest.from_parents(np.arange(-1, 99))  # 99 one-node levels
    assert [p.width for p in chain.plan.key.phases] == [2]
    assert chain.plan.key.phases[0].steps == _planner.fine_ladder(99)
    # a short run of one-node levels (the top of the tallest tree) stays in width 8, so
    # random batches do not split their bucket on whether they have one
    short = rj.Forest.from_parents([-1, 0, 1, 2, 2, 3, 3, 4, 4])
    assert 2 not in [p.width for p in short.plan.key.phases]
    # a deep tree: a wide bottom and a long chain on top get one phase each
    parent = np.r_[-1, np.arange(0, 49), np.repeat(49, 20), np.arange(50, 70)]
    deep = rj.Forest.from_parents(parent)
    assert [p.width for p in deep.plan.key.phases] == [32, 2]  # 20 rows: 1 step, not 3 of 8


def _plan_cost(level_size, width):
    """The cost ``_width_class`` minimises, for one assignment of widths to levels."""
    steps = -(-level_size // width)
    return sum(
        _planner.fine_ladder(int(steps[width == w].sum())) * (_planner._STEP_COST + w)
        + _planner._PHASE_COST
        for w in np.unique(width)
    )


@pytest.mark.parametrize("seed", range(20))
def test_width_classes_cost_no_more_than_any_simpler_choice(seed):
    rng = np.random.default_rng(seed)
    size = np.sort(rng.integers(1, 3000, int(rng.integers(1, 40))))[::-1]
    if seed % 4 == 0:
        size = rng.permutation(size)  # level sizes need not shrink with height
    width, _, packed = _planner._width_class(size)
    assert np.all(np.diff(packed) <= 0)
    assert np.all(np.diff(width) <= 0)  # one run of levels per class
    assert set(width.tolist()) <= set(_planner.WIDTH_CLASSES[1:])
    cost = _plan_cost(size, width)
    for w in _planner.WIDTH_CLASSES[1:]:  # one class for every level
        assert cost <= _plan_cost(size, np.full(size.size, w))
    # and than each level's cheapest class, made not to grow with height
    classes = np.array(_planner.WIDTH_CLASSES[1:])
    steps = -(-size[:, None] // classes)
    own = classes[np.argmin(steps * (_planner._STEP_COST + classes), axis=1)]
    assert cost <= _plan_cost(size, np.maximum.accumulate(own[::-1])[::-1])


def test_small_batches_run_in_one_phase():
    """Each phase is a loop compiled forward and backward: a batch of 32 SST-sized
    trees takes one (measured: training step compile 2.8 s with three, 1.1 s with one)."""
    rng = np.random.default_rng(0)
    trees = [random_binary_tree(rng, int(rng.integers(2, 40))) for _ in range(32)]
    assert len(rj.Forest.from_trees(trees).plan.key.phases) == 1


def test_chain_heights_take_few_rounds():
    n = 200_000
    ptr = np.r_[np.arange(n), n - 1]
    idx = np.arange(1, n)
    np.testing.assert_array_equal(_planner.heights(ptr, idx), np.arange(n - 1, -1, -1))
    # A left-deep binary chain (each internal node: the next one and a leaf), with up to
    # three more leaves here and there: contracted like a single-child chain (a round per
    # level would take minutes at this size).
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 4, n) * (rng.random(n) < 0.1)
    kids, nxt = [], n  # internal nodes 0..n-1, leaves numbered from n
    for i in range(n):
        leaves = list(range(nxt, nxt + 1 + int(extra[i])))
        nxt += len(leaves)
        kids.append(([i + 1] if i + 1 < n else []) + leaves)
    kids += [[] for _ in range(nxt - n)]
    ptr = np.r_[0, np.cumsum([len(k) for k in kids])]
    idx = np.fromiter((c for k in kids for c in k), np.int64)
    want = np.r_[np.arange(n, 0, -1), np.zeros(nxt - n, np.int64)]
    np.testing.assert_array_equal(_planner.heights(ptr, idx), want)


def test_shallow_trees_take_a_round_per_level_and_deep_ones_give_way():
    """``heights`` of trees goes level by level (``_shallow_tree_heights``) until the
    levels known to be left pass ``_MAX_SHALLOW_ROUNDS``, then contracts instead; the two
    agree with plain recursion on shallow forests, on chains, and on a bushy forest
    under a long chain (where the level-by-level pass starts, then gives up)."""
    rng = np.random.default_rng(0)
    bushy = [random_binary_tree(rng, int(rng.integers(2, 60))) for _ in range(40)]
    top = rj.Tree(np.float32(0), [rj.Tree(np.float32(0)), rj.Tree(np.float32(0))])
    for _ in range(300):
        top = rj.Tree(np.float32(0), [top, rj.Tree(np.float32(0))])
    cases = {
        "shallow": (bushy, True),
        "bushy under a chain": ([rj.Tree(np.float32(0), [top] + [_float_tree(t) for t in bushy])], False),
    }
    for name, (trees, shallow) in cases.items():
        forest = rj.Forest.from_trees([_float_tree(t) for t in trees])
        children = [forest.children(i).tolist() for i in range(forest.num_nodes)]
        ptr, idx = forest.child_ptr, forest.child_idx
        parent = _planner._parents(ptr, idx)
        got = _planner._shallow_tree_heights(parent, np.diff(ptr))
        assert (got is not None) == shallow, name
        assert _planner.heights(ptr, idx).tolist() == brute_heights(children), name
        if shallow:
            assert got.tolist() == brute_heights(children), name


def _float_tree(t):
    return rj.Tree(np.float32(0), [_float_tree(c) for c in t.children])


def _random_forest_trees(rng, kinds):
    """Random trees of mixed shapes: binary, wide, and chains (narrow top levels)."""
    def tag():
        return kinds[int(rng.integers(len(kinds)))] if kinds else None

    trees = []
    for _ in range(int(rng.integers(1, 12))):
        shape = int(rng.integers(3))
        if shape == 0:
            t = random_binary_tree(rng, int(rng.integers(1, 30)))
        elif shape == 1:
            t = random_tree(rng, int(rng.integers(1, 40)), 5, lambda i: np.float32(i))
        else:
            t = rj.Tree(np.float32(0))
            for _ in range(int(rng.integers(1, 60))):
                t = rj.Tree(np.float32(1), [t])
        trees.append(t)
    # one data schema (random_binary_tree holds int tokens), and random kinds
    def retag(t):
        return rj.Tree(np.float32(len(t.children)), [retag(c) for c in t.children], kind=tag())

    return [retag(t) for t in trees]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kinds", [None, ("A", "B", "C")])
def test_class_steps_alone_equal_the_plans(seed, kinds):
    rng = np.random.default_rng(seed)
    forest = rj.Forest.from_trees(_random_forest_trees(rng, kinds), kinds=kinds)
    kind = forest._kind
    steps = _planner.class_steps(forest.child_ptr, forest.child_idx, kind)
    np.testing.assert_array_equal(steps, _planner.plan(forest.child_ptr, forest.child_idx, kind=kind).class_steps)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kinds", [None, ("A", "B", "C")])
def test_padding_trees_at_once_equals_pad_all_of_their_forests(seed, kinds):
    # batches pads each window with Forest._pad_trees, which skips the plan each forest
    # gets alone in from_trees; windows in a row share one list of shapes.
    rng = np.random.default_rng(seed)
    windows = [
        [_random_forest_trees(rng, kinds) for _ in range(int(rng.integers(1, 5)))]
        for _ in range(4)
    ]
    seen_fast, seen_slow = [], []
    for w in windows:
        fast = rj.Forest._pad_trees(w, kinds, seen_fast)
        slow = rj.Forest.pad_all([rj.Forest.from_trees(g, kinds=kinds) for g in w], seen_slow)
        assert seen_fast == seen_slow
        for a, b in zip(fast, slow, strict=True):
            assert a._meta == b._meta
            _assert_same_plan(a.plan, b.plan)
            la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
            assert len(la) == len(lb)
            for x, y in zip(la, lb):
                np.testing.assert_array_equal(x, y)
                assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(a.child_ptr, b.child_ptr)
            np.testing.assert_array_equal(a.child_idx, b.child_idx)


def test_padding_trees_checks_them_like_from_trees():
    with pytest.raises(TypeError, match="element 1 is a int, not an rj.Tree"):
        rj.Forest._pad_trees([[rj.Tree(1.0)], [rj.Tree(1.0), 3]])
    with pytest.raises(ValueError, match="Forest.from_trees got no trees"):
        rj.Forest._pad_trees([[]])


def _dataset(rng, kinds):
    """Random trees with several data fields, some with a subtree shared inside the tree."""
    trees = []
    for t in _random_forest_trees(rng, kinds):
        def redata(t):
            kids = [redata(c) for c in t.children]
            if kids and rng.random() < 0.2:  # a DAG inside one tree
                kids.append(kids[0])
            data = {"x": np.float32(rng.normal()), "v": rng.normal(size=3).astype(np.float32),
                    "k": int(rng.integers(100))}
            return rj.Tree(data, kids, kind=t.kind)

        trees.append(redata(t))
    return trees


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kinds", [None, ("A", "B", "C")])
def test_a_tree_table_cuts_out_what_walking_the_trees_gives(seed, kinds):
    # fit walks its dataset once into a _TreeTable and cuts every batch out of it.
    rng = np.random.default_rng(seed)
    trees = _dataset(rng, kinds) + _dataset(rng, kinds)
    table = _TreeTable.build(trees, kinds)
    assert table.sizes.tolist() == train.tree_sizes(trees).tolist()
    assert table.layout == rj.Forest._check_trees(trees, kinds)
    groups = [rng.permutation(len(trees))[: int(rng.integers(1, len(trees) + 1))] for _ in range(6)]
    groups += [np.arange(len(trees)), np.array([len(trees) - 1])]
    for g in groups:
        got = table.arrays(g)
        want = _tree_arrays([trees[j] for j in g], kinds)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        assert jax.tree.structure(got) == jax.tree.structure(want)
    seen_fast, seen_slow = [], []
    fast = rj.Forest._pad_parts([table.arrays(g) for g in groups], kinds, seen_fast)
    slow = rj.Forest._pad_trees([[trees[j] for j in g] for g in groups], kinds, seen_slow)
    assert seen_fast == seen_slow
    for a, b in zip(fast, slow, strict=True):
        assert a._meta == b._meta
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_no_tree_table_when_trees_share_a_node():
    leaf = rj.Tree(1.0)
    a, b = rj.Tree(0.0, [leaf]), rj.Tree(0.0, [leaf, rj.Tree(2.0)])
    assert _TreeTable.build([a, rj.Tree(3.0)], None) is not None
    assert _TreeTable.build([a, b], None) is None  # a subtree in two trees
    assert _TreeTable.build([a, rj.Tree(3.0), a], None) is None  # a tree listed twice
    assert _TreeTable.build([a, leaf], None) is None  # a root that is another tree's node
    assert _TreeTable.build([leaf, a], None) is None


def test_a_tree_table_refuses_what_from_trees_refuses():
    bad = [
        ([rj.Tree(1.0), rj.Tree(1)], ValueError, "same structure, shapes and dtypes"),
        ([rj.Tree(1.0, kind="A")], ValueError, "no kinds= vocabulary"),
        ([rj.Tree(1.0), 3], TypeError, "element 1 is a int"),
    ]
    loop = rj.Tree(1.0, [rj.Tree(2.0)])
    loop.children[0].children = (loop,)
    bad.append(([loop], ValueError, "cycle"))
    for trees, error, message in bad:
        with pytest.raises(error, match=message):
            rj.Forest.from_trees(trees)
        with pytest.raises(error, match=message):
            _TreeTable.build(trees, None)


def test_any_group_of_trees_stacks_its_data_to_one_dtype_and_structure():
    # fit stacks a whole dataset at once (a _TreeTable) and batches stack their own trees:
    # the dtype and structure of node data must not depend on which nodes are together.
    big = [rj.Tree(1, [rj.Tree(16777217)]), rj.Tree(2**63)]  # numpy alone: float64 or uint64
    for group in (big, big[::-1]):
        with pytest.raises(ValueError, match="is the Python int 9223372036854775808, outside int64"):
            rj.Forest.from_trees(group)
        with pytest.raises(ValueError, match="outside int64"):
            _TreeTable.build(group, None)
    assert rj.Forest.from_trees(big[:1]).data.dtype == jax.dtypes.canonicalize_dtype(np.int64)
    assert rj.Forest.from_trees(big[:1]).data.tolist()[:2] == [1, 16777217]
    # the array constructors read a list of Python ints by the same rule
    for ids in ([2**63, 2**63 + 1000, 1], [[1, 2], [2**64, 3], [4, 5]]):
        with pytest.raises(ValueError, match="data\\['id'\\] at node [01] is the Python int .* outside int64"):
            rj.Forest.from_parents([-1, -1, -1], {"id": ids})
        with pytest.raises(ValueError, match="outside int64"):
            rj.Forest.from_children([[], [], []], {"id": ids})
    assert rj.Forest.from_parents([-1, 0], {"x": [1.5, 2]}).data["x"].tolist() == [1.5, 2.0]
    # a list is a container, also after a node whose field is an array
    lists = [rj.Tree({"v": np.array([1.0, 2.0])}), rj.Tree({"v": [3.0, 4.0]})]
    for group in (lists, lists[::-1]):
        for convert in (rj.Forest.from_trees, lambda g: _TreeTable.build(g, None)):
            with pytest.raises(ValueError, match="data structure PyTreeDef"):
                convert(group)
