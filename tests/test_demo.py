"""The calculator demo: shipped data, parser, batching, and an end-to-end run."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import recjax as rj
from recjax import demo


def _python_value(expr: str) -> int:
    """Independent evaluator: prefix bracket form -> Python infix, then ``eval``."""
    tokens = expr.replace("(", " ( ").replace(")", " ) ").split()
    out, ops = [], []
    for tok in tokens:  # "(op a b)" -> "(a op b)": emit op between the two operands
        if tok == "(":
            ops.append(None)
            out.append("(")
        elif tok in ("+", "-", "*"):
            ops[-1] = [tok, 0]
        elif tok == ")":
            ops.pop()
            out.append(")")
            if ops:
                _operand_done(ops, out)
        else:
            assert tok.isdigit() and len(tok) == 1, tok
            out.append(tok)
            if ops:
                _operand_done(ops, out)
    return eval(" ".join(out), {"__builtins__": {}})


def _operand_done(ops, out):
    ops[-1][1] += 1
    if ops[-1][1] == 1:
        out.append(ops[-1][0])


def _lines(name):
    return demo.read_data_file(name).splitlines()


# ---------------------------------------------------------------------- shipped data


def test_shipped_files_match_the_generator():
    n = demo.TRAIN_SIZE + demo.TEST_SIZE
    lines = demo.generate_expressions(n, demo.MAX_DEPTH, demo.DATA_SEED)
    assert _lines(demo.TRAIN_FILE) == lines[: demo.TRAIN_SIZE]
    assert _lines(demo.TEST_FILE) == lines[demo.TRAIN_SIZE :]
    # Exact file bytes: one line each, newline-terminated.
    test_text = "".join(x + "\n" for x in lines[demo.TRAIN_SIZE :])
    assert demo.read_data_file(demo.TEST_FILE) == test_text


def test_shipped_data_is_distinct_and_in_range():
    train, test = _lines(demo.TRAIN_FILE), _lines(demo.TEST_FILE)
    exprs = [line.split("\t")[1] for line in train + test]
    assert len(set(exprs)) == len(exprs)  # no test expression appears in training
    depths = {demo.tree_depth(demo.parse_expression(e)) for e in exprs[::50]}
    assert depths <= set(range(1, demo.MAX_DEPTH + 1)) and demo.MAX_DEPTH in depths


def test_generator_rejects_impossible_requests():
    assert len(demo.generate_expressions(300, 1, seed=0)) == 300  # every depth-1 expression
    with pytest.raises(ValueError, match="only 300 distinct"):
        demo.generate_expressions(301, 1, seed=0)


def test_generator_is_seeded():
    a = demo.generate_expressions(20, 3, seed=5)
    assert a == demo.generate_expressions(20, 3, seed=5)
    assert a != demo.generate_expressions(20, 3, seed=6)
    assert all(_python_value(line.split("\t")[1]) == int(line.split("\t")[0]) for line in a)


# ---------------------------------------------------------------------- parser


@pytest.mark.parametrize("name", [demo.TRAIN_FILE, demo.TEST_FILE])
def test_parser_round_trips_and_labels_are_right(name):
    lines = _lines(name)[:60]
    trees, labels = demo.parse_lines("\n".join(lines))
    assert len(trees) == len(lines)
    for line, tree, label in zip(lines, trees, labels):
        value, expr = line.split("\t")
        assert demo.expression_to_string(tree) == expr
        assert _python_value(expr) == int(value) == demo.evaluate_tree(tree)
        assert label == int(value) % 10
        assert 0 <= label < 10


def test_parser_tokens_and_shape():
    t = demo.parse_expression("(- 2 (* 5 9))")
    assert t.data == {"token": demo.TOKEN_ID["-"]} and len(t.children) == 2
    left, right = t.children
    assert left.is_leaf and left.data == {"token": 2}
    assert right.data == {"token": demo.TOKEN_ID["*"]}
    assert [c.data["token"] for c in right.children] == [5, 9]
    trees, labels = demo.parse_lines("-43\t(- 2 (* 5 9))\n")
    assert labels.tolist() == [7]  # -43 % 10 == 7 (Python semantics)
    assert len(demo.VOCAB) == 13


def test_parser_is_iterative():
    depth = 3000  # far beyond Python's recursion limit
    expr = "(+ 1 " * depth + "1" + ")" * depth
    tree = demo.parse_expression(expr)
    assert demo.evaluate_tree(tree) == depth + 1
    assert demo.expression_to_string(tree) == expr
    assert demo.tree_depth(tree) == depth


@pytest.mark.parametrize(
    "bad",
    ["", "(+ 1)", "(+ 1 2 3)", "(1 + 2)", "(+ 1 2", "+ 1 2", "(+ 1 2))", "(/ 1 2)",
     "(+ 12 3)", "3 4", "()", "(+ (3) 4)"],
)
def test_parser_rejects_malformed(bad):
    with pytest.raises(ValueError, match="cannot parse"):
        demo.parse_expression(bad)


def test_wrong_label_is_rejected():
    with pytest.raises(ValueError, match="evaluates to 11"):
        demo.parse_lines("7\t(+ 3 (* 2 4))")


# ---------------------------------------------------------------------- batching


def test_batches_share_one_program_and_keep_labels():
    trees, labels = demo.load_dataset(demo.TRAIN_FILE, 300)
    batches = demo.make_batches(trees, labels, 32, np.random.default_rng(0))
    assert len({(b.forest.plan.key, b.forest.num_nodes, b.forest.roots.shape) for b in batches}) == 1
    assert sum(int(b.forest.root_mask.sum()) for b in batches) == 300
    assert sum(b.num_real_nodes for b in batches) == sum(rj.Forest.from_trees([t]).num_nodes for t in trees)
    # The real trees come first, in the batch order; their roots carry their labels.
    order = np.random.default_rng(0).permutation(300)
    first = np.array_split(order, len(batches))[0]
    b = batches[0]
    n = len(first)
    assert b.forest.root_mask[:n].all() and not b.forest.root_mask[n:].any()
    np.testing.assert_array_equal(b.labels[:n], labels[first])
    sizes = [rj.Forest.from_trees([trees[j]]).num_nodes for j in first]
    assert b.forest.roots[:n].tolist() == np.cumsum([0] + sizes[:-1]).tolist()


# ---------------------------------------------------------------------- the model and main


def test_batched_model_matches_eager():
    trees, _ = demo.load_dataset(demo.TEST_FILE, 5)
    params = demo.init_params(jax.random.key(0), hidden=8, embed=4)
    h, c = demo.tree_lstm.batch(params, rj.Forest.from_trees(trees))
    roots = rj.Forest.from_trees(trees).roots
    for tree, r in zip(trees, roots):
        he, ce = demo.tree_lstm(params, tree)
        np.testing.assert_allclose(h[r], he, atol=1e-5)
        np.testing.assert_allclose(c[r], ce, atol=1e-5)


def test_main_runs_end_to_end(capsys):
    result = demo.main(
        ["--epochs", "1", "--limit", "96", "--batch-size", "32", "--hidden", "16", "--seed", "1"]
    )
    out = capsys.readouterr().out
    assert "epoch" in out and "final test accuracy" in out and "total time" in out
    assert len(result["history"]) == 1
    assert math.isfinite(result["loss"]) and 0 < result["loss"] < 10
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["history"][0]["nodes_per_s"] > 0


def test_help_mentions_modulo(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    assert "MODULO 10" in capsys.readouterr().out
