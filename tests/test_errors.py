"""Bad input: every error is raised before device work and names the node or field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recjax as rj
from models import tree_lstm, tree_lstm_params


@rj.recursive
def add(node):
    return node.data + node.children.map(add).sum()


def test_cycle_is_named():
    with pytest.raises(ValueError, match=r"cycle through nodes 1 -> 2 -> 3 -> 1"):
        rj.Forest.from_children([[1], [2], [3], [1]], np.zeros(4))
    with pytest.raises(ValueError, match="node 2 is its own parent"):
        rj.Forest.from_parents([-1, 0, 2], np.zeros(3))
    with pytest.raises(ValueError, match="cycle"):
        rj.Forest.from_parents([1, 0], np.zeros(2))
    with pytest.raises(ValueError, match="no root"):
        rj.Forest.from_children([[1], [0]], np.zeros(2))
    # one parent per node (the tree path of the planner's heights), beside a real tree
    with pytest.raises(ValueError, match=r"cycle through nodes 0 -> 1 -> 0"):
        rj.Forest.from_children([[1, 2], [0, 3], [], [], [5, 6], [], []], np.zeros(7))


def test_child_index_out_of_range_names_node():
    with pytest.raises(ValueError, match=r"child id 7 of node 1 is out of range: the forest has 3 nodes"):
        rj.Forest.from_children([[1], [7], []], np.zeros(3))
    with pytest.raises(ValueError, match=r"child id -1 of node 0"):
        rj.Forest.from_children([[-1], [], []], np.zeros(3))
    with pytest.raises(ValueError, match=r"parent\[1\] = 5 is out of range for 3 nodes"):
        rj.Forest.from_parents([-1, 5, 0], np.zeros(3))
    with pytest.raises(TypeError, match="integer array; got dtype float64"):
        rj.Forest.from_parents([-1.0, 0.0], np.zeros(2))
    with pytest.raises(TypeError, match="child ids must be integers"):
        rj.Forest.from_children([[1.5], []], np.zeros(2))


def test_binary_cell_meeting_three_children_names_node():
    t = rj.Tree({"token": 1}, [rj.Tree({"token": 2}), rj.Tree({"token": 3}), rj.Tree({"token": 4})])
    ok = rj.Tree({"token": 1}, [rj.Tree({"token": 2}), rj.Tree({"token": 3})])
    forest = rj.Forest.from_trees([ok, t])
    p = tree_lstm_params(jax.random.key(0))
    with pytest.raises(ValueError, match=r"cannot handle a node with 3 children \(node 3 of the forest"):
        tree_lstm.batch(p, forest)


def test_data_schema_mismatch_lists_every_bad_node():
    trees = [rj.Tree({"x": 1.0}), rj.Tree({"x": 2}), rj.Tree({"y": 1.0}), rj.Tree({"x": np.zeros(2)})]
    with pytest.raises(ValueError) as e:
        rj.Forest.from_trees(trees)
    msg = str(e.value)
    assert "node 1: data['x'] has shape () and dtype int64" in msg
    assert "node 2: data structure" in msg
    assert "node 3: data['x'] has shape (2,)" in msg
    with pytest.raises(ValueError, match=r"data\['x'\] has shape \(2,\); its leading axis must be the number of nodes \(3\)"):
        rj.Forest.from_parents([-1, 0, 0], {"x": np.zeros(2)})
    with pytest.raises(TypeError, match="must be numeric"):
        rj.Forest.from_trees([rj.Tree("text")])


def test_data_of_one_dtype_in_different_python_types_stacks():
    """1.0 and np.float64(2) (or 1 and np.int64, a 0-d array and a numpy scalar, a JAX
    scalar and a numpy one) have one shape and dtype: accepted, in both stacking paths."""
    pairs = [(1.0, np.float64(2.0)), (1, np.int64(2)), (np.array(1.0), np.float64(2.0)),
             (jnp.float32(1), np.float32(2)), (True, np.bool_(False))]
    for a, b in pairs:
        for wrap in (lambda v: {"x": v}, lambda v: (v, {"y": v})):
            data = rj.Forest.from_trees([rj.Tree(wrap(a), [rj.Tree(wrap(b))])]).data
            got = jax.tree_util.tree_leaves(data)[0]
            np.testing.assert_array_equal(got, np.asarray([a, b], got.dtype))
    with pytest.raises(ValueError, match=r"node 1: data\['x'\] has shape \(\) and dtype float32; node 0 has shape \(\) and dtype float64"):
        rj.Forest.from_trees([rj.Tree({"x": 1.0}, [rj.Tree({"x": np.float32(2)})])])


def test_data_that_does_not_fit_jax_dtypes_is_refused():
    """Without x64 a forest stores int64 as int32 and float64 as float32: values that
    would wrap around or become inf are refused, naming the node; others convert."""
    with pytest.raises(ValueError, match=r"data\['id'\] at node 0 holds 4294967303, which does not fit int32"):
        rj.Forest.from_trees([rj.Tree({"id": 2**32 + 7})])
    with pytest.raises(ValueError, match=r"data at node 2 holds -3000000000, which does not fit int32"):
        rj.Forest.from_parents([-1, 0, 0], np.array([1, 2, -3_000_000_000]))
    with pytest.raises(ValueError, match=r"data\[1\] at node 1 holds 1e\+39, which does not fit float32"):
        rj.Forest.from_trees([rj.Tree((1.0, 1.0), [rj.Tree((2.0, 1e39))])])
    with pytest.raises(ValueError, match=r"data\['v'\] at node 0 holds 5000000000"):
        rj.Forest.from_children([[]], {"v": np.array([[1, 5_000_000_000]], np.uint64)})
    ok = rj.Forest.from_parents([-1, 0], {"i": np.array([2**31 - 1, -(2**31)]), "f": np.array([np.inf, -3e38]),
                                          "nan": np.array([np.nan, 1.0])})
    np.testing.assert_array_equal(ok.data["i"], [2**31 - 1, -(2**31)])
    assert ok.data["i"].dtype == np.int32 and ok.data["f"].dtype == np.float32
    np.testing.assert_array_equal(ok.data["f"], np.array([np.inf, -3e38], np.float32))
    assert np.isnan(ok.data["nan"][0])


def test_flat_dict_data_stacks_by_key_and_the_collector_is_restored():
    """The by-key fast path for flat dicts gives the pytree path's arrays; converting
    pauses the garbage collector and restores its state, also after an error."""
    import gc

    rows = [{"b": np.float32(i), "a": i % 2 == 0, "v": np.full(2, i, np.int32), "x": 0.5 * i} for i in range(5)]
    trees = [rj.Tree(rows[0], [rj.Tree(r) for r in rows[1:3]]), rj.Tree(rows[3], [rj.Tree(rows[4])])]
    data = rj.Forest.from_trees(trees).data
    assert list(data) == ["a", "b", "v", "x"]  # pytree (sorted) key order
    np.testing.assert_array_equal(data["a"], [True, False, True, False, True])
    assert data["b"].dtype == np.float32 and data["v"].shape == (5, 2) and data["v"].dtype == np.int32
    np.testing.assert_array_equal(data["x"], 0.5 * np.arange(5))
    nested = rj.Forest.from_trees([rj.Tree({"p": {"q": 1.0}}), rj.Tree({"p": {"q": 2.0}})]).data
    np.testing.assert_array_equal(nested["p"]["q"], [1.0, 2.0])

    assert gc.isenabled()
    with pytest.raises(ValueError, match="node 1: data"):
        rj.Forest.from_trees([rj.Tree({"x": 1.0}), rj.Tree({"x": 2})])
    assert gc.isenabled()
    gc.disable()
    try:
        rj.Forest.from_trees(trees)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_empty_forest():
    for build in (
        lambda: rj.Forest.from_trees([]),
        lambda: rj.Forest.from_parents(np.zeros(0, int)),
        lambda: rj.Forest.from_children([]),
    ):
        with pytest.raises(ValueError, match="empty forest"):
            build()


def test_batch_with_a_tree_and_call_without_node():
    t = rj.Tree(1.0)
    with pytest.raises(TypeError, match=r"takes a Forest, not a Tree; use rj.Forest.from_trees\(\[tree\]\)"):
        add.batch(t)
    with pytest.raises(TypeError, match="got no node argument"):
        add(1.0)
    with pytest.raises(TypeError, match=r"got a Forest; use add.batch"):
        add(rj.Forest.from_trees([t]))
    with pytest.raises(TypeError, match="takes a list of trees"):
        rj.Forest.from_trees(t)
    with pytest.raises(TypeError, match="Tree children must be Tree objects; child 0 is a float"):
        rj.Tree(1.0, [2.0])


def test_control_flow_on_traced_data_explains_fix():
    @rj.recursive
    def f(node):
        if node.data > 0:
            return node.data
        return -node.data

    forest = rj.Forest.from_trees([rj.Tree(1.0)])
    with pytest.raises(TypeError, match=r"branches on traced data at a leaf.*use `jnp.where` or `lax.cond`"):
        f.batch(forest)


def test_changing_arguments_in_recursive_call():
    @rj.recursive
    def f(depth, node):
        return depth + node.children.map(lambda c: f(depth + 1, c)).sum()

    t = rj.Tree(0.0, [rj.Tree(0.0)])
    with pytest.raises(TypeError, match="must pass the same non-node arguments"):
        f(jnp.float32(0), t)
    with pytest.raises(TypeError, match="must pass the same non-node arguments"):
        f.batch(jnp.float32(0), rj.Forest.from_trees([t]))


def test_output_structure_mismatch_names_signature():
    @rj.recursive
    def f(node):
        if node.is_leaf:
            return node.data
        return node.data, node.children.map(lambda c: f(c)).sum()

    forest = rj.Forest.from_trees([rj.Tree(1.0, [rj.Tree(2.0)])])
    with pytest.raises(TypeError, match=r"returns .* at an internal node but float32\[\] at a leaf"):
        f.batch(forest)


def test_empty_reductions_say_how_to_fix():
    @rj.recursive
    def f(node):
        return node.data + node.children.map(f).max()

    forest = rj.Forest.from_trees([rj.Tree(1.0, [rj.Tree(2.0)])])
    for run in (lambda: f.batch(forest), lambda: f(rj.Tree(1.0))):
        with pytest.raises(ValueError, match=r"max\(\) at a node without children.*`if node.is_leaf:.*initial="):
            run()

    @rj.recursive
    def g(w, node):
        return jnp.tanh(node.children.map(lambda c: g(w, c)).sum() @ w + node.data)

    w = jnp.ones((3, 3))
    t = rj.Tree(np.zeros(3, np.float32), [rj.Tree(np.ones(3, np.float32))])
    for run in (lambda: g.batch(w, rj.Forest.from_trees([t])), lambda: g(w, t)):
        with pytest.raises(TypeError, match=r"failed at a leaf after .*sum\(\).*scalar 0.*initial=jnp.zeros"):
            run()


def test_self_call_and_child_attribute():
    @rj.recursive
    def loop(node):
        return loop(node)

    with pytest.raises(TypeError, match="calls itself on its own node"):
        loop(rj.Tree(1.0))

    @rj.recursive
    def peek(node):
        return node.children.map(lambda c: c.data).sum() + node.data

    with pytest.raises(AttributeError, match="supports the recursive call"):
        peek.batch(rj.Forest.from_trees([rj.Tree(1.0, [rj.Tree(2.0)])]))


def test_too_many_arities_for_a_specialised_function():
    @rj.recursive
    def f(node):
        return node.data + sum(f(c) for c in node.children)

    # root with children of arities 1..17 under it
    children, n = [[]], 1
    for a in range(1, 18):
        node = n
        children[0].append(node)
        children.append(list(range(n + 1, n + 1 + a)))
        children += [[] for _ in range(a)]
        n += 1 + a
    forest = rj.Forest.from_children(children, np.ones(n, np.float32))
    with pytest.raises(ValueError, match=r"more than 16 distinct arities. Use node.children.map"):
        f.batch(forest)


def test_unhashable_static_argument():
    @rj.recursive
    def f(cfg, node):
        return node.data

    with pytest.raises(TypeError, match="non-array arguments must be hashable"):
        f.batch({1, 2}, rj.Forest.from_trees([rj.Tree(1.0)]))


def test_tree_objects_made_cyclic_by_mutation_are_rejected():
    a = rj.Tree(1.0)
    b = rj.Tree(2.0, [a])
    a.children = (b,)  # only possible by reassigning the attribute
    with pytest.raises(ValueError, match=r"cycle through nodes 0 -> 1 -> 0"):
        rj.Forest.from_trees([b])


def test_keyword_and_positional_arguments_bind_the_same():
    @rj.recursive
    def f(p, node, scale=1.0):
        return scale * node.data + sum(f(p, c, scale) for c in node.children)

    t = rj.Tree(1.0, [rj.Tree(2.0)])
    s = jnp.float32(2.0)
    forest = rj.Forest.from_trees([t])
    np.testing.assert_allclose(f.batch(jnp.float32(0), forest, scale=s), [6.0, 4.0])
    np.testing.assert_allclose(f(jnp.float32(0), t, scale=s), 6.0)

    @rj.recursive
    def g(p, node, scale=1.0):
        return scale * node.data + sum(g(p, c, scale + 1) for c in node.children)

    # the usage error is raised as is, not wrapped in an arity error
    with pytest.raises(TypeError, match="must pass the same non-node arguments"):
        g.batch(jnp.float32(0), forest, scale=s)
