"""Every entry of docs/errors.md is triggered here, and the doc and the code cannot drift.

``CASES`` maps each catalogue id to a trigger, the exception type and a pattern that the
message must match; every pattern includes what names the node or the field. Two more
tests parse docs/errors.md: its ids are exactly the ids of ``CASES``, and every ``raise``
in the public modules carries the message phrase of some entry (and every phrase is still
raised somewhere).
"""

from __future__ import annotations

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recjax as rj

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
MODULES = ["_tree.py", "_forest.py", "_planner.py", "_tracer.py", "_executor.py"]


# ---------------------------------------------------------------------- triggers


def forest(n=3):
    return rj.Forest.from_parents([-1] + [0] * (n - 1), np.ones(n, np.float32))


@rj.recursive
def add(node):
    return node.data + node.children.map(add).sum()


def branch_on_data():
    @rj.recursive
    def f(node):
        return node.data if node.data > 0 else -node.data

    f.batch(forest())


def empty_sum_shape():
    @rj.recursive
    def f(w, node):
        return jnp.tanh(node.children.map(lambda c: f(w, c)).sum() @ w + node.data)

    f(jnp.ones((2, 2)), rj.Tree(np.zeros(2, np.float32)))


def empty_reduction():
    @rj.recursive
    def f(node):
        return node.data + node.children.map(f).max()

    f.batch(forest())


def ragged_len():
    @rj.recursive
    def g(node):
        return node.data + sum(node.children.map(g))  # iterates the mapped values

    with pytest.raises(TypeError, match=r"children.map\(...\) cannot be iterated"):
        g(rj.Tree(1.0, [rj.Tree(2.0)]))

    @rj.recursive
    def f(node):
        return node.data + len(node.children.map(f))

    f.batch(forest())


def child_attribute():
    @rj.recursive
    def f(node):
        return node.data + node.children.map(lambda c: c.data).sum()

    with pytest.raises(AttributeError, match=r"`child.data` is not available"):
        f(rj.Tree(1.0, [rj.Tree(2.0)]))  # plain recursion refuses it the same way
    f.batch(forest())


def self_call():
    @rj.recursive
    def f(node):
        return f(node)

    f(rj.Tree(1.0))


def same_node_cycle():
    @rj.recursive
    def g(node):
        return f(node) * 2.0

    @rj.recursive
    def f(node):
        return g(node) + 1.0

    f.batch(forest())


def mixed_direction_cycle():
    @rj.recursive
    def up(node):
        return node.data + node.children.map(down).sum()

    @rj.recursive
    def down(node):
        return node.data if node.is_root else up(node.parent)

    up.batch(forest())


def computed_argument():
    @rj.recursive
    def inner(w, node):
        return w * node.data

    @rj.recursive
    def outer(w, node):
        return inner(w * 2, node)

    outer.batch(jnp.float32(1), forest())


def different_arguments():
    @rj.recursive
    def inner(w, node):
        return w * node.data

    @rj.recursive
    def outer(w, v, node):
        return inner(w, node) + inner(v, node)

    outer.batch(jnp.float32(1), jnp.float32(2), forest())


def children_in_top_down():
    @rj.recursive
    def f(node):
        return node.data if node.is_root else f(node.parent) + len(node.children)

    f.batch(forest())


def top_down_dag():
    @rj.recursive
    def depth(node):
        return 0.0 if node.is_root else depth(node.parent) + 1

    depth.batch(rj.Forest.from_children([[1, 2], [3], [3], []]))


def index_dag():
    @rj.recursive
    def f(node):
        return node.index + node.children.map(f).sum()

    f.batch(rj.Forest.from_children([[1, 2], [3], [3], []]))


def pool_shared():
    t = rj.Tree(1.0, [rj.Tree(2.0)])
    rj.Forest.from_trees([t, t]).pool(jnp.ones(2))


def kind_without_kinds():
    @rj.recursive
    def f(node):
        return node.data * (node.kind == "Add")

    f.batch(forest())


def kind_top_down():
    @rj.recursive
    def f(node):
        return node.data if node.is_root else f(node.parent) * (node.kind == "Add")

    f.batch(rj.Forest.from_parents([-1, 0], [1.0, 2.0], kind=["Add", "Num"], kinds=["Add", "Num"]))


def stale_node():
    kept = []

    @rj.recursive
    def f(node):
        kept.append(node)
        return node.data

    f.batch(forest())
    f(kept[0])


