"""recjax.data: the readers and converters, checked against independent computations."""

from __future__ import annotations

import ast
import collections
import os
import pathlib
import random
import re
import shutil

import numpy as np
import pytest

import recjax as rj
from recjax import data, demo

STDLIB = pathlib.Path(ast.__file__).parent
SAMPLE = data.SST_SAMPLE_DIR
DEEP = 100_000


def preorder(tree):
    """(number of children, data) of every node in pre-order (iterative)."""
    out, stack = [], [tree]
    while stack:
        t = stack.pop()
        out.append((len(t.children), {k: (type(v), v.item()) for k, v in t.data.items()}))
        stack.extend(reversed(t.children))
    return out


def depth(tree):
    best, stack = 0, [(tree, 0)]
    while stack:
        t, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in t.children)
    return best


# ====================================================================== SST


def test_sst_sample_loads_with_one_schema():
    splits = data.load_sst(SAMPLE)
    assert [len(s) for s in splits[:3]] == [40, 10, 10]
    for tree in splits.train + splits.dev + splits.test:
        for arity, d in preorder(tree):
            assert arity in (0, 2)
            assert d["label"][0] is np.int32 and 0 <= d["label"][1] <= 4
            assert d["token"][0] is np.int32
            if arity:
                assert d["token"][1] == 0  # internal nodes have the unknown token
    for tree in splits.train:  # every training word is in the training vocabulary
        assert all(d["token"][1] >= 2 for arity, d in preorder(tree) if arity == 0)
    forest = rj.Forest.from_trees(splits.train + splits.dev + splits.test)
    assert forest.data["token"].dtype == forest.data["label"].dtype == np.int32
    assert "README.txt" in {p.name for p in SAMPLE.iterdir()}
    assert "synthetic" in (SAMPLE / "README.txt").read_text().lower()


def test_sst_known_tree():
    vocab = data.Vocab(["It", "'s", "good"])
    [tree] = data.parse_sst("(3 (2 It) (4 (2 's) (3 good)))\n\n", vocab)
    assert [(a, d["label"][1], d["token"][1]) for a, d in preorder(tree)] == [
        (2, 3, 0), (0, 2, 2), (2, 4, 0), (0, 2, 3), (0, 3, 4),
    ]


def test_sst_round_trip_every_sample_line():
    splits = data.load_sst(SAMPLE)
    vocab = data.build_vocab(
        [s for name in ("train.txt", "dev.txt", "test.txt")
         for s in data.sst_sentences(SAMPLE / name)]
    )
    for name, trees in zip(("train.txt", "dev.txt", "test.txt"), splits[:3]):
        lines = (SAMPLE / name).read_text().splitlines()
        full = data.read_sst(SAMPLE / name, vocab)
        assert [data.to_sst_string(t, vocab) for t in full] == lines  # tree -> string
        again = data.parse_sst("\n".join(data.to_sst_string(t, vocab) for t in full), vocab)
        assert [preorder(t) for t in again] == [preorder(t) for t in full]  # string -> tree
        # the same structure and labels as with the training vocabulary
        assert [[(a, d["label"]) for a, d in preorder(t)] for t in trees] == [
            [(a, d["label"]) for a, d in preorder(t)] for t in full
        ]


