"""Fuzzing the Forest constructors with hypothesis: clear error, or a valid Forest that runs right.

Every input, however broken (indices negative or out of range, self-loops, cycles, float or
bool or object indices, ragged or wrongly shaped data, NaN data, empty input, wrong ndim),
must give either a ValueError/TypeError whose message names the node or the field, or a
valid Forest: its plan keeps every invariant and its batched result equals plain Python
recursion over the same input read independently here. Never another exception type, a
crash or a hang.
"""

from __future__ import annotations

import contextlib
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recjax as rj
from models import node_subtrees
from test_properties import check_plan

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
# An error message must say where the problem is: a node, or which argument/field.
NAMES_WHERE = re.compile(r"node \d+|node data|\bparent\b|parent\[|child|children|data|empty forest|from_trees|cycle|tree")


@contextlib.contextmanager
def time_limit(seconds):
    """Fails instead of hanging (SIGALRM; the tests run in the main thread)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"a Forest constructor ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def construct(build):
    """``build()``'s Forest, or None when it raised a clear ValueError/TypeError."""
    try:
        with time_limit(20):
            return build()
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert msg and NAMES_WHERE.search(msg), f"unclear {type(e).__name__}: {msg!r}"
        return None
    # anything else (IndexError, AttributeError, a numpy internal error...) fails the test


# ---------------------------------------------------------------------- the reference


@rj.recursive
def total(node):
    """Sum of the node's data (whatever its schema) plus half its children's totals."""
    own = sum((jnp.sum(jnp.asarray(a).astype(jnp.float32)) for a in jax.tree.leaves(node.data)), jnp.float32(0))
    return own + 0.5 * node.children.map(total).sum()


def as_leaf_list(x):
    return isinstance(x, list)


def trees_from_spec(children, data, n):
    """``rj.Tree`` objects of the nodes, children first; fails on a cycle the Forest accepted."""
    rows = [jax.tree.map(lambda a: np.asarray(a)[i], data, is_leaf=as_leaf_list) for i in range(n)]
    built: dict[int, rj.Tree] = {}
    while len(built) < n:
        ready = [i for i in range(n) if i not in built and all(c in built for c in children[i])]
        assert ready, "the Forest accepted a graph with a cycle"
        for i in ready:
            built[i] = rj.Tree(rows[i], [built[c] for c in children[i]])
    return [built[i] for i in range(n)]


def check_valid(forest, node_trees):
    """A Forest that was accepted: its plan is sound and batched equals eager on every node."""
    n = forest.num_nodes
    assert n == len(node_trees)
    check_plan(forest.plan, forest.child_ptr, forest.child_idx, n)
    got = np.asarray(total.batch(forest))
    want = np.asarray([total(t) for t in node_trees])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # NaN matches NaN


# ---------------------------------------------------------------------- strategies
# Each strategy also says whether its input is valid (True/False), or None where that
# depends on numpy's type promotion (a bool among integer ids is read as 0 or 1).

SIGNED = ["list", "int8", "int16", "int32", "int64"]
DTYPES = SIGNED + ["uint8", "uint64", "float32", "float64", "bool", "object"]


def as_container(values, how):
    if how == "list":
        return list(values)
    if how == "object":
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out
    return np.asarray(values).astype(how)  # wraps -1 for unsigned, like a user's cast


def structure_ok(children, n):
    """Ids in range, and acyclic (so no self-loops and at least one root)."""
    if n == 0 or any(not (0 <= c < n) for kids in children for c in kids):
        return False
    height = [None] * n
    for _ in range(n + 1):
        for i in range(n):
            if height[i] is None and all(height[c] is not None for c in children[i]):
                height[i] = 1 + max((height[c] for c in children[i]), default=-1)
    return all(h is not None for h in height)


