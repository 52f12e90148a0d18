"""Demo: train recursive networks with recjax on three tasks (``python -m recjax.demo``).

``python -m recjax.demo --task {calc,sst,ast}`` trains with ``recjax.train.fit`` on data
from ``recjax.data`` and prints, per epoch, the mean training loss, the evaluation
metrics, the training throughput in tree nodes per second and the epoch's seconds
(an epoch that meets a new batch shape also compiles a program, so it is slower).
After every epoch ``fit`` writes a checkpoint to ``--checkpoint-dir`` (default
``./recjax_checkpoints/<task>``); running the same command again resumes from it
(``--restart`` starts over; a larger ``--epochs`` trains on). ``--help`` lists the
options.

calc (the default): arithmetic expressions over the digits 0-9 and the binary
operators ``+ - *``, written in prefix bracket form, e.g. ``(+ 3 (* 2 4))``: one leaf
per digit, one internal node with two children per operator. A binary Tree-LSTM (Tai
et al. 2015; ``recjax.nn.tree_lstm``) reads the tree bottom-up and a linear softmax
layer predicts the value of the expression MODULO 10 (Python's ``%``, so 0-9;
``(- 2 5)`` is -3, class 7). Every subexpression is labelled with its own value mod
10 and the loss is the mean cross entropy over all nodes (``--supervise root``
trains on the roots only); the reported accuracy is at the roots of held-out
expressions, broken down by depth (operator levels on the longest path).

Why the value mod 10, not the value. The exact values are heavy-tailed: in the shipped
files the median magnitude is about 50, one in six exceeds 1,000, and the largest
is 1.4 * 10^11 (a depth-6 product can reach 9^64). A regression head counted right
when it rounds to the exact value would need 12 exact digits, beyond float32 (exact
integers end at 2^24), and a value range small enough to regress would drop mostly
the deep products, the cases of interest. The value mod 10 is exact at every depth,
because ``+ - *`` commute with ``% 10``: the residue of a node is a fixed function of
its operator and its children's residues. A model that learns the three 10 x 10
operator tables and keeps the residues apart in its hidden state is right at any
depth, so accuracy by depth measures how well the learned composition holds up.

Data files (``recjax/data/calc_train.txt`` and ``calc_test.txt``) hold one example
per line: the exact integer value of the expression, a tab, the expression. They are
``shipped_lines()`` (written by ``write_data_files()``): 7,000 training expressions
of depth 1-4 (``generate_expressions(7000, 4, DATA_SEED)``), then 7,000 of depth 5-6
(seed ``DATA_SEED + 1``), and 1,000 test expressions of depth 2-6 (seed ``DATA_SEED +
2``, about 200 per depth) none of which is in the training file. There is no depth-1
test expression: there are only 300 of them and the training file holds them all.
The settings (data mix, learning rate, epochs) were chosen on a development set drawn
the same way with seed 3 (not shipped), not on the test file. With the default
settings (8 epochs, 2-3 minutes on a shared 2-core CPU) the model reaches about 0.99
held-out accuracy and 0.97 at depth 6 (README.md has the measured figures). In
development runs, training on depths 1-4 only (16,000 expressions, 12 epochs) gave
0.99+ at depth 4 but 0.93 at depth 6, and 3,072 expressions of depth 1-6 (33 epochs)
were fitted (training loss 0.001) but gave only 0.85 held-out accuracy.

sst: an N-ary Tree-LSTM with N = 2 (binary) on Stanford Sentiment Treebank files
(``recjax.data.load_sst``), every node labelled 0-4: per-node cross entropy over
``forest.data["label"]``. Reports fine-grained (5-class) and binary root accuracy
(``recjax.train.binary_root_accuracy``) and all-node accuracy on dev (per epoch) and
test. ``--data DIR`` is the real treebank's folder (holding ``trees/``); by default it
runs on ``recjax.data.SST_SAMPLE_DIR``, a tiny SYNTHETIC sample that is not SST data.
``--glove FILE`` initialises the word vectors from GloVe.

ast: a Child-Sum Tree-LSTM (``recjax.nn.child_sum_tree_lstm``) over Python ASTs
(node kinds only: names and constants are not in the tree) predicts the first word of
a function's name among the 10 most frequent (``recjax.data.function_name_task``),
over the standard library's top-level modules (or ``--data DIR``); every fourth file
is held out for testing. Reports accuracy and the majority-class baseline.

``--model`` trains another model of ``recjax.nn`` on the calc task. Cells that read
tokens at leaves only (``tree_rnn``, ``rntn``, ``tree_fc``) see the operator as a
leaf: ``(op a b)`` becomes ``[op, [a, b]]``; cells that ignore the children's order
(``child_sum``, ``tree_gru``, ``dag_rnn``, ``attention``) see ``op(L(a), R(b))``
with unary position nodes (otherwise ``a - b`` and ``b - a`` look alike). The extra
nodes are unlabelled (masked out of the loss) and counted in nodes/s.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
import pathlib
import random
import sysconfig
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recjax as rj
from recjax import data as rdata
from recjax import nn
from recjax.train import (
    CHECKPOINT_FILE,
    _saved_epochs,
    batches,
    binary_root_accuracy,
    fit,
    masked_mean,
    node_accuracy,
    root_accuracy,
)

# ---------------------------------------------------------------------- vocabulary

OPERATORS = ("+", "-", "*")
DIGITS = tuple(str(d) for d in range(10))
#: One shared vocabulary: digits are tokens 0-9, operators 10, 11, 12.
VOCAB = DIGITS + OPERATORS
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10
#: Extra tokens of the encodings for the other models (see ``encode``): the node that
#: joins the two operands, and the left and right position nodes.
PAIR, LEFT, RIGHT = len(VOCAB), len(VOCAB) + 1, len(VOCAB) + 2
MODEL_VOCAB = len(VOCAB) + 3

# ---------------------------------------------------------------------- the shipped data

DATA_SEED = 0
SHALLOW_SIZE, SHALLOW_DEPTH = 7000, 4  # training part 1: depth 1-4
DEEP_SIZE, DEEP_MIN_DEPTH = 7000, 5  # training part 2: depth 5-MAX_DEPTH
MAX_DEPTH = 6
TRAIN_SIZE = SHALLOW_SIZE + DEEP_SIZE
TEST_SIZE, TEST_MIN_DEPTH = 1000, 2  # depth 2-MAX_DEPTH, none in the training file
TRAIN_FILE = "calc_train.txt"
TEST_FILE = "calc_test.txt"


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}.")


def _below(rng: random.Random, n: int) -> int:
    # Only rng.random() is used: Python guarantees its sequence for a given seed across
    # versions (unlike randrange, choice, shuffle), so the generator is exact.
    return int(rng.random() * n)


def _random_expression(rng: random.Random, depth: int, operators) -> tuple[str, int]:
    """An expression of exactly ``depth`` operator levels (0: a digit) and its value."""
    if depth == 0:
        d = _below(rng, 10)
        return str(d), d
    op = operators[_below(rng, len(operators))]
    other = _below(rng, depth)  # depth of the shallower side: 0 .. depth - 1
    left, right = (depth - 1, other) if _below(rng, 2) else (other, depth - 1)
    ls, lv = _random_expression(rng, left, operators)
    rs, rv = _random_expression(rng, right, operators)
    return f"({op} {ls} {rs})", _apply(op, lv, rv)


def _text_depth(expr: str) -> int:
    """Depth of an expression from its text: the deepest bracket nesting."""
    depth = deepest = 0
    for ch in expr:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def generate_expressions(
    n: int,
    max_depth: int,
    seed: int,
    operators: Sequence[str] = OPERATORS,
    *,
    min_depth: int = 1,
    exclude: Sequence[str] | set[str] = (),
) -> list[str]:
    """``n`` distinct random expressions as data-file lines ``"<value>\\t<expression>"``.

    Each expression's depth (operator levels on its longest path) is drawn uniformly
    from ``min_depth .. max_depth``; one child of every operator continues the longest
    path, the other gets a uniform smaller depth; operators are drawn uniformly from
    ``operators``, digits from 0-9. A duplicate of an earlier expression, or an
    expression in ``exclude``, is drawn again. Exact and reproducible: it depends only
    on the arguments (it uses only ``random.Random(seed).random()``, whose sequence
    Python keeps across versions), and the first ``k`` lines of a call are the lines of
    the same call with ``n = k``.

    Example:
      >>> generate_expressions(2, 2, seed=0)
      ['-5\\t(* 5 (- 4 5))', '-8\\t(- (- 9 8) 9)']
      >>> [line.split("\\t")[1] for line in generate_expressions(2, 3, seed=0, min_depth=3)]
      ['(* (- 3 4) (- (+ 2 9) (* 3 7)))', '(* (- 9 4) (* (- 3 8) 6))']
    """
    if not 1 <= min_depth <= max_depth:
        raise ValueError(
            f"need 1 <= min_depth <= max_depth; got min_depth={min_depth}, max_depth={max_depth}."
        )
    repeated = sorted({op for op in operators if list(operators).count(op) > 1})
    if repeated:
        raise ValueError(
            f"operators lists {', '.join(map(repr, repeated))} more than once; list each "
            "operator once (they are drawn uniformly)."
        )
    at_most = [10]  # distinct expressions of depth <= d, for d = 0, 1, ...
    for _ in range(max_depth):
        at_most.append(10 + len(operators) * at_most[-1] ** 2)
    available = at_most[max_depth] - at_most[min_depth - 1]
    exclude = set(exclude)
    taken = sum(min_depth <= _text_depth(e) <= max_depth for e in exclude)
    if n > available - taken:
        depths = f"{min_depth}-{max_depth}"
        raise ValueError(
            f"there are only {available} distinct expressions of depth {depths}"
            + (f", {taken} of them excluded." if taken else ".")
        )
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    lines = []
    while len(lines) < n:
        depth = min_depth + _below(rng, max_depth - min_depth + 1)
        text, value = _random_expression(rng, depth, operators)
        if text not in seen:
            seen.add(text)
            lines.append(f"{value}\t{text}")
    return lines


@functools.lru_cache(maxsize=1)
def shipped_lines() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The lines of the shipped training and test files: how they were made.

    Training: ``SHALLOW_SIZE`` expressions of depth 1-``SHALLOW_DEPTH`` (seed
    ``DATA_SEED``), then ``DEEP_SIZE`` of depth ``DEEP_MIN_DEPTH``-``MAX_DEPTH`` (seed
    ``DATA_SEED + 1``). Test: ``TEST_SIZE`` of depth ``TEST_MIN_DEPTH``-``MAX_DEPTH``
    (seed ``DATA_SEED + 2``), none of them in the training set.
    """
    shallow = generate_expressions(SHALLOW_SIZE, SHALLOW_DEPTH, DATA_SEED)
    deep = generate_expressions(DEEP_SIZE, MAX_DEPTH, DATA_SEED + 1, min_depth=DEEP_MIN_DEPTH)
    train = shallow + deep
    test = generate_expressions(
        TEST_SIZE,
        MAX_DEPTH,
        DATA_SEED + 2,
        min_depth=TEST_MIN_DEPTH,
        exclude={line.split("\t")[1] for line in train},
    )
    return tuple(train), tuple(test)