def test_sst_files_are_utf8_with_or_without_a_byte_order_mark(tmp_path):
    vocab = data.Vocab(["good", "café"])
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeff(3 (2 café) (4 good))\n".encode())
    (tree,) = data.read_sst(path, vocab)
    assert data.to_sst_string(tree, vocab) == "(3 (2 café) (4 good))"
    path.write_bytes("(3 (2 good) (4 good))\n(1 (2 caf\xe9) (3 good))\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: byte 0xe9 is not UTF-8"):
        data.read_sst(path, vocab)
    with pytest.raises(ValueError, match="line 2: byte 0xe9"):
        data.sst_sentences(path)
    with pytest.raises(ValueError, match="a leaf has token 9, outside the vocabulary's 4 ids"):
        data.to_sst_string(rj.Tree({"token": 9, "label": 1}), vocab)
    with pytest.raises(TypeError, match="Vocab.encode takes a list of words; got the str 'ab'"):
        vocab.encode("ab")
    with pytest.raises(ValueError, match=r"with_ast_kinds takes trees made by from_ast.*a node holds 1\.0"):
        data.with_ast_kinds(rj.Tree(1.0))
    assert int(data.parse_sst("(3 good)", {"good": 5})[0].data["token"]) == 5  # a dict of ids
    for bad in (2**40, -1, "x"):
        with pytest.raises(ValueError, match=f"vocab maps 'good' to {bad!r}; word ids must be integers"):
            data.parse_sst("(3 good)", {"good": bad})


def test_sst_oov_and_default_vocab():
    splits = data.load_sst(SAMPLE)
    train_words = {w for s in data.sst_sentences(SAMPLE / "train.txt") for w in s}
    unseen = 0
    for tree, words in zip(splits.dev, data.sst_sentences(SAMPLE / "dev.txt")):
        tokens = [int(t.data["token"]) for t in _leaves(tree)]
        assert tokens == [splits.vocab[w] if w in train_words else 0 for w in words]
        unseen += tokens.count(0)
    assert unseen > 0  # the sample has dev words that training never saw
    path = SAMPLE / "test.txt"
    own = data.read_sst(path)  # vocab=None: built from this file
    assert [preorder(t) for t in own] == [
        preorder(t) for t in data.read_sst(path, data.build_vocab(data.sst_sentences(path)))
    ]
    as_dict = data.read_sst(path, {"The": 7})
    assert int(_leaves(as_dict[0])[0].data["token"]) == 7


def _leaves(tree):
    return [t for t in _iter(tree) if t.is_leaf]


def _iter(tree):
    stack = [tree]
    while stack:
        t = stack.pop()
        yield t
        stack.extend(reversed(t.children))


def test_load_sst_official_layout(tmp_path):
    (tmp_path / "trees").mkdir()
    for name in ("train.txt", "dev.txt", "test.txt"):
        shutil.copy(SAMPLE / name, tmp_path / "trees" / name)
    a, b = data.load_sst(tmp_path), data.load_sst(SAMPLE)
    assert a.vocab == b.vocab
    assert [preorder(t) for t in a.test] == [preorder(t) for t in b.test]
    with pytest.raises(FileNotFoundError, match="trainDevTestTrees_PTB"):
        data.load_sst(tmp_path / "trees" / "nothing")


GOOD = "(3 (2 It) (4 (2 's) (3 good)))"


@pytest.mark.parametrize(
    "bad, what",
    [
        ("(3 (2 It) (4 (2 's) (3 good))", "unbalanced brackets: 1 '\\(' not closed"),
        ("(3 (2 It) (4 (2 's) (3 good))))", "unbalanced brackets: this '\\)' closes no"),
        ("(5 (2 It) (2 good))", "label '5' is not a sentiment label 0-4"),
        ("(3 (2 It) (pos good))", "label 'pos' is not a sentiment label 0-4"),
        ("(3 (2 It) (2 ))", "the leaf '\\(2' has no word"),
        ("(3 (2 a) (2 b) (2 c))", "has a 3rd child; SST trees are binary"),
        ("(3 (2 a))", "only one child; SST trees are binary"),
        ("(3 (2 a b) (2 c))", "second word 'b'"),
        ("(3 (2 a) (2 b) c)", "word 'c' follows a subtree"),
        ("(3 a (2 b))", "also has a subtree"),
        ("((2 a) (2 b))", "has no label"),
        ("(2 a) (2 b)", "after the end of the tree"),
        ("good", "outside brackets"),
    ],
)
def test_sst_malformed_line_names_file_and_line(tmp_path, bad, what):
    path = tmp_path / "train.txt"
    path.write_text(f"{GOOD}\n{GOOD}\n{bad}\n{GOOD}\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3, column \d+: .*{what}"):
        data.read_sst(path, data.Vocab(["It"]))
    with pytest.raises(ValueError, match="line 3"):
        data.sst_sentences(path)