def unhashable_static():
    @rj.recursive
    def f(cfg, node):
        return node.data

    f.batch({1, 2}, forest())


def too_many_arities():
    @rj.recursive
    def f(node):
        return node.data + sum(f(c) for c in node.children)

    children, n = [[]], 1
    for a in range(1, 18):  # children of arities 1..17 under one root
        children[0].append(n)
        children.append(list(range(n + 1, n + 1 + a)))
        children += [[] for _ in range(a)]
        n += 1 + a
    f.batch(rj.Forest.from_children(children, np.ones(n, np.float32)))


def unhandled_arity():
    @rj.recursive
    def f(node):
        if node.is_leaf:
            return node.data
        left, right = [f(c) for c in node.children]
        return left + right

    f.batch(rj.Forest.from_children([[1, 2], [], [3, 4, 5], [], [], []], np.ones(6, np.float32)))


def output_mismatch():
    @rj.recursive
    def f(node):
        if node.is_leaf:
            return node.data
        return node.data, node.children.map(f).sum()

    f.batch(forest())


def weak_scalar_output():
    @rj.recursive
    def f(node):
        if node.is_leaf:
            return 0.5
        return node.children.map(lambda c: f(c) * node.data.astype(jnp.float16)).sum()

    f.batch(forest())


def shard_map_closure():
    from jax.sharding import PartitionSpec as P

    w = jnp.ones((2, 2))
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def step(w, data):
        @rj.recursive
        def f(node):  # w is closed over, not an argument
            if node.is_leaf:
                return node.data @ w
            return jnp.tanh(sum(f(c) for c in node.children) @ w)

        fo = rj.Forest.from_children([[1, 2], [3], [], []], np.ones((4, 2), np.float32))
        fo = jax.tree.map(lambda a: a + 0 * data[0, 0].astype(a.dtype), fo)  # per device
        return jnp.sum(f.batch(fo))

    jax.shard_map(jax.grad(step), mesh=mesh, in_specs=(P(), P("d")), out_specs=P())(w, jnp.ones((1, 1)))


def stacked_forest():
    parts = rj.Forest.pad_all([forest(3), forest(2)])
    add.batch(jax.tree.map(lambda *a: np.stack(a), *parts))


def changed_arguments():
    @rj.recursive
    def f(depth, node):
        return depth + node.children.map(lambda c: f(depth + 1, c)).sum()

    f(jnp.float32(0), rj.Tree(0.0, [rj.Tree(0.0)]))


def non_array_output():
    @rj.recursive
    def f(node):
        return "text"

    f.batch(forest())


def child_not_tree_by_mutation():
    t = rj.Tree(1.0, [rj.Tree(2.0)])
    t.children = (rj.Tree(2.0), "leaf")
    rj.Forest.from_trees([t])


def children_not_sequence():
    t = rj.Tree(1.0, [rj.Tree(2.0)])
    t.children = None
    rj.Forest.from_trees([t])


def cycle_by_mutation():
    a = rj.Tree(1.0, [rj.Tree(2.0)])
    a.children[0].children = (a,)
    rj.Forest.from_trees([rj.Tree(0.0, [a])])


def inside_jit(fn):
    return lambda: jax.jit(fn)(forest())