def write_data_files(directory: str | pathlib.Path) -> None:
    """Writes the shipped data files (how ``recjax/data/calc_*.txt`` were made)."""
    train, test = shipped_lines()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in ((TRAIN_FILE, train), (TEST_FILE, test)):
        (directory / name).write_text("".join(line + "\n" for line in part), encoding="utf-8")


def read_data_file(name: str) -> str:
    """The text of a shipped data file, located with ``importlib.resources``."""
    path = importlib.resources.files("recjax").joinpath("data").joinpath(name)
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------- parsing


def parse_expression(text: str) -> rj.Tree:
    """Parses a prefix bracket expression into an ``rj.Tree`` (iterative, no recursion).

    Leaves have data ``{"token": digit}``, operator nodes ``{"token": TOKEN_ID[op]}``
    and two children.

    Example:
      >>> t = parse_expression("(+ 3 (* 2 4))")
      >>> t.data, [c.data["token"] for c in t.children], evaluate_tree(t)
      ({'token': 10}, [3, 12], 11)
    """
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    stack: list[list] = []  # open brackets: [operator token or None, children]
    result = None

    def fail(why):
        raise ValueError(f"cannot parse expression {text!r}: {why}.")

    def attach(tree):
        nonlocal result
        if stack:
            if stack[-1][0] is None:
                fail("an operand comes before the operator")
            if len(stack[-1][1]) == 2:
                fail("an operator has more than two operands")
            stack[-1][1].append(tree)
        elif result is None:
            result = tree
        else:
            fail("text after the end of the expression")

    for tok in tokens:
        if tok == "(":
            if result is not None:
                fail("text after the end of the expression")
            stack.append([None, []])
        elif tok == ")":
            if not stack:
                fail("unbalanced ')'")
            op, kids = stack.pop()
            if op is None or len(kids) != 2:
                fail("each bracket must hold an operator and exactly two operands")
            attach(rj.Tree({"token": op}, kids))
        elif tok in OPERATORS:
            if not stack or stack[-1][0] is not None or stack[-1][1]:
                fail(f"operator {tok!r} must come first inside a bracket")
            stack[-1][0] = TOKEN_ID[tok]
        elif tok in DIGITS:
            attach(rj.Tree({"token": TOKEN_ID[tok]}))
        else:
            fail(f"unknown token {tok!r}")
    if stack:
        fail("unbalanced '('")
    if result is None:
        fail("empty expression")
    return result