def test_sst_blank_lines(tmp_path):
    path = tmp_path / "dev.txt"
    path.write_text(f"{GOOD}\n\n{GOOD}\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: the line is empty"):
        data.read_sst(path)
    path.write_text(f"{GOOD}\r\n{GOOD}\r\n\n  \n")  # CRLF and trailing blank lines are fine
    assert len(data.read_sst(path)) == 2
    shutil.copy(SAMPLE / "train.txt", tmp_path / "train.txt")
    shutil.copy(SAMPLE / "test.txt", tmp_path / "test.txt")
    path.write_text(f"{GOOD}\n\n{GOOD}\n")
    with pytest.raises(ValueError, match="dev.txt, line 2"):
        data.load_sst(tmp_path)


def test_sst_100000_deep_line():
    line = "(1 " * DEEP + "(2 a)" + " (3 b))" * DEEP  # a left-branching chain
    vocab = data.Vocab(["a", "b"])
    [tree] = data.parse_sst(line, vocab)
    assert depth(tree) == DEEP
    assert data.to_sst_string(tree, vocab) == line


# ====================================================================== vocabularies, GloVe


def test_build_vocab_counts_and_order():
    sents = [["b", "a", "c"], ("a", "b", "d"), ["a", "e", "<unk>"]]
    v = data.build_vocab(sents)
    assert v.words == ("<unk>", "<pad>", "a", "b", "c", "d", "e")  # ties: first seen
    assert data.build_vocab(sents, min_count=2).words == ("<unk>", "<pad>", "a", "b")
    assert data.build_vocab(sents, max_size=1).words == ("<unk>", "<pad>", "a")
    assert v["a"] == 2 and v["zzz"] == data.Vocab.UNK == 0 and data.Vocab.PAD == 1
    assert "a" in v and "zzz" not in v and len(v) == 7
    assert v.encode(["e", "nope"]).tolist() == [6, 0] and v.encode([]).dtype == np.int32
    nltk_style = ("S", [("NP", "a"), ("VP", [("V", "f"), ("NP", ["a"])])])
    assert data.build_vocab([nltk_style]).words == ("<unk>", "<pad>", "a", "f")
    with pytest.raises(TypeError, match="sentence 0 is a str"):
        data.build_vocab(["a b c"])
    with pytest.raises(ValueError, match="repeats"):
        data.Vocab(["a", "a"])
    with pytest.raises(ValueError, match="reserved"):
        data.Vocab(["<pad>"])
    assert v["<unk>"] == v["<pad>"] == data.Vocab.UNK  # the padding id is never a word's
    assert data.build_vocab(sents, max_size=0).words == ("<unk>", "<pad>")
    with pytest.raises(ValueError, match="max_size must be at least 0"):
        data.build_vocab(sents, max_size=-1)