# id -> (trigger, exception type, pattern the message must match: names the node or field)
CASES = {
    "tree-child-not-tree": (lambda: rj.Tree(1.0, [2.0]), TypeError, r"child 0 is a float"),
    "tree-children-not-list": (lambda: rj.Tree(1.0, rj.Tree(2.0)), TypeError, r"list of Tree objects; got a Tree\. Write rj\.Tree\(data, \[child\]\)"),
    "tree-kind-unhashable": (lambda: rj.Tree(1.0, kind=["Call"]), TypeError, r"Tree kind must be hashable, a str such as 'Call' \(or None\); got a list"),
    "trees-single-tree": (lambda: rj.Forest.from_trees(rj.Tree(1.0)), TypeError, r"takes a list of trees; wrap one tree as \[tree\]"),
    "trees-not-iterable": (lambda: rj.Forest.from_trees(None), TypeError, r"from_trees takes a list of trees; got a NoneType"),
    "trees-empty": (lambda: rj.Forest.from_trees([]), ValueError, r"empty forest: Forest.from_trees got no trees"),
    "trees-element-not-tree": (lambda: rj.Forest.from_trees([rj.Tree(1.0), 2.0]), TypeError, r"element 1 is a float"),
    "trees-child-not-tree": (child_not_tree_by_mutation, TypeError, r"node 0 has a child that is a str"),
    "trees-children-not-sequence": (children_not_sequence, TypeError, r"node 0's children are a NoneType"),
    "data-schema-mismatch": (
        lambda: rj.Forest.from_trees([rj.Tree({"x": 1.0}), rj.Tree({"x": 2})]),
        ValueError,
        r"node 1: data\['x'\] has shape \(\) and dtype int64; node 0 has shape \(\) and dtype float64",
    ),
    "data-not-numeric": (lambda: rj.Forest.from_trees([rj.Tree({"w": "text"})]), TypeError, r"data\['w'\] has dtype <U4; node data must be numeric"),
    "data-narrowing": (
        lambda: rj.Forest.from_parents([-1, 0], {"id": np.array([1, 2**32 + 7])}),
        ValueError,
        r"data\['id'\] at node 1 holds 4294967303, which does not fit int32",
    ),
    "data-int-outside-int64": (
        lambda: rj.Forest.from_trees([rj.Tree(1, [rj.Tree(7)]), rj.Tree(2**63)]),
        ValueError,
        r"data at node 2 is the Python int 9223372036854775808, outside int64",
    ),
    "parents-ragged": (lambda: rj.Forest.from_parents([[-1], [0, 0]]), ValueError, r"parent must be a 1-D integer array"),
    "parents-ndim": (lambda: rj.Forest.from_parents([[-1, 0]]), ValueError, r"parent must be a 1-D array; got shape \(1, 2\)"),
    "parents-empty": (lambda: rj.Forest.from_parents([]), ValueError, r"empty forest: the parent array has no nodes"),
    "parents-dtype": (lambda: rj.Forest.from_parents([-1.0, 0.0]), TypeError, r"parent must be an integer array; got dtype float64"),
    "parents-out-of-range": (lambda: rj.Forest.from_parents([-1, 5, 0]), ValueError, r"parent\[1\] = 5 is out of range for 3 nodes"),
    "parents-self": (lambda: rj.Forest.from_parents([-1, 1]), ValueError, r"node 1 is its own parent"),
    "children-not-iterable": (lambda: rj.Forest.from_children(None), TypeError, r"children must be a list of lists of node ids; got a NoneType"),
    "children-empty": (lambda: rj.Forest.from_children([]), ValueError, r"empty forest: the children list has no nodes"),
    "children-not-lists": (lambda: rj.Forest.from_children([[1], 5]), TypeError, r"children must be a list of lists of node ids \(object of type 'int'"),
    "children-id-dtype": (lambda: rj.Forest.from_children([[1], [0.5], []]), TypeError, r"child ids must be integers; node 1 has child 0.5"),
    "children-out-of-range": (lambda: rj.Forest.from_children([[1], [7], []]), ValueError, r"child id 7 of node 1 is out of range: the forest has 3 nodes"),
    "children-self": (lambda: rj.Forest.from_children([[1], [1]]), ValueError, r"node 1 is its own child"),
    "children-no-root": (lambda: rj.Forest.from_children([[1], [0]]), ValueError, r"no root \(every node is somebody's child\)"),
    "data-ragged": (lambda: rj.Forest.from_parents([-1, 0], {"x": [[1.0, 2.0], [1.0]]}), ValueError, r"data\['x'\] is not a rectangular array"),
    "data-leading-axis": (lambda: rj.Forest.from_parents([-1, 0, 0], {"x": np.zeros(2)}), ValueError, r"data\['x'\] has shape \(2,\); its leading axis must be the number of nodes \(3\)"),
    "forest-cycle": (lambda: rj.Forest.from_children([[1], [2], [3], [1]]), ValueError, r"cycle through nodes 1 -> 2 -> 3 -> 1: node 1 is its own descendant"),
    "padded-inside-jit": (inside_jit(lambda f: f.padded()), ValueError, r"Forest.padded\(\) needs the host arrays"),
    "padded-too-few-roots": (lambda: forest().padded(num_roots=0), ValueError, r"num_roots=0 is less than the 1 roots"),
    "pad-all-not-forest": (lambda: rj.Forest.pad_all([forest(), 3]), TypeError, r"Forest.pad_all takes a list of Forests; item 1 is a int"),
    "children-index": (lambda: forest().children(-1), IndexError, r"Forest.children: no node -1; the nodes are 0 to 2"),
    "pad-all-empty": (lambda: rj.Forest.pad_all([]), ValueError, r"Forest.pad_all got no forests"),
    "plan-rebuilt": (inside_jit(lambda f: f.plan.num_steps), ValueError, r"rebuilt from its pytree leaves; its host plan is gone"),
    "children-inside-jit": (inside_jit(lambda f: f.children(0)), ValueError, r"children arrays of a Forest are not available inside jit"),
    "traced-branch": (branch_on_data, TypeError, r"f branches on traced data at a leaf.*`jnp.where` or `lax.cond`"),
    "empty-sum-shape": (empty_sum_shape, TypeError, r"f failed at a leaf after .*sum\(\)` over no children.*initial=jnp.zeros"),
    "ragged-len": (ragged_len, TypeError, r"children.map\(...\) has no len\(\): in a batched program it holds a different number"),
    "empty-reduction": (empty_reduction, ValueError, r"max\(\) at a node without children.*`if node.is_leaf: ...`.*initial="),
    "child-attribute": (child_attribute, AttributeError, r"`child.data` is not available"),
    "node-argument-count": (lambda: add.batch(forest(), forest()), TypeError, r"add\(...\) got 2 node arguments; pass exactly one rj.Forest"),
    "call-on-forest": (lambda: add(forest()), TypeError, r"add\(...\) got a Forest; use add.batch"),
    "self-call": (self_call, TypeError, r"f calls itself on its own node"),
    "same-node-cycle": (same_node_cycle, TypeError, r"f reads its own output at a leaf through another function it calls there: functions that call each other on the same node"),
    "mixed-direction-cycle": (mixed_direction_cycle, TypeError, r"recursive functions up, down call each other but some run bottom-up"),
    "computed-argument": (computed_argument, TypeError, r"inner is called inside another recursive function with an array argument computed there"),
    "different-arguments": (different_arguments, TypeError, r"every call of inner in one batched program must pass the same non-node arguments"),
    "children-in-top-down": (children_in_top_down, TypeError, r"f reads node.parent or node.is_root, which makes it top-down"),
    "top-down-dag": (top_down_dag, ValueError, r"top-down function\(s\) depth need one parent per node, but node 3"),
    "pool-shared": (pool_shared, ValueError, r"Forest.pool: node 0 belongs to several trees"),
    "index-dag": (index_dag, ValueError, r"node.index \(a node's position among its parent's children\) needs one parent per node, but node 3"),
    "stale-node": (stale_node, TypeError, r"f was called on a node that belongs to no running call"),
    "kind-length": (lambda: rj.Forest.from_parents([-1, 0], kind=["Add"], kinds=["Add"]), ValueError, r"kind has 1 entries for 2 nodes"),
    "kinds-missing": (lambda: rj.Forest.from_trees([rj.Tree(1.0, kind="Add")]), ValueError, r"node 0 has kind 'Add' but no kinds= vocabulary was given"),
    "kinds-duplicate": (lambda: rj.Forest.from_trees([rj.Tree(1.0, kind="Add")], kinds=["Add", "Add"]), ValueError, r"kinds= lists a kind twice"),
    "kind-unknown": (lambda: rj.Forest.from_trees([rj.Tree(1.0, [rj.Tree(2.0, kind="Sub")], kind="Add")], kinds=["Add"]), ValueError, r"node 1 has kind 'Sub', which is not in the kinds= vocabulary"),
    "pad-kinds-mismatch": (lambda: rj.Forest.pad_all([rj.Forest.from_trees([rj.Tree(1.0, kind="A")], kinds=["A"]), rj.Forest.from_trees([rj.Tree(1.0, kind="A")], kinds=["A", "B"])]), ValueError, r"Forest.pad_all: the forests have different kind vocabularies"),
    "kind-without-kinds": (kind_without_kinds, TypeError, r"f reads node.kind, but the forest has no kinds"),
    "kind-top-down": (kind_top_down, TypeError, r"f reads node.kind in a top-down function"),
    "pool-op": (lambda: forest().pool(jnp.ones(3), "median"), ValueError, r"Forest.pool: op must be 'sum', 'mean' or 'max', not 'median'"),
    "pool-shape": (lambda: forest().pool(jnp.ones(4)), ValueError, r"Forest.pool: values need a leading axis of num_nodes = 3, got shape \(4,\)"),
    "batch-on-tree": (lambda: add.batch(rj.Tree(1.0)), TypeError, r"add.batch\(...\) takes a Forest, not a Tree"),
    "unhashable-static": (unhashable_static, TypeError, r"f.batch: non-array arguments must be hashable"),
    "too-many-arities": (too_many_arities, ValueError, r"f iterates, indexes or measures node.children.*more than 16 distinct arities"),
    "unhandled-arity": (unhandled_arity, ValueError, r"f cannot handle a node with 3 children \(node 2 of the forest"),
    "output-mismatch": (output_mismatch, TypeError, r"f returns .* at an internal node but float32\[\] at a leaf"),
    "shard-map-closure": (shard_map_closure, TypeError, r"closes over a traced float32\[2, 2\] array that is the same on every device of shard_map"),
    "stacked-forest": (stacked_forest, TypeError, r"add.batch: this Forest holds 2 forests stacked on a leading axis \(node_mask has shape \(2, 3\)\)"),
    "weak-scalar-output": (weak_scalar_output, TypeError, r"f returns float16\[\] at an internal node when .* at a leaf"),
    "changed-arguments": (changed_arguments, TypeError, r"a recursive call of f must pass the same non-node arguments"),
    # recjax's own check (`f must return a pytree of arrays`) is never reached: jax.vmap
    # rejects the output first, with a message that does not name the function.
    "non-array-output": (non_array_output, TypeError, r"f must return a pytree of arrays; at a leaf it returned a leaf 'text'"),
}