@st.composite
def array_data(draw, n):
    """Per-node data arrays for from_parents/from_children, valid or broken: (data, ok)."""
    kind = draw(
        st.sampled_from(["none", "vector", "matrix", "dict", "tuple", "nan", "int", "bool", "float16",
                         "bfloat16", "short", "long", "scalar", "strings", "ragged"])
    )
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    x = rng.normal(size=n).astype(np.float32)
    if kind == "nan" and n:
        x[draw(st.integers(0, n - 1))] = np.nan
    data = {
        "none": lambda: None,
        "vector": lambda: x.tolist(),  # a list is read as one array
        "matrix": lambda: {"x": rng.normal(size=(n, 2))},  # float64: stored as float32
        "dict": lambda: {"a": x, "b": {"c": np.arange(n, dtype=np.int32)}},
        "tuple": lambda: (x, np.ones((n, 1, 2), np.float32)),
        "nan": lambda: {"x": x},
        "int": lambda: {"x": rng.integers(-5, 5, size=n)},
        "bool": lambda: {"x": x > 0},
        "float16": lambda: {"x": x.astype(np.float16)},
        "bfloat16": lambda: {"x": x.astype(jnp.bfloat16)},
        "short": lambda: {"x": x[:-1]},
        "long": lambda: {"x": np.r_[x, 1.0]},
        "scalar": lambda: {"x": 1.0},
        "strings": lambda: {"x": np.asarray(["a"] * n)},
        "ragged": lambda: {"x": [[1.0] * (i % 2 + 1) for i in range(n)]},
    }[kind]()
    ok = kind not in ("short", "long", "scalar", "strings") and not (kind == "ragged" and n > 1)
    return data, ok


@st.composite
def parent_inputs(draw):
    n = draw(st.integers(0, 9))
    if draw(st.booleans()):  # a valid forest, numbered at random
        parent = [-1] + [draw(st.integers(-1, j - 1)) for j in range(1, n)]
        perm = draw(st.permutations(range(n)))
        new = [0] * n
        for j, p in enumerate(parent[:n]):
            new[perm[j]] = -1 if p < 0 else perm[p]
        parent = new
    else:  # anything: out of range, self-loops, cycles
        parent = draw(st.lists(st.integers(-3, n + 2), min_size=n, max_size=n))
    shape = draw(st.sampled_from(["1d"] * 6 + ["2d", "scalar", "ragged"]))
    how = draw(st.sampled_from(DTYPES))
    if shape == "2d":
        raw = [as_container(parent, how)]
    elif shape == "scalar":
        raw = parent[0] if parent else -1
    elif shape == "ragged":
        raw = [parent, [0]]
    else:
        raw = as_container(parent, how)
    data, data_ok = draw(array_data(n))
    children = [[j for j in range(n) if parent[j] == i] for i in range(n)]
    in_range = all(-1 <= p < n for p in parent)
    valid = shape == "1d" and how in SIGNED and in_range and structure_ok(children, n) and data_ok
    return raw, data, n, valid


@given(case=parent_inputs())
@settings(max_examples=150, **SETTINGS)
def test_from_parents_fuzz(case):
    raw, data, n, valid = case
    forest = construct(lambda: rj.Forest.from_parents(raw, data))
    assert (forest is not None) == valid, "a valid input was rejected" if valid else "an invalid input was accepted"
    if forest is None:
        return
    parent = np.asarray(raw)
    children = [[j for j in range(n) if parent[j] == i] for i in range(n)]
    assert forest.roots.tolist() == [i for i in range(n) if parent[i] < 0]
    check_valid(forest, trees_from_spec(children, data, n))


# (corruption, value, outcome): False is always invalid, "structure" is valid iff the
# resulting ids are in range and acyclic, None depends on numpy's promotion.
CORRUPTIONS = [
    ("append", 1.5, False), ("append", None, False), ("append", "1", False), ("append", [0], False),
    ("append", (), False), ("append", np.float32(0), False), ("append", np.int64(0), "structure"),
    ("append", 3, "structure"), ("append", True, None),
    ("replace", None, False), ("replace", 3, False), ("replace", np.int64(0), False),
    ("replace", "1", False), ("replace", 1.5, False), ("replace", [0], "structure"), ("replace", (), "structure"),
]


def _array(kids):
    try:
        return np.asarray(kids)
    except ValueError:  # ragged: what a user's np.asarray would refuse too
        out = np.empty(len(kids), dtype=object)
        out[:] = list(kids)
        return out