def test_load_glove(tmp_path):
    vocab = data.Vocab(["good", "bad", "new york", "missing"])
    path = tmp_path / "glove.txt"
    path.write_text(
        "3 2\n"  # a word2vec-style header is skipped
        "good 0.5 1.0\n"
        "other 9 9\n"
        "new york -1 2e-1\n"  # a word with a space (as in glove.840B)
        "bad -0.5 -1\n"
        "good 7 7\n"  # a repeated word: the first one counts
    )
    emb = data.load_glove(path, vocab, dim=2, seed=3)
    assert emb.dtype == np.float32 and emb.shape == (6, 2)
    np.testing.assert_allclose(emb[[2, 3, 4]], [[0.5, 1.0], [-0.5, -1.0], [-1.0, 0.2]])
    np.testing.assert_array_equal(emb[data.Vocab.PAD], [0, 0])
    found = np.asarray([[0.5, 1.0], [-0.5, -1.0], [-1.0, 0.2]], np.float32)
    noise = np.random.default_rng(3).standard_normal((6, 2)).astype(np.float32)
    np.testing.assert_allclose(emb[[0, 5]], found.std() * noise[[0, 5]], rtol=1e-6)
    again = data.load_glove(path, vocab, dim=2, seed=3, scale=0.1)
    np.testing.assert_allclose(again[5], 0.1 * noise[5], rtol=1e-6)
    assert not np.allclose(data.load_glove(path, vocab, dim=2, seed=4)[5], emb[5])

    path.write_text("2 2 \ngood 0.5 1.0 \nbad -0.5 -1.0\t\r\n")  # fastText .vec: a space ends each line
    np.testing.assert_allclose(data.load_glove(path, vocab, dim=2)[[2, 3]], [[0.5, 1.0], [-0.5, -1.0]])
    assert demo._glove_dim(path) == 2
    path.write_text("good 0.5 1.0 \n")
    assert demo._glove_dim(path) == 2

    path.write_text("good 0.5 1.0\nbad 0.5\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: expected a word and 2"):
        data.load_glove(path, vocab, dim=2)
    path.write_text("good 0.5 1.0 3.0\n")
    with pytest.raises(ValueError, match="line 1: .*Is dim=2 the size"):
        data.load_glove(path, vocab, dim=2)
    path.write_text("good 0.5 1.0\nbad 0.5 x\n")
    with pytest.raises(ValueError, match="line 2: the vector of 'bad' holds a field that is not"):
        data.load_glove(path, vocab, dim=2)


# ====================================================================== Python source


FILES = [STDLIB / name for name in ("argparse.py", "inspect.py", "textwrap.py", "bisect.py")]