@pytest.mark.parametrize("entry", sorted(CASES))
def test_catalogue_entry(entry):
    if entry == "shard-map-closure" and jax.__version_info__ < (0, 10):
        pytest.skip("shard_map needs JAX 0.10 here (README, Several devices)")
    trigger, exc_type, pattern = CASES[entry]
    with pytest.raises(exc_type) as info:
        trigger()
    assert type(info.value) is exc_type or issubclass(type(info.value), exc_type)
    assert re.search(pattern, str(info.value), re.S), f"{entry}: {info.value}"


def test_non_array_output_names_the_function():
    with pytest.raises(TypeError) as info:
        non_array_output()
    assert "f must return a pytree of arrays" in str(info.value)


# ---------------------------------------------------------------------- the doc cannot drift

ENTRY = re.compile(r"^### `([a-z0-9-]+)`\s*$", re.M)
PHRASE = re.compile(r"^- \*\*Source:\*\* `recjax/(\w+\.py)`, phrase `([^`]+)`", re.M)


def doc_entries():
    """``{id: (module, phrase)}`` parsed from docs/errors.md."""
    text = DOC.read_text()
    starts = [(m.group(1), m.start()) for m in ENTRY.finditer(text)]
    entries = {}
    for (name, start), (_, end) in zip(starts, starts[1:] + [(None, len(text))]):
        src = PHRASE.findall(text[start:end])
        assert len(src) == 1, f"entry {name}: needs exactly one '- **Source:** `recjax/<module>`, phrase `...`' line"
        assert name not in entries, f"duplicate entry {name}"
        entries[name] = src[0]
    return entries


