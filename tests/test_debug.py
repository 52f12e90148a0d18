"""recjax.debug: printed templates, the plan summary and the plan picture."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recjax as rj
from recjax import debug


@rj.recursive
def total(w, node):
    return w * node.data + node.children.map(lambda c: total(w, c)).sum()


@rj.recursive
def per_arity(p, node, scale):
    if node.is_leaf:
        return {"h": jnp.tanh(p["emb"][node.data["token"]]) * scale}
    hs = [per_arity(p, c, scale=scale)["h"] for c in node.children]
    return {"h": jnp.tanh(sum(hs) @ p["W"] + len(hs))}


def small_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"emb": jax.random.normal(k1, (6, 3)), "W": jax.random.normal(k2, (3, 3))}


def mixed_arity_forest():
    def leaf(t):
        return rj.Tree({"token": np.int32(t)})

    trees = [
        rj.Tree({"token": np.int32(0)}, [leaf(1), rj.Tree({"token": np.int32(2)}, [leaf(3)])]),
        rj.Tree({"token": np.int32(4)}, [leaf(1), leaf(2), leaf(5)]),
    ]
    return rj.Forest.from_trees(trees)


def sections(text):
    """The printed templates: {header line: body}."""
    parts = re.split(r"^== (.*)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_print_templates_map(capsys):
    forest = rj.Forest.from_trees([rj.Tree(1.0, [rj.Tree(2.0), rj.Tree(3.0, [rj.Tree(4.0)])])])
    debug.print_templates(total, jnp.float32(2.0), forest)
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert first.startswith("total over Forest(num_nodes=4") and "2 templates" in first
    assert "float32[]" in first
    got = sections(text)
    assert list(got) == [
        "leaf (signature 0)",
        'internal node of any arity (signature "map", node.children.map)',
    ]
    leaf, any_arity = got.values()
    # in the template's argument order: arguments, output buffers, data, the row's context
    assert "inputs: w float32[], total's outputs float32[18], node.data float32[], row int32[]\n" in leaf
    assert "mul" in leaf and "custom_vmap_call" not in leaf
    # shown for a node owning as many edge slots as the forest's largest arity (2)
    assert "edges.rows int32[2], edges.segment int32[2], edges.position int32[2]\n" in any_arity
    assert "custom_vmap_call" in any_arity


def test_print_templates_per_arity_names_inputs(capsys):
    p = small_params()
    forest = mixed_arity_forest()
    debug.print_templates(per_arity, p, forest, scale=jnp.float32(0.5))
    text = capsys.readouterr().out
    got = sections(text)
    assert list(got) == [
        "leaf (signature 0)",
        "internal node with 1 child (signature 1)",
        "internal node with 2 children (signature 2)",
        "internal node with 3 children (signature 3)",
    ]
    inputs = (
        "inputs: p['W'] float32[3, 3], p['emb'] float32[6, 3], scale float32[], "
        "per_arity's outputs['h'] float32["
    )
    for body in got.values():
        assert body.startswith("\n" + inputs)
        assert "node.data['token'] int32[]" in body
    body2 = got["internal node with 2 children (signature 2)"]
    assert "node.data['token'] int32[], children's rows int32[2], row int32[]\n" in body2
    # the jaxpr takes the inputs in the order listed: 3 arguments, the output buffer,
    # the data, the children's rows and the own row
    lambda_line = next(line for line in body2.splitlines() if line.startswith("{ lambda"))
    assert lambda_line.count(":") == 7


def test_print_templates_matches_batch_and_changes_nothing(capsys):
    p = small_params()
    forest = mixed_arity_forest()
    scale = jnp.float32(0.5)
    before = per_arity.batch(p, forest, scale=scale)["h"]
    traces = per_arity._num_traces
    debug.print_templates(per_arity, p, forest, scale=scale)
    capsys.readouterr()
    assert per_arity._num_traces == traces  # nothing executed or compiled
    after = per_arity.batch(p, forest, scale=scale)["h"]
    np.testing.assert_array_equal(before, after)
    assert per_arity._num_traces == traces  # the cached program is still used


def test_print_templates_static_argument(capsys):
    @rj.recursive
    def count(node, unit):
        return unit * jnp.ones(()) + node.children.map(lambda c: count(c, unit)).sum()

    debug.print_templates(count, rj.Forest.from_parents([-1, 0, 0]), 2.0)
    text = capsys.readouterr().out
    # a non-array argument is a compile-time constant: not an input of the templates
    assert "node.data" not in text  # no data either
    leaf = sections(text)["leaf (signature 0)"]
    assert leaf.startswith("\ninputs: count's outputs float32[")
    assert "], row int32[]\n" in leaf


def test_print_templates_errors():
    forest = rj.Forest.from_parents([-1, 0])
    with pytest.raises(TypeError, match="@recjax.recursive"):
        debug.print_templates(lambda node: node, forest)
    with pytest.raises(TypeError, match="takes a Forest, not a Tree"):
        debug.print_templates(total, jnp.float32(1.0), rj.Tree(1.0))

    @rj.recursive
    def branchy(node):
        if node.data > 0:
            return node.data
        return node.data

    with pytest.raises(TypeError, match="branches on traced data"):
        debug.print_templates(branchy, rj.Forest.from_parents([-1, 0], [1.0, 2.0]))


def parse_summary(text):
    lines = text.splitlines()
    rows = {}
    for line in lines[2:-1]:
        cells = line.split()
        name = " ".join(cells[:2]) if cells[0] == "phase" else cells[0]
        rest = cells[2:] if cells[0] == "phase" else cells[1:]
        rows[name] = rest
    return lines, rows


def test_plan_summary_exact():
    forest = rj.Forest.from_parents([-1, 0, 0, 2, 2])
    edges = forest.plan.key.phases[0].edges
    assert debug.plan_summary(forest) == "\n".join([
        "Forest(num_nodes=5, num_roots=1, steps=2): 5 nodes (3 leaves, 2 internal), height 2",
        "part     levels  width  steps  rows  nodes  padding",
        "leaves   0           -      -     3      3     0.0%",
        "phase 1  1-2         8      2    16      2    87.5%",
        "total    0-2                2    19      5    73.7%",
        f"2 sequential steps after the leaves; 6 node rows (bucket); edge slots per step: {edges}",
    ])


@pytest.mark.parametrize("seed", range(6))
def test_plan_summary_consistent(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    parent = np.array([-1] + [int(rng.integers(max(0, i - 40), i)) for i in range(1, n)])
    forest = rj.Forest.from_parents(parent)
    if seed % 2:
        forest = forest.padded()
    key = forest.plan.key
    lines, rows = parse_summary(debug.plan_summary(forest))
    assert len(rows) == 2 + len(key.phases)
    leaves = int(np.count_nonzero(np.bincount(parent[parent >= 0], minlength=n) == 0))
    assert rows["leaves"][3:5] == [str(key.num_leaf_rows), str(leaves)]
    phase_rows = phase_nodes = 0
    for i, pk in enumerate(key.phases, 1):
        levels, width, steps, nrows, nodes, _ = rows[f"phase {i}"]
        assert (int(width), int(steps), int(nrows)) == (pk.width, pk.steps, pk.width * pk.steps)
        phase_rows += int(nrows)
        phase_nodes += int(nodes)
    assert phase_nodes == n - leaves
    levels, steps, nrows, nodes, pct = rows["total"]
    height = int(forest.plan.height.max())
    assert levels == f"0-{height}"
    assert (int(steps), int(nrows), int(nodes)) == (forest.plan.num_steps, key.num_buffer_rows, n)
    assert int(nrows) == key.num_leaf_rows + phase_rows
    assert float(pct.rstrip("%")) == pytest.approx(100 * (1 - n / int(nrows)), abs=0.05)
    assert ("padding nodes (padded)" in lines[0]) == (forest.num_nodes > n)
    assert lines[-1].endswith("edge slots per step: " + ", ".join(str(p.edges) for p in key.phases))


def test_plan_summary_needs_host_plan():
    forest = rj.Forest.from_parents([-1, 0])
    leaves, treedef = jax.tree.flatten(forest)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(ValueError, match="host plan"):
        debug.plan_summary(rebuilt)


def test_draw_plan():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forest = rj.Forest.from_parents([-1, 0, 0, 2, 2, -1, 5])
    try:
        ax = debug.draw_plan(forest)
        assert "7 nodes" in ax.get_title()
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "leaves"
        assert len(ax.patches) >= 1 + forest.plan.num_steps  # a bar segment per column at least
        _, own = plt.subplots()
        assert debug.draw_plan(forest, ax=own) is own
    finally:
        plt.close("all")


def test_debug_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, recjax.debug; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