def _defs(files):
    """Every (async) def, file after file, in source order (ast.walk is breadth first)."""
    out = []
    for f in files:
        defs = [n for n in ast.walk(ast.parse(f.read_bytes()))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        out += sorted(defs, key=lambda n: (n.lineno, n.col_offset))
    return out


def test_python_functions_match_ast():
    trees = data.python_functions(FILES)
    defs = _defs(FILES)
    assert len(trees) == len(defs) > 200
    sizes = [len(list(ast.walk(d))) for d in defs]
    assert [len(preorder(t)) for t in trees] == sizes
    for tree in trees:
        nodes = preorder(tree)
        assert data.AST_KINDS[nodes[0][1]["kind"][1]] in ("FunctionDef", "AsyncFunctionDef")
        for _, d in nodes:  # only the kind id: no identifier or constant can leak
            assert set(d) == {"kind"} and d["kind"][0] is np.int32
            assert 0 < d["kind"][1] < len(data.AST_KINDS)
    fn = next(d for d in defs if d.name == "insort_right")
    kinds = collections.Counter(type(n).__name__ for n in ast.walk(fn))
    mine = data.from_ast(fn)
    assert collections.Counter(data.AST_KINDS[d["kind"][1]] for _, d in preorder(mine)) == kinds
    forest = rj.Forest.from_trees(trees)
    assert forest.num_nodes == sum(sizes) and forest.data["kind"].dtype == np.int32


def test_from_ast_shared_singletons_become_separate_nodes():
    module = ast.parse("a = b + c * d\nprint(a, b)")
    loads = [n for n in ast.walk(module) if isinstance(n, ast.Load)]
    assert len({id(n) for n in loads}) < len(loads)  # CPython shares ast.Load()
    forest = rj.Forest.from_trees([data.from_ast(module)])
    assert forest.num_nodes == len(list(ast.walk(module)))  # a tree, not a DAG


def test_ast_kinds_table():
    assert data.AST_KINDS[0] == "<unknown>" and len(set(data.AST_KINDS)) == len(data.AST_KINDS)
    abstract = {"AST", "mod", "stmt", "expr", "expr_context", "boolop", "operator", "unaryop",
                "cmpop", "excepthandler", "pattern", "type_ignore", "type_param", "slice"}
    deprecated = {"Num", "Str", "Bytes", "NameConstant", "Ellipsis", "Index", "ExtSlice",
                  "Suite", "AugLoad", "AugStore", "Param"}
    concrete = {n for n in dir(ast) if isinstance(getattr(ast, n), type)
                and issubclass(getattr(ast, n), ast.AST)} - abstract - deprecated
    assert concrete <= set(data.AST_KINDS)
    # pinned ids: the table only ever grows at the end
    assert data.AST_KINDS.index("FunctionDef") == 35 and data.AST_KINDS.index("withitem") == 107


def test_python_functions_inputs(tmp_path):
    import json

    package_files = sorted(pathlib.Path(json.__file__).parent.rglob("*.py"))
    assert len(data.python_functions(json)) == len(_defs(package_files))  # a package: its folder
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("async def f():\n    def g(): pass\n")
    (tmp_path / "pkg" / "b.py").write_text(
        "# -*- coding: latin-1 -*-\ndef h(): return '\xe9'\n", encoding="latin-1"
    )
    trees = data.python_functions(tmp_path / "pkg")
    kinds = [data.AST_KINDS[int(t.data["kind"])] for t in trees]
    assert kinds == ["AsyncFunctionDef", "FunctionDef", "FunctionDef"]
    (tmp_path / "pkg" / "c.py").write_text("def broken(:\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'pkg' / 'c.py'))}, line 1"):
        data.python_functions(str(tmp_path / "pkg"))
    assert len(data.python_functions([tmp_path / "pkg"], skip_errors=True)) == 3
    (tmp_path / "pkg" / "d.py").write_text("def w(): return '\\d'\n")  # a SyntaxWarning on 3.12+
    assert len(data.python_functions(tmp_path / "pkg" / "d.py")) == 1
    assert len(data.python_functions(os.fsencode(tmp_path / "pkg" / "d.py"))) == 1  # a bytes path
    with pytest.raises(TypeError, match="expected paths of .py files or folders, or modules; got a int"):
        data.python_functions(3)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        data.python_functions("no/such/file.py")
    with pytest.raises(ValueError, match="no Python source"):
        data.python_functions(__import__("math"))


def _first_word(name):
    """An independent spelling of the rule: camelCase -> snake_case, first word."""
    core = name.strip("_")
    if not core:
        return None
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", core.split("_")[0])
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return s.split("_")[0].lower()


def test_function_name_task_labels_computed_independently():
    task = data.function_name_task(FILES, num_classes=8)
    names = [d.name for d in _defs(FILES)]
    words = collections.Counter(w for w in map(_first_word, names) if w)
    top = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    classes = tuple(w for w, _ in top)
    assert task.classes == classes and "get" in classes and "init" in classes
    expected = [(n, classes.index(_first_word(n))) for n in names if _first_word(n) in classes]
    assert list(zip(task.names, task.labels.tolist())) == expected
    assert task.labels.dtype == np.int32 and len(task.trees) == len(task.labels)
    for name, tree in zip(task.names, task.trees):
        assert all(set(d) == {"kind"} for _, d in preorder(tree))
    rj.Forest.from_trees(task.trees)


@pytest.mark.parametrize(
    "name, word",
    [("__init__", "init"), ("getValue", "get"), ("HTTPServer", "http"), ("_is_dir", "is"),
     ("parseHTTPResponse", "parse"), ("V2Thing", "v2"), ("ABCdEF", "ab"), ("run", "run"),
     ("_", None), ("test_x", "test"), ("setUp", "set")],
)
def test_first_word_rule(tmp_path, name, word):
    assert _first_word(name) == word
    (tmp_path / "m.py").write_text(f"def {name}(): pass\ndef {name}(): pass\n")
    task = data.function_name_task(tmp_path, num_classes=1)
    assert task.classes == ((word,) if word else ())
    assert len(task.trees) == (2 if word else 0)


# ====================================================================== calculator


def _evaluate(tree):
    value, order, stack = {}, [], [tree]
    while stack:
        t = stack.pop()
        order.append(t)
        stack.extend(t.children)
    for t in reversed(order):
        tok = demo.VOCAB[t.data["token"]]
        if t.is_leaf:
            value[id(t)] = int(tok)
        else:
            a, b = (value[id(c)] for c in t.children)
            value[id(t)] = {"+": a + b, "-": a - b, "*": a * b}[tok]
    return value[id(tree)]


def test_calculator_matches_shipped_data_and_depth_6():
    trees, values = data.calculator(5, 4, demo.DATA_SEED)
    shipped = demo.read_data_file(demo.TRAIN_FILE).splitlines()[:5]
    assert [f"{v}\t{demo.expression_to_string(t)}" for t, v in zip(trees, values)] == shipped
    trees, values = data.calculator(60, 6, seed=1)
    assert [_evaluate(t) for t in trees] == values
    assert all(type(v) is int for v in values)  # exact: no int64 overflow
    assert max(depth(t) for t in trees) == 6
    assert len({demo.expression_to_string(t) for t in trees}) == 60
    rj.Forest.from_trees(trees)


# ====================================================================== nested lists, nltk


def test_from_nested_exact_schema():
    t = data.from_nested([1, [2, 3]])
    assert preorder(t) == [(2, {"value": (np.int32, 0)}), (0, {"value": (np.int32, 1)}),
                           (2, {"value": (np.int32, 0)}), (0, {"value": (np.int32, 2)}),
                           (0, {"value": (np.int32, 3)})]
    assert [d["value"][0] for _, d in preorder(data.from_nested((1, 2.5)))] == [np.float32] * 3
    assert preorder(data.from_nested([True, False]))[0][1]["value"] == (np.bool_, False)
    assert preorder(data.from_nested(7)) == [(0, {"value": (np.int32, 7)})]
    assert preorder(data.from_nested([1, 2], fill=0.5))[0][1]["value"] == (np.float32, 0.5)
    assert preorder(data.from_nested([[]]))[1] == (0, {"value": (np.int32, 0)})
    t = data.from_nested([[], [np.int64(4)]], dtype=np.float32, fill=-1)
    assert preorder(t) == [(2, {"value": (np.float32, -1.0)}), (0, {"value": (np.float32, -1.0)}),
                           (1, {"value": (np.float32, -1.0)}), (0, {"value": (np.float32, 4.0)})]
    forest = rj.Forest.from_trees([data.from_nested([1.0, [2, [3]]]), data.from_nested([[4.5]])])
    assert forest.num_nodes == 9 and forest.data["value"].dtype == np.float32


def _random_nested(rng, budget):
    if budget <= 1 or rng.random() < 0.3:
        return rng.randint(-5, 5)
    return [_random_nested(rng, budget // 3) for _ in range(rng.randint(1, 4))]


def test_from_nested_round_trip():
    rng = random.Random(0)
    for _ in range(100):
        x = _random_nested(rng, 60)
        assert data.to_nested(data.from_nested(x)) == x


def test_from_nested_errors():
    with pytest.raises(TypeError, match=r"obj\[1\]\[0\]: is a str"):
        data.from_nested([1, ["a"]])
    with pytest.raises(TypeError, match=r"obj\[0\]: is a NoneType"):
        data.from_nested([None])
    with pytest.raises(TypeError, match=r"obj: is a dict"):
        data.from_nested({"a": 1})
    loop = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        data.from_nested([loop])
    with pytest.raises(ValueError, match="does not fit"):
        data.from_nested([2**40], dtype=np.int32)
    # numpy scalars too (numpy would wrap them around, or round them to inf)
    for leaf, dtype in [(np.int64(3_000_000_000), None), (np.uint64(2**63), None),
                        (np.int64(-2**40), np.int32), (70000, np.float16), (np.float64(1e300), np.float32)]:
        with pytest.raises(ValueError, match="does not fit"):
            data.from_nested([leaf, 1], dtype=dtype)
    assert data.to_nested(data.from_nested([np.int64(7), np.float32(np.inf)])) == [7.0, np.inf]
    with pytest.raises(ValueError, match=r"leaf value nan does not fit int32.*a float dtype for NaN"):
        data.from_nested([1, float("nan")], dtype=np.int32)
    for fill, dtype in [(2**40, None), (-1, np.uint8)]:
        with pytest.raises(ValueError, match=f"fill {fill} does not fit"):
            data.from_nested([1], fill=fill, dtype=dtype)


def test_deep_inputs_convert_without_recursion_error():
    x = 1
    for _ in range(DEEP):
        x = [x]
    t = data.from_nested(x)
    assert depth(t) == DEEP
    y = data.to_nested(t)
    for _ in range(DEEP):
        assert isinstance(y, list) and len(y) == 1
        y = y[0]
    assert y == 1
    e = ast.Constant(0)
    for _ in range(DEEP):
        e = ast.UnaryOp(ast.USub(), e)
    assert depth(data.from_ast(e)) == DEEP
    n = ("2", "w")
    for _ in range(DEEP):
        n = ("1", [n, ("3", "v")])
    assert depth(data.from_nltk(n)) == DEEP


class FakeNltkTree(list):
    """What nltk.Tree looks like to from_nltk: a list of children with .label()."""

    def __init__(self, label, children):
        super().__init__(children)
        self._label = label

    def label(self):
        return self._label


def _nltk_from_string(line, tuples=False):
    """A small independent PTB reader (as nltk.Tree.fromstring would give)."""
    stack, root = [], None
    for tok in re.findall(r"\(|\)|[^\s()]+", line):
        if tok == "(":
            stack.append([None, []])
        elif tok == ")":
            label, kids = stack.pop()
            node = (label, kids) if tuples else FakeNltkTree(label, kids)
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        elif stack[-1][0] is None:
            stack[-1][0] = tok
        else:
            stack[-1][1].append(tok)
    return root


def test_from_nltk_equals_sst_reader():
    splits = data.load_sst(SAMPLE)
    lines = (SAMPLE / "dev.txt").read_text().splitlines()
    for line, tree in zip(lines, splits.dev):
        for tuples in (False, True):
            mine = data.from_nltk(_nltk_from_string(line, tuples), splits.vocab)
            assert preorder(mine) == preorder(tree)
    sents = [data.sst_sentences(SAMPLE / "train.txt")]
    nltk_trees = [_nltk_from_string(l) for l in (SAMPLE / "train.txt").read_text().splitlines()]
    assert data.build_vocab(nltk_trees) == data.build_vocab(sents[0])


def test_from_nltk_labels_and_bare_words():
    tree = FakeNltkTree("S", [FakeNltkTree("NP", ["dogs"]), "bark", FakeNltkTree("X", [])])
    t = data.from_nltk(tree, data.Vocab(["dogs", "bark"]), labels={"S": 0, "NP": 1, "X": 2})
    assert [(a, d["label"][1], d["token"][1]) for a, d in preorder(t)] == [
        (3, 0, 0), (0, 1, 2), (0, -1, 3), (0, 2, 0),
    ]
    t = data.from_nltk(("S", [("NP", "x"), ("VP", "y")]), labels=len)
    assert [d["label"][1] for _, d in preorder(t)] == [1, 2, 2]
    rj.Forest.from_trees([t, data.from_nltk(("s", "w"), labels=len)])
    with pytest.raises(ValueError, match=r"tree\[1\]: has label 'VP', which cannot be conv"):
        data.from_nltk(("S", [("NP", "x"), ("VP", "y")]), labels={"S": 0, "NP": 1})
    with pytest.raises(ValueError, match=r"tree: has label 'S'.*labels="):
        data.from_nltk(("S", ["x", "y"]))
    with pytest.raises(TypeError, match=r"tree\[0\]: is a int"):
        data.from_nltk(("1", [3, "y"]))