def _postorder(tree: rj.Tree) -> list[rj.Tree]:
    order, stack = [], [tree]
    while stack:
        t = stack.pop()
        order.append(t)
        stack.extend(t.children)
    return order[::-1]  # every node after its children


def evaluate_tree(tree: rj.Tree) -> int:
    """The exact integer value of a parsed expression (iterative)."""
    value: dict[int, int] = {}
    for t in _postorder(tree):
        tok = VOCAB[t.data["token"]]
        if t.is_leaf:
            value[id(t)] = int(tok)
        else:
            a, b = (value[id(c)] for c in t.children)
            value[id(t)] = _apply(tok, a, b)
    return value[id(tree)]


def expression_to_string(tree: rj.Tree) -> str:
    """The bracket form of a parsed expression; inverse of ``parse_expression``."""
    text: dict[int, str] = {}
    for t in _postorder(tree):
        tok = VOCAB[t.data["token"]]
        if t.is_leaf:
            text[id(t)] = tok
        else:
            text[id(t)] = f"({tok} " + " ".join(text[id(c)] for c in t.children) + ")"
    return text[id(tree)]


def tree_depth(tree: rj.Tree) -> int:
    """Operator levels on the longest root-to-leaf path (0 for a digit)."""
    depth: dict[int, int] = {}
    for t in _postorder(tree):
        depth[id(t)] = 0 if t.is_leaf else 1 + max(depth[id(c)] for c in t.children)
    return depth[id(tree)]


def parse_lines(text: str) -> tuple[list[rj.Tree], np.ndarray]:
    """Parses data-file text into trees and their labels (value mod 10).

    Checks every stated value against the exact evaluation of its expression.
    """
    trees, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        value_text, sep, expr = line.partition("\t")
        if not sep:
            raise ValueError(f"line {number}: expected '<value>\\t<expression>', got {line!r}.")
        try:
            tree = parse_expression(expr)
            value = int(value_text)
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
        if evaluate_tree(tree) != value:
            raise ValueError(
                f"line {number}: {expr} evaluates to {evaluate_tree(tree)}, not {value}."
            )
        trees.append(tree)
        labels.append(value % NUM_CLASSES)
    return trees, np.asarray(labels, dtype=np.int32)


def load_dataset(name: str, limit: int | None = None) -> tuple[list[rj.Tree], np.ndarray]:
    """The trees and labels (value mod 10) of a shipped data file (its first ``limit``)."""
    lines = read_data_file(name).splitlines()
    return parse_lines("\n".join(lines[:limit]))


# ---------------------------------------------------------------------- node labels, encodings

#: How each model of ``MODELS`` is given a calculator tree (see ``encode``).
ENCODINGS = ("native", "operator-leaf", "positional")