@st.composite
def children_inputs(draw):
    n = draw(st.integers(0, 9))
    if draw(st.booleans()):  # acyclic (edges to larger ids, then renumbered), maybe a DAG
        children = [draw(st.lists(st.integers(i + 1, n - 1), max_size=4)) if i < n - 1 else [] for i in range(n)]
        perm = draw(st.permutations(range(n)))
        new = [None] * n
        for i, kids in enumerate(children):
            new[perm[i]] = [perm[c] for c in kids]
        children = new
    else:  # anything: out of range, self-loops, cycles
        children = [draw(st.lists(st.integers(-2, n + 1), max_size=4)) for _ in range(n)]
    outcome = "structure"
    spec = children
    if n and draw(st.booleans()):  # corrupt one entry
        i = draw(st.integers(0, n - 1))
        how, bad, outcome = draw(st.sampled_from(CORRUPTIONS))
        new = children[i] + [bad] if how == "append" else bad
        children = children[:i] + [new] + children[i + 1 :]
        if outcome == "structure":
            spec = [[int(c) for c in k] for k in children]
    container = draw(st.sampled_from(["lists", "tuples", "arrays"]))
    if container == "tuples":
        children = tuple(tuple(k) if isinstance(k, list) else k for k in children)
    elif container == "arrays":
        children = [_array(k) if isinstance(k, list) else k for k in children]
    data, data_ok = draw(array_data(n))
    valid = None if outcome is None else (outcome == "structure" and structure_ok(spec, n) and data_ok)
    return children, data, n, valid


@given(case=children_inputs())
@settings(max_examples=150, **SETTINGS)
def test_from_children_fuzz(case):
    raw, data, n, valid = case
    forest = construct(lambda: rj.Forest.from_children(raw, data))
    if valid is not None:
        assert (forest is not None) == valid, "a valid input was rejected" if valid else "an invalid input was accepted"
    if forest is None:
        return
    children = [[int(c) for c in kids] for kids in raw]
    assert structure_ok(children, n)
    assert [forest.children(i).tolist() for i in range(n)] == children
    check_valid(forest, trees_from_spec(children, data, n))


@st.composite
def tree_inputs(draw):
    """Lists of rj.Tree (maybe shared, maybe mutated into cycles or bad children) or junk."""
    n = draw(st.integers(1, 9))
    parent = [-1] + [draw(st.integers(-1, j - 1)) for j in range(1, n)]
    schema = draw(st.sampled_from(["float", "dict", "vector", "none"]))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))

    def datum(i):
        v = float(rng.normal())
        return {"float": v, "dict": {"x": v, "k": i}, "vector": np.full(2, v, np.float32), "none": None}[schema]

    data = [datum(i) for i in range(n)]
    corrupt = draw(st.sampled_from(["none"] * 4 + ["nan", "int", "shape", "key", "string", "cycle", "self", "non_tree", "share"]))
    k = draw(st.integers(0, n - 1))
    if corrupt == "nan" and schema == "float":
        data[k] = float("nan")
    elif corrupt == "int":
        data[k] = 1 if schema == "float" else {"x": 1, "k": k}
    elif corrupt == "shape":
        data[k] = np.zeros(3, np.float32)
    elif corrupt == "key":
        data[k] = {"y": 1.0}
    elif corrupt == "string":
        data[k] = "text"
    nodes = [rj.Tree(d) for d in data]
    kids: list[list[rj.Tree]] = [[] for _ in range(n)]
    for j in range(n - 1, 0, -1):
        if parent[j] >= 0:
            kids[parent[j]].insert(0, nodes[j])
    if corrupt == "share" and n > 2:  # a shared subtree: a DAG, still valid
        kids[0].append(nodes[n - 1])
    for i in range(n):
        nodes[i].children = tuple(kids[i])  # mutation, as a user could do
    cycle = corrupt == "self" or (corrupt == "cycle" and parent[n - 1] >= 0)
    if corrupt == "cycle" and parent[n - 1] >= 0:  # its parent becomes a child of node n - 1
        nodes[n - 1].children += (nodes[parent[n - 1]],)
    elif corrupt == "self":
        nodes[k].children += (nodes[k],)
    elif corrupt == "non_tree":
        nodes[k].children += (1.0,)
    bad_schema = corrupt == "string" or (n > 1 and corrupt in ("int", "shape", "key"))
    roots = [nodes[i] for i in range(n) if parent[i] < 0]
    top = draw(st.sampled_from(["list"] * 5 + ["tree", "empty", "junk", "dup", "none"]))
    trees = {"tree": roots[0], "empty": [], "junk": roots + [1.0], "dup": roots + roots[:1], "none": None}.get(top, roots)
    valid = top in ("list", "dup") and not cycle and corrupt != "non_tree" and not bad_schema
    return trees, valid


@given(case=tree_inputs())
@settings(max_examples=150, **SETTINGS)
def test_from_trees_fuzz(case):
    trees, valid = case
    forest = construct(lambda: rj.Forest.from_trees(trees))
    assert (forest is not None) == valid, "a valid input was rejected" if valid else "an invalid input was accepted"
    if forest is not None:
        check_valid(forest, node_subtrees(trees))
