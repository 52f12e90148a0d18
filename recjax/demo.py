"""Demo: train a binary Tree-LSTM on the calculator task with recjax.

Run it with ``python -m recjax.demo`` (``--help`` lists the options). It trains on
data shipped with the package (``recjax/data/calc_train.txt`` and ``calc_test.txt``)
and prints, per epoch, the training loss, the held-out accuracy and the training
throughput in tree nodes per second.

The task. An example is an arithmetic expression over the digits 0-9 and the binary
operators ``+ - *``, written in prefix bracket form, e.g. ``(+ 3 (* 2 4))``. Its tree
has one node per digit (a leaf) and one node per operator (an internal node with two
children). The model reads the tree bottom-up with a binary Tree-LSTM (Tai et al.
2015) and predicts, from the root's hidden state through a linear softmax layer, the
value of the expression modulo 10 (Python's ``%``, so always 0-9; ``(- 2 5)`` is -3,
class 7). The loss is the mean cross entropy at the roots.

Data files hold one example per line: the exact integer value of the expression, a
tab, the expression. They were written once by ``write_data_files()``, i.e. by
``generate_expressions(TRAIN_SIZE + TEST_SIZE, MAX_DEPTH, DATA_SEED)``: the first
``TRAIN_SIZE`` lines are the training set, the rest the test set (all expressions
distinct, so no test expression is seen in training). The training set is large on
purpose: trained on the first 4,000 expressions only (``--limit 4000``, 30 epochs)
the model memorises them (training loss 0.02) and reaches only 0.31 test accuracy
(majority class: 0.16); 8,000 and 12,000 also fail to generalise (0.37, 0.48), while
with 16,000 it learns the arithmetic (0.95+ after 15-20 epochs).

Batching. Every batch is one ``rj.Forest``, built once before training. A jitted
function that takes a Forest compiles once per distinct shape, so the batches are
padded together with ``rj.Forest.pad_all``: they share one plan key, node count and
root count, hence one compiled train step, compiled before the first epoch. Padding
roots have weight 0 in the loss (``forest.root_mask``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import math
import pathlib
import random
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recjax as rj

# ---------------------------------------------------------------------- vocabulary

OPERATORS = ("+", "-", "*")
DIGITS = tuple(str(d) for d in range(10))
#: One shared vocabulary: digits are tokens 0-9, operators 10, 11, 12.
VOCAB = DIGITS + OPERATORS
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10

# ---------------------------------------------------------------------- the shipped data

DATA_SEED = 0
MAX_DEPTH = 4
TRAIN_SIZE = 16000
TEST_SIZE = 500
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


def generate_expressions(
    n: int, max_depth: int, seed: int, operators: Sequence[str] = OPERATORS
) -> list[str]:
    """``n`` distinct random expressions as data-file lines ``"<value>\\t<expression>"``.

    Each expression's depth (operator levels on its longest path) is drawn uniformly
    from ``1 .. max_depth``; one child of every operator continues the longest path, the
    other gets a uniform smaller depth; operators are drawn uniformly from
    ``operators``, digits from 0-9. A duplicate of an earlier expression is drawn again.
    Exact and reproducible: it depends only on the arguments (it uses only
    ``random.Random(seed).random()``, whose sequence Python keeps across versions).

    Example:
      >>> generate_expressions(2, 2, seed=0)
      ['-5\\t(* 5 (- 4 5))', '-8\\t(- (- 9 8) 9)']
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1; got {max_depth}.")
    at_most = 10  # distinct expressions of depth <= d, for d = 0, 1, ...
    for _ in range(max_depth):
        at_most = 10 + len(operators) * at_most**2
    if n > at_most - 10:
        raise ValueError(
            f"there are only {at_most - 10} distinct expressions of depth 1-{max_depth}."
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    lines = []
    while len(lines) < n:
        text, value = _random_expression(rng, 1 + _below(rng, max_depth), operators)
        if text not in seen:
            seen.add(text)
            lines.append(f"{value}\t{text}")
    return lines


def write_data_files(directory: str | pathlib.Path) -> None:
    """Writes the shipped data files (how ``recjax/data/*.txt`` were made)."""
    lines = generate_expressions(TRAIN_SIZE + TEST_SIZE, MAX_DEPTH, DATA_SEED)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in ((TRAIN_FILE, lines[:TRAIN_SIZE]), (TEST_FILE, lines[TRAIN_SIZE:])):
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
        tree = parse_expression(expr)
        value = int(value_text)
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


# ---------------------------------------------------------------------- the model


@rj.recursive
def tree_lstm(p, node):
    """Binary Tree-LSTM (Tai et al. 2015, N-ary with N = 2): returns ``(h, c)``."""
    x = p["emb"][node.data["token"]]
    if node.is_leaf:
        i, o, u = jnp.split(x @ p["W_leaf"] + p["b_leaf"], 3)
        c = jax.nn.sigmoid(i) * jnp.tanh(u)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c
    (hl, cl), (hr, cr) = [tree_lstm(p, child) for child in node.children]
    z = x @ p["W"] + jnp.concatenate([hl, hr]) @ p["U"] + p["b"]
    i, fl, fr, o, u = jnp.split(z, 5)
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + jax.nn.sigmoid(fl) * cl + jax.nn.sigmoid(fr) * cr
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def init_params(key, hidden: int = 64, embed: int = 32) -> dict:
    """Glorot-style initial parameters; forget-gate biases start at 1."""
    k = jax.random.split(key, 5)

    def dense(kk, n_in, n_out):
        return jax.random.normal(kk, (n_in, n_out)) * math.sqrt(1.0 / n_in)

    b = jnp.zeros(5 * hidden).at[hidden : 3 * hidden].set(1.0)  # fl, fr
    return {
        "emb": jax.random.normal(k[0], (len(VOCAB), embed)),
        "W_leaf": dense(k[1], embed, 3 * hidden),
        "b_leaf": jnp.zeros(3 * hidden),
        "W": dense(k[2], embed, 5 * hidden),
        "U": dense(k[3], 2 * hidden, 5 * hidden),
        "b": b,
        "W_out": dense(k[4], hidden, NUM_CLASSES),
        "b_out": jnp.zeros(NUM_CLASSES),
    }


def root_logits(params, forest):
    """``[num_roots, 10]`` class scores from the root hidden states."""
    h, _ = tree_lstm.batch(params, forest)
    return h[forest.roots] @ params["W_out"] + params["b_out"][None, :]


def loss_fn(params, forest, labels):
    """Mean cross entropy over the real roots (padding roots have weight 0)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(root_logits(params, forest), labels)
    weights = forest.root_mask.astype(ce.dtype)
    return jnp.sum(ce * weights) / jnp.sum(weights)


@jax.jit
def predict(params, forest):
    """The predicted class of every root."""
    return jnp.argmax(root_logits(params, forest), axis=-1)


def make_train_step(optimizer):
    @jax.jit
    def train_step(params, opt_state, forest, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, forest, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


# ---------------------------------------------------------------------- batching


class Batch(NamedTuple):
    forest: rj.Forest  # padded: shares its shape with every other batch
    labels: np.ndarray  # [len(forest.roots)] int32; 0 for padding roots
    num_real_nodes: int


def make_batches(trees, labels, batch_size: int, rng: np.random.Generator) -> list[Batch]:
    """Shuffles once and builds one ``rj.Forest`` per batch of about ``batch_size`` trees.

    ``rj.Forest.pad_all`` pads the batches to one shape, so all of them share one
    compiled program; the padding roots are False in ``forest.root_mask``.
    """
    order = rng.permutation(len(trees))
    groups = np.array_split(order, -(-len(trees) // batch_size))
    forests = rj.Forest.pad_all([rj.Forest.from_trees([trees[j] for j in g]) for g in groups])
    return [
        Batch(
            forest,
            np.concatenate([labels[g], np.zeros(len(forest.roots) - len(g), np.int32)]),
            int(np.count_nonzero(forest.node_mask)),
        )
        for g, forest in zip(groups, forests)
    ]


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recjax.demo",
        description=(
            "Train a binary Tree-LSTM with recjax on the calculator task: expression trees "
            "over the digits 0-9 and the operators + - * (depth 1-4, data shipped with the "
            "package). The model predicts the value of the expression MODULO 10 (a "
            "10-class classification; Python's %, so -3 is class 7) from the root's hidden "
            "state. Prints per epoch the mean training loss, the test accuracy on "
            f"{TEST_SIZE} held-out expressions and the training throughput in tree nodes "
            "per second."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="trees per batch")
    parser.add_argument("--hidden", type=int, default=64, help="Tree-LSTM hidden size")
    parser.add_argument("--embed", type=int, default=32, help="token embedding size")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="use only the first N training trees"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the demo; returns the per-epoch history and the final accuracy."""
    args = build_parser().parse_args(argv)
    for flag in ("epochs", "batch_size", "hidden", "embed"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1.")
    start = time.perf_counter()

    train_trees, train_labels = load_dataset(TRAIN_FILE, args.limit)
    test_trees, test_labels = load_dataset(TEST_FILE)
    batch_size = min(args.batch_size, len(train_trees))
    rng = np.random.default_rng(args.seed)
    batches = make_batches(train_trees, train_labels, batch_size, rng)
    test_forest = rj.Forest.from_trees(test_trees)
    num_train_nodes = sum(b.num_real_nodes for b in batches)
    padded_nodes = sum(b.forest.num_nodes for b in batches)

    params = init_params(jax.random.key(args.seed), args.hidden, args.embed)
    # Gradient clipping tames Adam's loss spikes once the training loss is near 0.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer)

    print(
        f"recjax demo: binary Tree-LSTM on the calculator task (value mod 10), "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(
        f"train: {len(train_trees)} expressions, {num_train_nodes} nodes, {len(batches)} "
        f"batches of {batch_size} (padded to {padded_nodes} nodes); test: "
        f"{len(test_trees)} expressions"
    )
    print(f"hidden {args.hidden}, embed {args.embed}, adam lr {args.lr}, clip 1.0", flush=True)

    # One compiled program per distinct batch structure: compile them all up front
    # (running one step on each, results discarded) so epochs time only training.
    t0 = time.perf_counter()
    programs = {}
    for b in batches:
        programs.setdefault((b.forest.plan.key, b.forest.num_nodes, b.forest.roots.shape), b)
    for b in programs.values():
        jax.block_until_ready(train_step(params, opt_state, b.forest, b.labels))
    jax.block_until_ready(predict(params, test_forest))
    print(
        f"compiled {len(programs)} train-step program(s) + 1 eval program in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print(f"{'epoch':>5}  {'loss':>7}  {'test acc':>8}  {'train nodes/s':>13}")

    history = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        losses = []
        for i in rng.permutation(len(batches)):
            b = batches[i]
            params, opt_state, loss = train_step(params, opt_state, b.forest, b.labels)
            losses.append(loss)
        losses = np.asarray(jax.block_until_ready(losses))
        elapsed = time.perf_counter() - t0
        loss = float(np.mean(losses))
        predictions = np.asarray(predict(params, test_forest))
        accuracy = float(np.mean(predictions == test_labels))
        nodes_per_s = num_train_nodes / elapsed
        history.append(
            {"epoch": epoch, "loss": loss, "accuracy": accuracy, "nodes_per_s": nodes_per_s}
        )
        print(f"{epoch:>5}  {loss:>7.4f}  {accuracy:>8.3f}  {nodes_per_s:>13,.0f}", flush=True)

    depths = np.asarray([tree_depth(t) for t in test_trees])
    by_depth = {
        int(d): float(np.mean(predictions[depths == d] == test_labels[depths == d]))
        for d in np.unique(depths)
    }
    total_s = time.perf_counter() - start
    print(
        "final test accuracy: "
        f"{accuracy:.3f} (by depth: "
        + ", ".join(f"{d}: {a:.3f}" for d, a in by_depth.items())
        + f"; majority class {np.bincount(test_labels).max() / len(test_labels):.3f})"
    )
    print(f"total time: {total_s:.1f} s")
    return {
        "history": history,
        "loss": loss,
        "accuracy": accuracy,
        "accuracy_by_depth": by_depth,
        "total_s": total_s,
    }


if __name__ == "__main__":
    main()