def encode(tree: rj.Tree, encoding: str = "native") -> rj.Tree:
    """A parsed expression with every node labelled by its value mod 10 (iterative).

    Node data becomes ``{"token": int32, "label": int32}``. ``"native"`` keeps the
    tree's shape. ``"operator-leaf"`` (for cells that read tokens at leaves only)
    turns ``(op a b)`` into ``[op, [a, b]]``: the top node (token ``PAIR``) carries
    the label, the operator is a leaf, and the inner node (token ``PAIR``) joins the
    operands. ``"positional"`` (for cells that ignore the order of the children) turns
    ``(op a b)`` into ``op(L(a), R(b))`` with unary nodes of tokens ``LEFT`` and
    ``RIGHT``. Added nodes are labelled -1 (no target).

    Example:
      >>> t = encode(parse_expression("(- 2 5)"), "positional")
      >>> [(int(n.data["token"]), int(n.data["label"])) for n in [t, *t.children]]
      [(11, 7), (14, -1), (15, -1)]
      >>> [int(c.data["label"]) for c in t.children[0].children]
      [2]
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}.")
    i32 = np.int32
    value: dict[int, int] = {}
    built: dict[int, rj.Tree] = {}
    for t in _postorder(tree):
        token = int(t.data["token"])
        if t.is_leaf:
            value[id(t)] = int(VOCAB[token])
            built[id(t)] = rj.Tree({"token": i32(token), "label": i32(value[id(t)])})
            continue
        a, b = t.children
        value[id(t)] = _apply(VOCAB[token], value[id(a)], value[id(b)]) % NUM_CLASSES
        label = i32(value[id(t)])
        ka, kb = built.pop(id(a)), built.pop(id(b))
        if encoding == "native":
            node = rj.Tree({"token": i32(token), "label": label}, [ka, kb])
        elif encoding == "operator-leaf":
            pair = rj.Tree({"token": i32(PAIR), "label": i32(-1)}, [ka, kb])
            op = rj.Tree({"token": i32(token), "label": i32(-1)})
            node = rj.Tree({"token": i32(PAIR), "label": label}, [op, pair])
        else:
            left = rj.Tree({"token": i32(LEFT), "label": i32(-1)}, [ka])
            right = rj.Tree({"token": i32(RIGHT), "label": i32(-1)}, [kb])
            node = rj.Tree({"token": i32(token), "label": label}, [left, right])
        built[id(t)] = node
    return built[id(tree)]


# ---------------------------------------------------------------------- models


class Model(NamedTuple):
    """A model of ``recjax.nn`` as the demo uses it."""

    fn: Any  # the @rj.recursive function: returns h, or (h, c) for the Tree-LSTMs
    init: Callable  # init(key, vocab, embed, hidden) -> cell parameters
    encoding: str  # how calc trees are given to it (see ``encode``)
    title: str


MODELS = {
    "tree_lstm": Model(
        nn.tree_lstm,
        lambda k, v, e, h: nn.init_tree_lstm(k, v, e, h, arity=2),
        "native",
        "binary Tree-LSTM (Tai et al. 2015, N-ary with N = 2)",
    ),
    "child_sum": Model(
        nn.child_sum_tree_lstm, nn.init_child_sum_tree_lstm, "positional", "Child-Sum Tree-LSTM"
    ),
    "tree_gru": Model(nn.tree_gru, nn.init_tree_gru, "positional", "child-sum Tree-GRU"),
    "tree_rnn": Model(
        nn.tree_rnn, nn.init_tree_rnn, "operator-leaf", "tree RNN (Socher et al. 2011)"
    ),
    "rntn": Model(
        nn.rntn,
        lambda k, v, e, h: nn.init_rntn(k, v, h),
        "operator-leaf",
        "RNTN (Socher et al. 2013)",
    ),
    "tree_fc": Model(
        nn.tree_fc, lambda k, v, e, h: nn.init_tree_fc(k, v, h), "operator-leaf", "TreeFC"
    ),
    "dag_rnn": Model(nn.dag_rnn, nn.init_dag_rnn, "positional", "DAG-RNN (mean of children)"),
    "attention": Model(
        nn.child_attention, nn.init_child_attention, "positional", "attention over children"
    ),
}


def init_params(model: str, key, vocab: int, embed: int, hidden: int, classes: int) -> dict:
    """``{"cell": the model's parameters, "W_out": [hidden, classes], "b_out": [classes]}``."""
    k_cell, k_out = jax.random.split(key)
    return {
        "cell": MODELS[model].init(k_cell, vocab, embed, hidden),
        "W_out": jax.random.normal(k_out, (hidden, classes)) * hidden**-0.5,
        "b_out": jnp.zeros(classes),
    }


def node_logits(model: str, params, forest) -> jax.Array:
    """``[num_nodes, classes]`` class scores from every node's hidden state."""
    return _logits(params, MODELS[model].fn.batch(params["cell"], forest))


def root_logits(model: str, params, forest) -> jax.Array:
    """``[len(forest.roots), classes]``: ``node_logits(...)[forest.roots]``, computed at
    the roots only (``.roots``: no per-node output in node order)."""
    return _logits(params, MODELS[model].fn.roots(params["cell"], forest))


def _logits(params, out) -> jax.Array:
    h = out[0] if isinstance(out, tuple) else out
    return h @ params["W_out"] + params["b_out"][None, :]


# Loss, metric and optimizer factories are cached: ``fit`` compiles its step once per
# (loss_fn, optimizer, batch shape), so equal settings must give the same objects.


@functools.cache
def node_loss(model: str) -> Callable:
    """Mean cross entropy over the labelled real nodes (``label >= 0``)."""

    def loss_fn(params, forest, labels):
        y = forest.data["label"]
        ce = optax.softmax_cross_entropy_with_integer_labels(
            node_logits(model, params, forest), jnp.maximum(y, 0)
        )
        return masked_mean(ce, forest.node_mask & (y >= 0))

    return loss_fn


@functools.cache
def root_loss(model: str, labels_from_data: bool) -> Callable:
    """Mean cross entropy at the real roots; targets from the node data or ``labels``."""

    def loss_fn(params, forest, labels):
        y = forest.data["label"][forest.roots] if labels_from_data else labels
        logits = root_logits(model, params, forest)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return masked_mean(ce, forest.root_mask)

    return loss_fn


@functools.cache
def calc_metrics(model: str, depths: tuple[int, ...]) -> Callable:
    """Root accuracy, and root accuracy at each depth (``labels["depth"]``)."""

    def eval_fn(params, forest, labels):
        logits = root_logits(model, params, forest)
        y = forest.data["label"][forest.roots]
        out = {"acc": root_accuracy(logits, y, forest)}
        hit = jnp.argmax(logits, axis=-1) == y
        for d in depths:
            keep = forest.root_mask & (labels["depth"] == d)
            out[f"d{d}"] = (jnp.sum(hit & keep, dtype=jnp.int32), jnp.sum(keep, dtype=jnp.int32))
        return out

    return eval_fn


@functools.cache
def sst_metrics(model: str) -> Callable:
    """Fine-grained and binary root accuracy, and accuracy over every node."""

    def eval_fn(params, forest, labels):
        logits = node_logits(model, params, forest)
        y = forest.data["label"]
        roots = forest.roots
        return {
            "fine": root_accuracy(logits[roots], y[roots], forest),
            "binary": binary_root_accuracy(logits[roots], y[roots], forest),
            "nodes": node_accuracy(logits, y, forest),
        }

    return eval_fn


@functools.cache
def label_metrics(model: str) -> Callable:
    """Root accuracy against per-root ``labels``."""

    def eval_fn(params, forest, labels):
        logits = root_logits(model, params, forest)
        return {"acc": root_accuracy(logits, labels, forest)}

    return eval_fn


@functools.cache
def make_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam with gradient clipping (global norm 1), which tames Adam's late loss spikes."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def _take_rows(a, idx):
    return np.asarray(a)[idx]


def evaluate(eval_fn, params, trees, labels=None, batch_size: int = 64) -> dict:
    """``{name: sum / count}`` of ``eval_fn``'s pairs over padded batches of ``trees``."""
    step = jax.jit(eval_fn)
    sums: dict[str, list[float]] = {}
    for b in batches(trees, batch_size):
        rows = None
        if labels is not None:
            pad = len(b.forest.roots) - b.indices.size
            idx = np.concatenate([b.indices, np.full(pad, b.indices[0], b.indices.dtype)])
            rows = jax.tree.map(functools.partial(_take_rows, idx=idx), labels)
        for name, (total, count) in jax.device_get(step(params, b.forest, rows)).items():
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] += float(total)
            s[1] += float(count)
    return {name: (t / c if c else float("nan")) for name, (t, c) in sums.items()}