def test_doc_entries_equal_the_tested_cases():
    ids = set(doc_entries())
    assert ids, "no entries parsed from docs/errors.md"
    assert ids - set(CASES) == set(), "documented but not tested"
    assert set(CASES) - ids == set(), "tested but not documented"


def raise_texts(module):
    """The literal text of every user-facing ``raise`` in a module (one string per raise)."""
    tree = ast.parse((ROOT / "recjax" / module).read_text())
    strings = lambda node: " ".join(  # noqa: E731
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )
    # module-level constants and helper functions whose strings a raise may use
    named = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            named[node.targets[0].id] = strings(node.value)
        elif isinstance(node, ast.FunctionDef):
            named[node.name] = strings(node)
    texts = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in ("_NeedsArity", "_NeedsKind", "_NeedsLeaf", "_IsTopDown"):
            # internal signals of the tracer, never escape
            continue
        text = strings(node.exc) + " " + " ".join(
            named[n.id] for n in ast.walk(node.exc) if isinstance(n, ast.Name) and n.id in named
        )
        texts.append((node.lineno, text))
    return texts


def test_every_raise_is_catalogued_and_every_phrase_is_raised():
    entries = doc_entries()
    for module in MODULES:
        phrases = [phrase for mod, phrase in entries.values() if mod == module]
        texts = raise_texts(module)
        for lineno, text in texts:
            assert any(p in text for p in phrases), (
                f"recjax/{module}:{lineno} raises an error that docs/errors.md does not list; "
                f"add an entry (and a case in CASES): {text[:120]!r}"
            )
        for phrase in phrases:
            assert any(phrase in text for _, text in texts), f"docs/errors.md: phrase {phrase!r} is no longer raised in {module}"
