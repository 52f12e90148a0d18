"""The demo: shipped calculator data, parser, encodings, and every task end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recjax import demo
from recjax.train import CHECKPOINT_FILE


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


def _depth(line):
    return demo.tree_depth(demo.parse_expression(line.split("\t")[1]))


# ---------------------------------------------------------------------- shipped data


def test_shipped_files_match_the_generator():
    train, test = demo.shipped_lines()
    assert _lines(demo.TRAIN_FILE) == list(train)
    assert _lines(demo.TEST_FILE) == list(test)
    # Exact file bytes: one line each, newline-terminated.
    assert demo.read_data_file(demo.TEST_FILE) == "".join(x + "\n" for x in test)
    # The recipe, spelled out: depth 1-4, then depth 5-6; the first part is a prefix
    # of the plain generator's output (recjax.data.calculator reproduces it).
    shallow = demo.generate_expressions(demo.SHALLOW_SIZE, demo.SHALLOW_DEPTH, demo.DATA_SEED)
    assert list(train[: demo.SHALLOW_SIZE]) == shallow
    assert demo.generate_expressions(5, demo.SHALLOW_DEPTH, demo.DATA_SEED) == shallow[:5]
    assert len(train) == demo.TRAIN_SIZE and len(test) == demo.TEST_SIZE


def test_shipped_data_is_distinct_held_out_and_in_range():
    train, test = _lines(demo.TRAIN_FILE), _lines(demo.TEST_FILE)
    exprs = [line.split("\t")[1] for line in train + test]
    assert len(set(exprs)) == len(exprs)  # no test expression appears in training
    shallow = {_depth(x) for x in train[: demo.SHALLOW_SIZE : 40]}
    deep = {_depth(x) for x in train[demo.SHALLOW_SIZE :: 20]}
    held_out = {_depth(x) for x in test[::5]}
    assert shallow == {1, 2, 3, 4} and deep == {5, 6} and held_out == {2, 3, 4, 5, 6}
    size = sum(len(x) + 1 for x in train + test)
    assert size < 2_000_000  # the files stay small


def test_generator_rejects_impossible_requests():
    assert len(demo.generate_expressions(300, 1, seed=0)) == 300  # every depth-1 expression
    with pytest.raises(ValueError, match="only 300 distinct"):
        demo.generate_expressions(301, 1, seed=0)
    with pytest.raises(ValueError, match="10 of them excluded"):
        excluded = [x.split("\t")[1] for x in demo.generate_expressions(10, 1, seed=3)]
        demo.generate_expressions(291, 1, seed=0, exclude=excluded)
    with pytest.raises(ValueError, match="min_depth"):
        demo.generate_expressions(1, 2, seed=0, min_depth=3)
    with pytest.raises(ValueError, match="operators lists '\\+' more than once"):  # 100 exist, not 300
        demo.generate_expressions(150, 1, seed=0, operators=("+", "+", "+"))


def test_generator_is_seeded_and_respects_depths_and_exclusions():
    a = demo.generate_expressions(20, 3, seed=5)
    assert a == demo.generate_expressions(20, 3, seed=5)
    assert a != demo.generate_expressions(20, 3, seed=6)
    assert all(_python_value(line.split("\t")[1]) == int(line.split("\t")[0]) for line in a)
    deep = demo.generate_expressions(40, 6, seed=1, min_depth=5)
    assert {_depth(x) for x in deep} == {5, 6}
    exclude = {x.split("\t")[1] for x in demo.generate_expressions(200, 1, seed=2)}
    rest = demo.generate_expressions(100, 1, seed=2, exclude=exclude)
    assert not exclude & {x.split("\t")[1] for x in rest}


# ---------------------------------------------------------------------- parser


@pytest.mark.parametrize("name", [demo.TRAIN_FILE, demo.TEST_FILE])
def test_parser_round_trips_and_labels_are_right(name):
    lines = _lines(name)[::300][:50]
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
    _, labels = demo.parse_lines("-43\t(- 2 (* 5 9))\n")
    assert labels.tolist() == [7]  # -43 % 10 == 7 (Python semantics)
    assert len(demo.VOCAB) == 13


def test_parser_is_iterative():
    depth = 3000  # far beyond Python's recursion limit
    expr = "(+ 1 " * depth + "1" + ")" * depth
    tree = demo.parse_expression(expr)
    assert demo.evaluate_tree(tree) == depth + 1
    assert demo.expression_to_string(tree) == expr
    assert demo.tree_depth(tree) == depth
    assert int(demo.encode(tree).data["label"]) == (depth + 1) % 10


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
    with pytest.raises(ValueError, match=r"line 2: invalid literal for int\(\) with base 10: 'abc'"):
        demo.parse_lines("3\t(+ 1 2)\nabc\t(+ 1 2)")
    with pytest.raises(ValueError, match="line 1: cannot parse"):
        demo.parse_lines("3\t(+ 1 2")


# ---------------------------------------------------------------------- encodings


def _nodes(tree):
    out, stack = [], [tree]
    while stack:
        t = stack.pop()
        out.append(t)
        stack.extend(reversed(t.children))
    return out


def _subexpressions(tree):
    """(value mod 10) of every node of a parsed expression, in pre-order."""
    return [demo.evaluate_tree(t) % 10 for t in _nodes(tree)]


def test_every_encoding_labels_each_subexpression_with_its_value_mod_10():
    lines = _lines(demo.TEST_FILE)[::97]
    for line in lines:
        tree = demo.parse_expression(line.split("\t")[1])
        want = _subexpressions(tree)
        native = demo.encode(tree)
        assert [int(n.data["label"]) for n in _nodes(native)] == want
        assert [int(n.data["token"]) for n in _nodes(native)] == [n.data["token"] for n in _nodes(tree)]
        for encoding, extra in (("operator-leaf", 2), ("positional", 2)):
            nodes = _nodes(demo.encode(tree, encoding))
            labelled = [int(n.data["label"]) for n in nodes if n.data["label"] >= 0]
            assert labelled == want  # the same targets, in the same order
            internal = sum(not n.is_leaf for n in _nodes(tree))
            assert len(nodes) == len(want) + extra * internal
            assert all(n.data["token"] < demo.MODEL_VOCAB for n in nodes)
            assert all(set(n.data) == {"token", "label"} for n in nodes)


def test_encodings_keep_the_operand_order():
    t = demo.encode(demo.parse_expression("(- 2 5)"), "operator-leaf")
    op, pair = t.children
    assert int(t.data["label"]) == 7 and int(op.data["token"]) == demo.TOKEN_ID["-"]
    assert [int(c.data["token"]) for c in pair.children] == [2, 5]
    t = demo.encode(demo.parse_expression("(- 2 5)"), "positional")
    assert [int(c.data["token"]) for c in t.children] == [demo.LEFT, demo.RIGHT]
    assert [int(c.children[0].data["token"]) for c in t.children] == [2, 5]
    with pytest.raises(ValueError, match="unknown encoding"):
        demo.encode(t, "sideways")


# ---------------------------------------------------------------------- the command line

TINY = ["--epochs", "1", "--hidden", "8", "--embed", "4", "--batch-size", "16", "--quiet"]


def test_help_lists_the_tasks_and_the_target(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for task in ("calc", "sst", "ast"):
        assert f"  {task} " in out
    assert "MODULO 10" in out and "SYNTHETIC" in out and "Child-Sum" in out
    assert "--checkpoint-dir" in out and "--limit" in out and "--glove" in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--epochs must be at least 1"):
        demo.main(["--epochs", "0"])
    for lr, shown in (("nan", "nan"), ("inf", "inf"), ("0", "0.0"), ("-1e-3", "-0.001")):
        with pytest.raises(SystemExit, match=f"--lr must be a positive number; got {shown}"):
            demo.main([f"--lr={lr}"])
    for task in ("sst", "ast"):
        with pytest.raises(SystemExit, match="--data /no/such/path: no such"):
            demo.main(["--task", task, "--data", "/no/such/path"])
    with pytest.raises(SystemExit, match="--seed must be at least 0; got -1"):
        demo.main(["--seed=-1"])
    with pytest.raises(SystemExit, match="--model applies to --task calc only; this is --task sst"):
        demo.main(["--task", "sst", "--model", "rntn"])
    # options another task reads are refused, not ignored (calc ran without its data before)
    for argv, message in (
        (["--data", "x"], "--data applies to --task sst and --task ast only; this is --task calc"),
        (["--glove", "g.txt"], "--glove applies to --task sst only"),
        (["--task", "ast", "--glove", "g.txt"], "--glove applies to --task sst only; this is --task ast"),
        (["--classes", "5"], "--classes applies to --task ast only"),
        (["--task", "sst", "--supervise", "root"], "--supervise applies to --task calc only"),
    ):
        with pytest.raises(SystemExit, match=message):
            demo.main(argv)
    with pytest.raises(SystemExit, match="--classes must be at least 1"):
        demo.main(["--task", "ast", "--classes", "0"])


def test_calc_runs_end_to_end_and_checkpoints_by_default(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = demo.main(["--limit", "48", *TINY])
    out = capsys.readouterr().out
    assert "MODULO 10" in out and "final test accuracy" in out and "total time" in out
    assert "depth 6" in out and "nodes/s" in out
    assert len(result["history"]) == 1
    assert math.isfinite(result["history"][0]["loss"]) and 0 < result["history"][0]["loss"] < 10
    assert 0.0 <= result["accuracy"] <= 1.0 and result["history"][0]["nodes_per_s"] > 0
    assert sorted(result["accuracy_by_depth"]) == [2, 3, 4, 5, 6]
    ckpt = tmp_path / "recjax_checkpoints" / "calc"
    assert (ckpt / CHECKPOINT_FILE).is_file()
    assert json.loads((ckpt / demo.CONFIG_FILE).read_text())["task"] == "calc"


def test_checkpoint_resumes_and_refuses_other_settings(capsys, tmp_path, monkeypatch):
    ckpt = ["--checkpoint-dir", str(tmp_path / "run")]
    args = ["--limit", "40", *TINY[2:]]
    first = demo.main([*args, "--epochs", "1", *ckpt])
    resumed = demo.main([*args, "--epochs", "2", *ckpt])
    out = capsys.readouterr().out
    assert "resumed from" in out and "1 epoch(s) done before" in out
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == first["history"][0]
    # The same settings without interruption give the same training.
    whole = demo.main([*args, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "whole")])
    np.testing.assert_allclose(
        [h["loss"] for h in whole["history"]], [h["loss"] for h in resumed["history"]], rtol=1e-5
    )
    again = demo.main([*args, "--epochs", "2", *ckpt])
    assert "nothing to train" in capsys.readouterr().out
    assert again["history"] == resumed["history"]
    with pytest.raises(SystemExit, match=r"other settings \(hidden: 8 there, 16 now\).*--restart"):
        demo.main([*args, "--epochs", "2", "--hidden", "16", *ckpt])
    restarted = demo.main([*args, "--epochs", "1", "--hidden", "16", "--restart", *ckpt])
    assert len(restarted["history"]) == 1
    # An interrupted --restart leaves no checkpoint of the run it replaces behind.
    real_fit = demo.fit

    def interrupted(*a, epochs, **k):
        if epochs:
            raise KeyboardInterrupt
        return real_fit(*a, epochs=epochs, **k)

    monkeypatch.setattr(demo, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.main([*args, "--epochs", "1", "--restart", *ckpt])
    monkeypatch.undo()
    capsys.readouterr()
    fresh = demo.main([*args, "--epochs", "1", *ckpt])
    assert "resumed from" not in capsys.readouterr().out
    assert fresh["history"][0]["loss"] == pytest.approx(first["history"][0]["loss"], rel=1e-5)


def test_calc_with_another_model(capsys, tmp_path):
    result = demo.main(["--model", "tree_fc", "--limit", "32", *TINY, "--checkpoint-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "model tree_fc" in out and "operator-leaf" in out
    assert math.isfinite(result["history"][0]["loss"])


def test_sst_with_an_empty_split_stops_before_training(tmp_path):
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.txt").write_text("(1 (2 a) (3 b))\n" if name != "test" else "\n")
    with pytest.raises(SystemExit, match=r"test\.txt holds no trees"):
        demo.main(["--task", "sst", "--data", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ck")])
    assert not (tmp_path / "ck").exists()


def test_sst_runs_on_the_synthetic_sample_with_glove_vectors(capsys, tmp_path):
    glove = tmp_path / "vectors.txt"  # GloVe's text format; the size (6) is read from it
    glove.write_text("It 0.1 0.2 0.3 0.4 0.5 0.6\nfilm -0.1 0 0 0 0 1\ndull 1 1 1 1 1 -1\n")
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    result = demo.main(["--task", "sst", "--limit", "12", *TINY, "--glove", str(glove), *ckpt])
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "NOT the Stanford Sentiment Treebank" in out
    assert "dev fine" in out and "test fine-grained" in out and "binary" in out
    assert f"word vectors from {glove} (6-d)" in out
    assert result["synthetic_sample"]
    for split in ("dev", "test"):
        assert 0.0 <= result[split]["fine"] <= 1.0 and 0.0 <= result[split]["binary"] <= 1.0
    assert (tmp_path / "ckpt" / CHECKPOINT_FILE).is_file()


def test_ast_runs_and_reports_the_majority_baseline(capsys, tmp_path):
    code = (
        "def get_{i}(self):\n    return self.x{i}\n\n"
        "def set_{i}(self, v):\n    self.x{i} = v\n\n"
        "def is_{i}(x):\n    return x is None or x == {i}\n\n"
        "def get_more_{i}(d, k):\n    return d.get(k, [])\n"
    )
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.py").write_text(code.format(i=i))
    ckpt = str(tmp_path / "ckpt")
    result = demo.main(["--task", "ast", "--data", str(src), *TINY, "--checkpoint-dir", ckpt])
    out = capsys.readouterr().out
    assert "Child-Sum" in out and "majority class" in out and "final test accuracy" in out
    assert result["classes"] == ("get", "is", "set")
    assert result["majority"] == pytest.approx(0.5)  # 'get' is 2 of the 4 held-out functions
    assert 0.0 <= result["accuracy"] <= 1.0
