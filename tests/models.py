"""Recursive models and random forests shared by the tests (written as a user would)."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import recjax as rj
from recjax.data import AST_KINDS, python_functions  # noqa: F401

# ---------------------------------------------------------------------- binary Tree-LSTM


@rj.recursive
def tree_lstm(p, node):
    """Binary (N-ary, N=2) Tree-LSTM of Tai et al. 2015."""
    if node.is_leaf:
        x = p["emb"][node.data["token"]]
        i, o, u = jnp.split(x @ p["W"] + p["b"], 3)
        c = jax.nn.sigmoid(i) * jnp.tanh(u)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c
    (hl, cl), (hr, cr) = [tree_lstm(p, ch) for ch in node.children]
    i, fl, fr, o, u = jnp.split(jnp.concatenate([hl, hr]) @ p["U"] + p["bu"], 5)
    c = jax.nn.sigmoid(i) * jnp.tanh(u) + jax.nn.sigmoid(fl) * cl + jax.nn.sigmoid(fr) * cr
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def tree_lstm_params(key, vocab=40, dim=6, hidden=5):
    k = jax.random.split(key, 5)
    n = lambda kk, shape, s=0.4: s * jax.random.normal(kk, shape)  # noqa: E731
    return {
        "emb": n(k[0], (vocab, dim), 1.0),
        "W": n(k[1], (dim, 3 * hidden)),
        "b": n(k[2], (3 * hidden,), 0.1),
        "U": n(k[3], (2 * hidden, 5 * hidden)),
        "bu": n(k[4], (5 * hidden,), 0.1),
    }


def random_binary_tree(rng, num_leaves, vocab=40):
    """A random binary bracketing of ``num_leaves`` random tokens (iterative)."""
    nodes = [rj.Tree({"token": int(rng.integers(vocab))}) for _ in range(num_leaves)]
    while len(nodes) > 1:
        i = int(rng.integers(len(nodes) - 1))
        nodes[i : i + 2] = [rj.Tree({"token": 0}, nodes[i : i + 2])]
    return nodes[0]


# ---------------------------------------------------------------------- child-sum Tree-LSTM


@rj.recursive
def child_sum_lstm(p, node):
    """Child-Sum Tree-LSTM of Tai et al. 2015: any number of children, one template."""
    x = p["emb"][node.data["kind"]]
    # initial= gives a leaf's empty sum the shape of h (a plain .sum() would be the scalar 0)
    h_sum = node.children.map(lambda ch: child_sum_lstm(p, ch)[0]).sum(initial=jnp.zeros(p["U"].shape[0]))
    i, o, u = jnp.split(x @ p["W"] + h_sum @ p["U"] + p["b"], 3)

    def forget(ch):  # closes over the node-level x: one forget gate per child
        h, c = child_sum_lstm(p, ch)
        return jax.nn.sigmoid(x @ p["Wf"] + h @ p["Uf"] + p["bf"]) * c

    c = jax.nn.sigmoid(i) * jnp.tanh(u) + node.children.map(forget).sum()
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def child_sum_params(key, kinds, dim=6, hidden=5):
    k = jax.random.split(key, 7)
    n = lambda kk, shape, s=0.4: s * jax.random.normal(kk, shape)  # noqa: E731
    return {
        "emb": n(k[0], (kinds, dim), 1.0),
        "W": n(k[1], (dim, 3 * hidden)),
        "U": n(k[2], (hidden, 3 * hidden)),
        "b": n(k[3], (3 * hidden,), 0.1),
        "Wf": n(k[4], (dim, hidden)),
        "Uf": n(k[5], (hidden, hidden)),
        "bf": n(k[6], (hidden,), 0.1),
    }


def stdlib_functions(module_files=("json/decoder.py", "textwrap.py", "bisect.py")):
    """``rj.Tree``s of the function definitions in standard-library source files.

    Node data: ``{"kind": id}`` from ``recjax.data.AST_KINDS``; every AST node is its own
    tree node (CPython shares ``ast.Load()`` objects, which ``from_ast`` does not merge).
    """
    base = pathlib.Path(ast.__file__).parent
    return python_functions([base / name for name in module_files])


# ---------------------------------------------------------------------- expression evaluator

OPS = ("+", "-", "*")


@rj.recursive
def evaluate(node):
    """Arithmetic evaluator that branches on the node's operator kind (data, via lax.switch)."""
    if node.is_leaf:
        return node.data["value"]
    a, b = [evaluate(ch) for ch in node.children]
    return jax.lax.switch(node.data["op"], [lambda: a + b, lambda: a - b, lambda: a * b])


def random_expression(rng, depth):
    """A random expression tree and its exact value (Python arithmetic)."""
    if depth == 0 or rng.random() < 0.25:
        v = float(rng.integers(10))
        return rj.Tree({"op": 0, "value": v}), v
    op = int(rng.integers(3))
    (l, lv), (r, rv) = random_expression(rng, depth - 1), random_expression(rng, depth - 1)
    value = (lv + rv, lv - rv, lv * rv)[op]
    return rj.Tree({"op": op, "value": 0.0}, [l, r]), value


# ---------------------------------------------------------------------- helpers


def random_tree(rng, num_nodes, max_arity, data_fn):
    """A random tree of ``num_nodes`` nodes with at most ``max_arity`` children each."""
    parent = [-1]
    counts = [0]
    for i in range(1, num_nodes):
        while True:
            p = int(rng.integers(i))
            if counts[p] < max_arity:
                break
        parent.append(p)
        counts.append(0)
        counts[p] += 1
    kids = [[] for _ in range(num_nodes)]
    for i, p in enumerate(parent[1:], 1):
        kids[p].append(i)
    built = {}
    for i in reversed(range(num_nodes)):
        built[i] = rj.Tree(data_fn(i), [built[c] for c in kids[i]])
    return built[0]


def node_subtrees(trees):
    """The ``Tree`` object of every node in ``Forest.from_trees(trees)`` order."""
    seen, out = set(), []
    for t in trees:
        stack = [t]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            out.append(n)
            stack.extend(reversed(n.children))
    return out


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=rtol), a, b)