# ---------------------------------------------------------------------- training


def _spread(n: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n)`` (all of them without a limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


CONFIG_FILE = "demo_config.json"


def train(
    args,
    config: dict,
    loss_fn: Callable,
    params,
    trees: Sequence[rj.Tree],
    *,
    eval_fn: Callable,
    eval_trees: Sequence[rj.Tree],
    labels=None,
    eval_labels=None,
    show: dict[str, str],
):
    """Runs ``fit`` one epoch at a time (resuming from its checkpoint) and prints each.

    ``config`` (the settings that define the run; JSON) is saved beside the
    checkpoint, and a checkpoint written with other settings is refused. ``show``
    maps the metric names to print to column titles.
    """
    ckpt = pathlib.Path(args.checkpoint_dir)
    config_path = ckpt / CONFIG_FILE
    # fit is called once per epoch below, and walks Tree objects at every call (0.7-1.2 s
    # for the calc task's 14,000 trees); Forests built once are cut with numpy (0.01 s).
    trees, eval_trees = _as_forest(trees), _as_forest(eval_trees)
    common = {
        "optimizer": make_optimizer(args.lr),
        "batch_size": args.batch_size,
        "labels": labels,
        "seed": args.seed,
        "eval_fn": eval_fn,
        "eval_trees": eval_trees,
        "eval_labels": eval_labels,
        "checkpoint_dir": ckpt,
        "progress": not args.quiet,
    }
    resume = not args.restart
    if resume and config_path.exists():
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        if saved != config:
            diff = ", ".join(
                f"{k}: {saved.get(k)!r} there, {config.get(k)!r} now"
                for k in sorted(set(saved) | set(config))
                if saved.get(k) != config.get(k)
            )
            raise SystemExit(
                f"the checkpoint in {ckpt} was written with other settings ({diff}). "
                "Pass --restart to start over, or another --checkpoint-dir."
            )
    try:
        done = _saved_epochs(ckpt) if resume else 0
        result = fit(loss_fn, params, trees, epochs=done, resume=resume, **common)
    except ValueError as e:
        raise SystemExit(f"cannot resume from {ckpt}: {e}\nPass --restart to start over.") from None
    ckpt.mkdir(parents=True, exist_ok=True)
    if not resume:  # an interrupted --restart must not leave the old run's checkpoint
        (ckpt / CHECKPOINT_FILE).unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    widths = {k: max(7, len(t)) for k, t in show.items()}
    header = f"{'epoch':>5}  {'loss':>7}  " + "  ".join(f"{t:>{widths[k]}}" for k, t in show.items())
    print(header + f"  {'nodes/s':>9}  {'seconds':>7}", flush=True)

    def row(h, note=""):
        cells = "  ".join(
            f"{h['metrics'].get(k, float('nan')):>{widths[k]}.3f}" for k in show
        )
        print(
            f"{h['epoch']:>5}  {h['loss']:>7.4f}  {cells}  {h['nodes_per_s']:>9,.0f}  "
            f"{h['seconds']:>7.1f}{note}",
            flush=True,
        )

    done = len(result.history)
    if done:
        print(f"resumed from {ckpt / CHECKPOINT_FILE}: {done} epoch(s) done before")
        for h in result.history:
            row(h, "  (checkpoint)")
    if done >= args.epochs:
        print(f"the checkpoint already holds {done} epoch(s); --epochs {args.epochs}: nothing to train")
    for epoch in range(done + 1, args.epochs + 1):
        result = fit(loss_fn, params, trees, epochs=epoch, resume=True, **common)
        row(result.history[-1])
    return result


def _as_forest(trees: Sequence[rj.Tree]):
    """One Forest of ``trees`` for ``fit`` (the list itself when trees share nodes)."""
    forest = rj.Forest.from_trees(trees)
    return trees if forest._meta.has_cross_tree_node else forest


def _summary(history) -> dict:
    """Time and throughput over the epochs trained in this run and before."""
    rates = [h["nodes_per_s"] for h in history]
    return {
        "epochs": len(history),
        "train_s": float(sum(h["seconds"] for h in history)),
        "median_nodes_per_s": float(np.median(rates)) if rates else float("nan"),
    }


# ---------------------------------------------------------------------- tasks


def run_calc(args) -> dict:
    model = MODELS[args.model]
    train_lines, test_lines = (read_data_file(f).splitlines() for f in (TRAIN_FILE, TEST_FILE))
    train_lines = [train_lines[i] for i in _spread(len(train_lines), args.limit)]
    test_lines = [test_lines[i] for i in _spread(len(test_lines), args.limit)]
    train_trees, _ = parse_lines("\n".join(train_lines))
    test_trees, test_labels = parse_lines("\n".join(test_lines))
    depths = np.asarray([tree_depth(t) for t in test_trees], dtype=np.int32)
    train_depths = np.asarray([tree_depth(t) for t in train_trees])
    train_trees = [encode(t, model.encoding) for t in train_trees]
    test_trees = [encode(t, model.encoding) for t in test_trees]
    present = tuple(int(d) for d in np.unique(depths))

    print(
        f"recjax demo, task calc, model {args.model}: {model.title}, predicting the value "
        f"MODULO 10 of arithmetic expressions; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}"
    )
    print(
        f"train: {len(train_trees)} expressions of depth {train_depths.min()}-{train_depths.max()} "
        f"({TRAIN_FILE}); test: {len(test_trees)} held-out expressions of depth "
        f"{present[0]}-{present[-1]} ({TEST_FILE})"
    )
    print(
        f"supervision: {'every node (each subexpression value mod 10)' if args.supervise == 'nodes' else 'roots only'}; "
        f"trees given as: {model.encoding}; hidden {args.hidden}, embed {args.embed}, "
        f"batch {args.batch_size}, adam lr {args.lr}, clip 1.0"
    )
    print(f"checkpoint: {args.checkpoint_dir}", flush=True)

    vocab = len(VOCAB) if model.encoding == "native" else MODEL_VOCAB
    params = init_params(args.model, jax.random.key(args.seed), vocab, args.embed, args.hidden, NUM_CLASSES)
    loss_fn = node_loss(args.model) if args.supervise == "nodes" else root_loss(args.model, True)
    config = _config(args, "model", "supervise")
    show = {"acc": "test acc", **{f"d{d}": f"depth {d}" for d in present}}
    result = train(
        args, config, loss_fn, params, train_trees,
        eval_fn=calc_metrics(args.model, present), eval_trees=test_trees,
        eval_labels={"depth": depths}, show=show,
    )
    metrics = result.history[-1]["metrics"] if result.history else {}
    counts = {d: int(np.sum(depths == d)) for d in present}
    by_depth = {d: metrics.get(f"d{d}", float("nan")) for d in present}
    majority = float(np.bincount(test_labels).max() / len(test_labels))
    print(
        f"final test accuracy: {metrics.get('acc', float('nan')):.3f} on {len(test_trees)} "
        "held-out expressions (by depth: "
        + ", ".join(f"{d}: {by_depth[d]:.3f} of {counts[d]}" for d in present)
        + f"; majority class {majority:.3f})"
    )
    return {
        "accuracy": metrics.get("acc", float("nan")),
        "accuracy_by_depth": by_depth,
        "majority": majority,
        "history": result.history,
        **_summary(result.history),
    }


def _map_data(tree: rj.Tree, fn: Callable[[rj.Tree], dict]) -> rj.Tree:
    """A copy of ``tree`` whose nodes have data ``fn(node)`` (iterative)."""
    built: dict[int, rj.Tree] = {}
    for t in _postorder(tree):
        built[id(t)] = rj.Tree(fn(t), [built.pop(id(c)) for c in t.children])
    return built[id(tree)]


def _sst_node(t: rj.Tree) -> dict:
    """SST node data for the Tree-LSTM: internal nodes (no word) get the padding id."""
    token = t.data["token"] if t.is_leaf else np.int32(rdata.Vocab.PAD)
    return {"token": token, "label": t.data["label"]}


def _ast_node(t: rj.Tree) -> dict:
    return {"token": t.data["kind"]}  # the models read "token"


def _glove_dim(path) -> int:
    """The vector size of a GloVe (or word2vec text) file, from its first line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        fields = f.readline().rstrip().split(" ")
    if len(fields) == 2 and all(x.isdigit() for x in fields):
        return int(fields[1])
    return len(fields) - 1


def run_sst(args) -> dict:
    directory = pathlib.Path(args.data) if args.data else rdata.SST_SAMPLE_DIR
    if not directory.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (the sst task reads its train.txt, dev.txt and test.txt).")
    sample = directory.resolve() == pathlib.Path(rdata.SST_SAMPLE_DIR).resolve()
    splits = rdata.load_sst(directory)
    # Internal nodes have no word; they read the padding id (never a word) as input.
    train_trees, dev_trees, test_trees = (
        [_map_data(t, _sst_node) for t in split[: args.limit]]
        for split in (splits.train, splits.dev, splits.test)
    )
    for name, split in (("train", train_trees), ("dev", dev_trees), ("test", test_trees)):
        if not split:  # found now, not after the training
            raise SystemExit(f"{directory / (name + '.txt')} holds no trees; the sst task needs all three splits.")
    print(
        f"recjax demo, task sst: binary Tree-LSTM (Tai et al. 2015, N-ary with N = 2), every "
        f"node labelled 0-4; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    if sample:
        print(
            "data: the SYNTHETIC sample shipped with recjax (recjax.data.SST_SAMPLE_DIR), NOT "
            "the Stanford Sentiment Treebank: its figures mean nothing. Pass --data DIR (the "
            "folder holding trees/ of trainDevTestTrees_PTB.zip) for the real data."
        )
    else:
        print(f"data: {directory}")
    embed = args.embed
    if args.glove:
        embed = _glove_dim(args.glove)
    print(
        f"train/dev/test: {len(train_trees)}/{len(dev_trees)}/{len(test_trees)} trees; vocabulary "
        f"{len(splits.vocab)} words; word vectors {'from ' + args.glove if args.glove else 'random'} "
        f"({embed}-d); hidden {args.hidden}, batch {args.batch_size}, adam lr {args.lr}, clip 1.0"
    )
    print(f"checkpoint: {args.checkpoint_dir}", flush=True)
    params = init_params("tree_lstm", jax.random.key(args.seed), len(splits.vocab), embed, args.hidden, 5)
    if args.glove:
        params["cell"]["emb"] = jnp.asarray(rdata.load_glove(args.glove, splits.vocab, embed, seed=args.seed))
    config = _config(args, "data", "glove")
    eval_fn = sst_metrics("tree_lstm")
    result = train(
        args, config, node_loss("tree_lstm"), params, train_trees,
        eval_fn=eval_fn, eval_trees=dev_trees,
        show={"fine": "dev fine", "binary": "dev bin", "nodes": "dev node"},
    )
    dev = result.history[-1]["metrics"] if result.history else {}
    test = evaluate(eval_fn, result.params, test_trees, batch_size=args.batch_size)
    print(
        f"final: dev fine-grained {dev.get('fine', float('nan')):.3f}, binary "
        f"{dev.get('binary', float('nan')):.3f}; test fine-grained {test['fine']:.3f}, binary "
        f"{test['binary']:.3f}, all nodes {test['nodes']:.3f}"
        + ("  (synthetic sample, not SST)" if sample else "")
    )
    return {
        "dev": dev,
        "test": test,
        "synthetic_sample": sample,
        "history": result.history,
        **_summary(result.history),
    }


def _ast_files(data: str | None) -> tuple[list[pathlib.Path], str]:
    if data:
        path = pathlib.Path(data)
        if not path.exists():
            raise SystemExit(f"--data {data}: no such file or folder.")
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        return files, str(path)
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py")), f"the standard library's top-level modules ({stdlib})"


def run_ast(args) -> dict:
    files, where = _ast_files(args.data)
    test_files = files[3::4]
    train_files = [f for i, f in enumerate(files) if i % 4 != 3]
    if not train_files or not test_files:
        raise SystemExit(f"task ast needs at least 4 .py files (every fourth is held out); {where} has {len(files)}.")
    task = rdata.function_name_task(train_files, num_classes=args.classes, skip_errors=True)
    held = rdata.function_name_task(test_files, num_classes=10**9, skip_errors=True)
    class_id = {w: i for i, w in enumerate(task.classes)}
    keep = [i for i, c in enumerate(held.labels) if held.classes[c] in class_id]
    test_trees = [_map_data(held.trees[i], _ast_node) for i in keep[: args.limit]]
    test_labels = np.asarray([class_id[held.classes[held.labels[i]]] for i in keep], np.int32)[: args.limit]
    train_trees = [_map_data(t, _ast_node) for t in task.trees[: args.limit]]
    train_labels = task.labels[: args.limit]
    if not train_trees or not test_trees:
        raise SystemExit(f"task ast: no labelled functions to train or test on in {where}.")
    majority_class = int(np.bincount(train_labels, minlength=len(task.classes)).argmax())
    majority = float(np.mean(test_labels == majority_class))
    print(
        f"recjax demo, task ast: Child-Sum Tree-LSTM over Python ASTs (node kinds only), "
        f"predicting the first word of a function's name; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}"
    )
    print(
        f"data: {where}: {len(train_files)} training files, {len(test_files)} held-out files; "
        f"{len(train_trees)} training / {len(test_trees)} test functions; classes: "
        + ", ".join(task.classes)
    )
    print(
        f"hidden {args.hidden}, embed {args.embed}, batch {args.batch_size}, adam lr {args.lr}, "
        f"clip 1.0; checkpoint: {args.checkpoint_dir}",
        flush=True,
    )
    params = init_params("child_sum", jax.random.key(args.seed), len(rdata.AST_KINDS), args.embed, args.hidden, len(task.classes))
    config = _config(args, "data", "classes")
    result = train(
        args, config, root_loss("child_sum", False), params, train_trees, labels=train_labels,
        eval_fn=label_metrics("child_sum"), eval_trees=test_trees, eval_labels=test_labels,
        show={"acc": "test acc"},
    )
    acc = result.history[-1]["metrics"]["acc"] if result.history else float("nan")
    print(
        f"final test accuracy: {acc:.3f} on {len(test_trees)} functions of held-out files; "
        f"majority class ({task.classes[majority_class]!r}): {majority:.3f}"
    )
    return {
        "accuracy": acc,
        "majority": majority,
        "classes": task.classes,
        "history": result.history,
        **_summary(result.history),
    }


TASKS = {
    "calc": (
        run_calc,
        (
            "a binary Tree-LSTM predicts the value MODULO 10 of arithmetic expressions "
            "(digits 0-9, + - *; trained on depth 1-6, tested on held-out expressions of "
            "depth 2-6; data shipped with recjax)"
        ),
    ),
    "sst": (
        run_sst,
        (
            "a binary Tree-LSTM labels every node of sentiment trees 0-4 (SST format); "
            "reports fine-grained and binary root accuracy. Default data: a tiny SYNTHETIC "
            "sample, not SST; --data DIR for the real treebank"
        ),
    ),
    "ast": (
        run_ast,
        (
            "a Child-Sum Tree-LSTM predicts the first word of a function's name from its "
            "Python AST (standard-library files, every fourth held out); reports accuracy "
            "and the majority-class baseline"
        ),
    ),
}

#: Per-task defaults of the options left unset.
DEFAULTS = {
    "calc": {"epochs": 8, "batch_size": 128, "hidden": 64, "embed": 32, "lr": 1e-2,
             "model": "tree_lstm", "supervise": "nodes"},
    "sst": {"epochs": 10, "batch_size": 25, "hidden": 150, "embed": 300, "lr": 2e-3},
    "ast": {"epochs": 10, "batch_size": 64, "hidden": 64, "embed": 32, "lr": 5e-3, "classes": 10},
}
# Options that only some tasks read: given to another task, they are refused, not ignored.
TASK_OPTIONS = {"model": ("calc",), "supervise": ("calc",), "data": ("sst", "ast"),
                "glove": ("sst",), "classes": ("ast",)}


def _config(args, *keys) -> dict:
    names = ("task", "batch_size", "hidden", "embed", "lr", "seed", "limit") + keys
    return {k: getattr(args, k) for k in names}


# ---------------------------------------------------------------------- main


def _wrap(text: str, indent: int = 0, width: int = 88) -> str:
    return textwrap.fill(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _entry(name: str, text: str, indent: int = 2, column: int = 13) -> str:
    """``name`` then ``text`` wrapped in a column, like argparse's option list."""
    first = " " * indent + name.ljust(column - indent)
    return textwrap.fill(
        text, 88, initial_indent=first, subsequent_indent=" " * column
    )


def build_parser() -> argparse.ArgumentParser:
    parts = [
        _wrap(
            "Train a recursive neural network with recjax (recjax.train.fit) and print, per "
            "epoch, the training loss, evaluation accuracy, training nodes/s and seconds. A "
            "checkpoint is written after every epoch; rerunning the same command resumes."
        ),
        "tasks:\n" + "\n".join(_entry(name, what) for name, (_, what) in TASKS.items()),
        _wrap(
            "calc: the label of an expression is its value MODULO 10 (Python's %, so 0-9; -3 "
            "is class 7). Exact values do not suit a regression head (they reach 1.4e11 in "
            "the data: 12 exact digits, beyond float32), while + - * commute with % 10, so "
            "this target is exact and learnable at every depth. Every subexpression is "
            "labelled with its own value mod 10 (--supervise root: the roots only). Training: "
            "7,000 expressions of depth 1-4 and 7,000 of depth 5-6; accuracy is measured at "
            "the roots of 1,000 held-out expressions of depth 2-6 and reported by depth."
        ),
        "defaults by task (for the options not given):\n"
        + "\n".join(
            _entry(name, ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items()))
            for name, d in DEFAULTS.items()
        ),
        "models for --model (calc only):\n"
        + "\n".join(_entry(name, m.title) for name, m in MODELS.items()),
    ]
    parser = argparse.ArgumentParser(
        prog="python -m recjax.demo",
        description="\n\n".join(parts),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=tuple(TASKS), default="calc", help="what to train (default calc)")
    parser.add_argument("--model", choices=tuple(MODELS), help="calc: the model (default tree_lstm)")
    parser.add_argument("--epochs", type=int, help="total training epochs, counting resumed ones")
    parser.add_argument("--batch-size", type=int, help="trees per batch")
    parser.add_argument("--hidden", type=int, help="hidden size")
    parser.add_argument("--embed", type=int, help="token embedding size (sst with --glove: the vectors' size)")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling (default 0)")
    parser.add_argument(
        "--limit", type=int, metavar="N",
        help="use at most N training and N evaluation trees (calc: spread evenly over the "
        "files, keeping the depth mix; sst, ast: the first N of each split)",
    )
    parser.add_argument(
        "--checkpoint-dir", metavar="DIR",
        help="where fit writes its checkpoint (default ./recjax_checkpoints/<task>, "
        "./recjax_checkpoints/calc-<model> for another calc model)",
    )
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal)")
    parser.add_argument(
        "--supervise", choices=("nodes", "root"),
        help="calc: train on every subexpression's value (default) or on the roots only",
    )
    parser.add_argument(
        "--data", metavar="DIR",
        help="sst: the SST folder (holding trees/ or train.txt, dev.txt, test.txt; default: "
        "the synthetic sample); ast: a folder of .py files (default: the standard library's "
        "top-level modules)",
    )
    parser.add_argument("--glove", metavar="FILE", help="sst: initialise word vectors from this GloVe text file")
    parser.add_argument("--classes", type=int, help="ast: number of first words to tell apart (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the demo; returns the task's results (history, final metrics, timing)."""
    args = build_parser().parse_args(argv)
    for key, tasks in TASK_OPTIONS.items():
        if getattr(args, key) is not None and args.task not in tasks:
            only = " and ".join(f"--task {t}" for t in tasks)
            raise SystemExit(f"--{key} applies to {only} only; this is --task {args.task}.")
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("epochs", "batch_size", "hidden", "embed", "classes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1.")
    if not 0 < args.lr < float("inf"):  # NaN fails too
        raise SystemExit(f"--lr must be a positive number; got {args.lr}.")
    if args.seed < 0:
        raise SystemExit(f"--seed must be at least 0; got {args.seed}.")
    if args.checkpoint_dir is None:
        name = args.task if args.task != "calc" or args.model == "tree_lstm" else f"calc-{args.model}"
        args.checkpoint_dir = os.path.join("recjax_checkpoints", name)
    start = time.perf_counter()
    result = TASKS[args.task][0](args)
    result["total_s"] = time.perf_counter() - start
    result["checkpoint_dir"] = args.checkpoint_dir
    print(
        f"total time: {result['total_s']:.1f} s ({result['epochs']} epochs; median "
        f"{result['median_nodes_per_s']:,.0f} training nodes/s)"
    )
    return result


if __name__ == "__main__":
    main()
