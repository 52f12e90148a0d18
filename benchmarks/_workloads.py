"""Workloads of the benchmark suite: trees, models, and the hand-written JAX peers.

Shared by the pytest-benchmark suite (``test_suite.py``) and the standalone scripts.

- Trees: SST-like random binary bracketings, complete binary trees, left-deep chains and
  the ASTs of standard-library functions, each generated deterministically.
- Models: each ``Model`` is one recursive cell in three JAX forms that compute the same
  arithmetic: the ``@rj.recursive`` function recjax compiles, a per-node form (one node,
  its children's states as arguments) and a level form (a batch of nodes of one level,
  their children's states gathered per edge). The PyTorch forms are in ``_torch_peers``.
- Peers: ``JaxPerNode`` (one jitted cell call per node from a Python walk) and
  ``JaxLevels`` (levels computed in numpy, then an unrolled per-level
  gather/compute/write program jitted per batch structure).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import recjax as rj
from jax import lax
from recjax import nn
from recjax.data import python_functions

# ====================================================================== binary Tree-LSTM

EMBED = 300
HIDDEN = 150
VOCAB = 20_000
MEAN_LEAVES = 19
MAX_LEAVES = 56

# The cells are written once, for one node (vectors) or a batch of nodes (a leading row
# axis): every split and concatenation is on the last axis. recjax, the per-node peer and
# the level peer all call them, with recjax.nn's sigmoid and tanh (the library's models
# use them: their backward keeps only the output, as PyTorch's does), so every JAX form
# differentiates the same arithmetic.


def leaf_cell(p, token):
    """Binary Tree-LSTM leaf: ``(h, c)`` from the token's embedding."""
    x = p["emb"][token]
    i, o, u = jnp.split(x @ p["W"] + p["b"], 3, axis=-1)
    c = nn.sigmoid(i) * nn.tanh(u)
    return nn.sigmoid(o) * nn.tanh(c), c


def internal_cell(p, hl, cl, hr, cr):
    """Binary Tree-LSTM internal node: ``(h, c)`` from the two children's states."""
    i, fl, fr, o, u = jnp.split(jnp.concatenate([hl, hr], axis=-1) @ p["U"] + p["bu"], 5, axis=-1)
    c = nn.sigmoid(i) * nn.tanh(u) + nn.sigmoid(fl) * cl + nn.sigmoid(fr) * cr
    return nn.sigmoid(o) * nn.tanh(c), c


@rj.recursive
def tree_lstm(p, node):
    """Binary Tree-LSTM (Tai et al. 2015): returns ``(h, c)`` of the node."""
    if node.is_leaf:
        return leaf_cell(p, node.data["token"])
    (hl, cl), (hr, cr) = [tree_lstm(p, ch) for ch in node.children]
    return internal_cell(p, hl, cl, hr, cr)


def make_params(rng, vocab=VOCAB, embed=EMBED, hidden=HIDDEN):
    """Binary Tree-LSTM parameters (jnp float32): emb, W, b (leaf) and U, bu (internal)."""
    normal = lambda shape, scale: (scale * rng.standard_normal(shape)).astype(np.float32)
    return {
        "emb": jnp.asarray(normal((vocab, embed), 0.1)),
        "W": jnp.asarray(normal((embed, 3 * hidden), embed**-0.5)),
        "b": jnp.asarray(normal((3 * hidden,), 0.1)),
        "U": jnp.asarray(normal((2 * hidden, 5 * hidden), (2 * hidden) ** -0.5)),
        "bu": jnp.asarray(normal((5 * hidden,), 0.1)),
    }


# ====================================================================== trees


def sst_like_trees(rng, num_trees, vocab=VOCAB):
    """Random binary trees shaped like SST parses: about 19 leaves on average, at most 56.

    Leaf counts are gamma-distributed (mean 19, standard deviation about 9, like SST
    sentence lengths), clipped to [2, 56], and the longest is set to 56 so every batch
    contains the deepest case. Each tree is a random bracketing: merge a random pair of
    adjacent nodes until one is left. Tokens are uniform over the vocabulary.
    """
    counts = np.clip(np.rint(rng.gamma(4.5, MEAN_LEAVES / 4.5, num_trees)), 2, MAX_LEAVES)
    counts = counts.astype(int)
    counts[np.argmax(counts)] = MAX_LEAVES
    trees = []
    for n in counts:
        nodes = [rj.Tree({"token": np.int32(t)}) for t in rng.integers(vocab, size=n)]
        while len(nodes) > 1:
            i = int(rng.integers(len(nodes) - 1))
            nodes[i : i + 2] = [rj.Tree({"token": np.int32(0)}, nodes[i : i + 2])]
        trees.append(nodes[0])
    return trees


def complete_binary_trees(rng, num_trees, num_leaves, vocab):
    """Complete binary trees of ``num_leaves`` (a power of two) random leaf tokens."""
    trees = []
    for _ in range(num_trees):
        level = [rj.Tree({"token": np.int32(t)}) for t in rng.integers(vocab, size=num_leaves)]
        while len(level) > 1:
            level = [rj.Tree({"token": np.int32(0)}, level[i : i + 2]) for i in range(0, len(level), 2)]
        trees.append(level[0])
    return trees


def left_deep_chains(rng, num_trees, num_nodes, vocab):
    """Left-deep binary trees ``((((a b) c) d) ...)`` of ``num_nodes`` nodes (odd: 2k + 1).

    Height ``(num_nodes - 1) / 2``: every internal node is its own level.
    """
    trees = []
    for _ in range(num_trees):
        tokens = rng.integers(vocab, size=(num_nodes + 1) // 2)
        tree = rj.Tree({"token": np.int32(tokens[0])})
        for t in tokens[1:]:
            tree = rj.Tree({"token": np.int32(0)}, [tree, rj.Tree({"token": np.int32(t)})])
        trees.append(tree)
    return trees


# Standard-library modules whose functions make the AST workload (about 1,300 functions,
# 85 AST nodes on average, at most about 1,300; nested functions are also part of their
# parent's tree, as recjax.data.python_functions gives them).
STDLIB_FILES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py",
    "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "pprint.py", "shlex.py",
    "string.py", "textwrap.py", "tokenize.py", "typing.py",
)


@functools.lru_cache(maxsize=1)
def _stdlib_function_trees():
    base = pathlib.Path(ast.__file__).parent
    return python_functions([base / name for name in STDLIB_FILES if (base / name).exists()])


def stdlib_function_trees(num_trees, seed=0):
    """ASTs of ``num_trees`` standard-library functions (a seeded random sample).

    Node data is ``{"token": kind}``, the index of the node's type in
    ``recjax.data.AST_KINDS``; nodes have any number of children. The sample depends on
    the Python version's standard library, like the node counts it gives.
    """
    trees = _stdlib_function_trees()
    pick = np.random.default_rng(seed).permutation(len(trees))[:num_trees]
    return [map_data(trees[i], lambda d: {"token": d["kind"]}) for i in pick]


def map_data(tree, fn):
    """A copy of ``tree`` with ``fn(data)`` as every node's data (iterative: any depth)."""
    order, stack = [], [tree]
    while stack:
        t = stack.pop()
        order.append(t)
        stack.extend(t.children)
    built = {}
    for t in reversed(order):  # children before parents
        built[id(t)] = rj.Tree(fn(t.data), [built[id(c)] for c in t.children])
    return built[id(tree)]


def count_nodes(trees):
    """``(leaves, internal nodes)`` of a list of trees (no shared subtrees)."""
    leaves = internal = 0
    stack = list(trees)
    while stack:
        t = stack.pop()
        if t.is_leaf:
            leaves += 1
        else:
            internal += 1
            stack.extend(t.children)
    return leaves, internal


# ====================================================================== models


@dataclasses.dataclass(frozen=True)
class Model:
    """One recursive cell in the forms the suite times, and its matmul FLOP count.

    States are tuples of arrays, ``h`` first. ``leaf(p, tokens)`` computes leaves (one
    token or a batch of them); ``node(p, token, kids)`` one internal node from its
    children's states (``kids`` a tuple of state tuples, one per child);
    ``level(p, tokens, kids, parent, n)`` the ``n`` internal nodes of one level, where
    ``kids`` are the children's states stacked per edge (``[E, ...]`` per component, the
    edges of node 0 first, in child order) and ``parent[e]`` is edge ``e``'s node
    (``0..n-1``). ``state(out)`` turns recjax's output into that tuple.

    FLOPs count the cell's matrix products only (2 per multiply-add), at most once per
    node: per leaf, per internal node, and per child edge. Gate elementwise work and
    padding are not counted, so the ceiling they give is an upper bound. They come from
    the products' shapes: ``(k, n)`` of each ``[rows, k] @ [k, n]`` a leaf, an internal
    node or a child edge computes (``bench_plan_products.py`` times them at a plan's
    own row counts).
    """

    name: str
    title: str
    recursive: Any
    state: Callable
    leaf: Callable
    node: Callable
    level: Callable
    leaf_products: tuple[tuple[int, int], ...]  # (k, n) of each product per leaf
    internal_products: tuple[tuple[int, int], ...]  # per internal node
    edge_products: tuple[tuple[int, int], ...]  # per child edge
    ceiling_shape: tuple[int, int]  # (k, n) of the dominant product, for the matmul ceiling

    @property
    def leaf_flops(self) -> int:
        return sum(2 * k * n for k, n in self.leaf_products)

    @property
    def internal_flops(self) -> int:
        return sum(2 * k * n for k, n in self.internal_products)

    @property
    def edge_flops(self) -> int:
        return sum(2 * k * n for k, n in self.edge_products)

    def flops(self, leaves, internal, edges):
        """Forward matmul FLOPs of a batch."""
        return leaves * self.leaf_flops + internal * self.internal_flops + edges * self.edge_flops


def _lstm_level(p, tokens, kids, parent, n):
    h, c = (k.reshape(n, 2, -1) for k in kids)
    return internal_cell(p, h[:, 0], c[:, 0], h[:, 1], c[:, 1])


def binary_tree_lstm_model(embed, hidden):
    """The binary Tree-LSTM of ``tree_lstm`` (leaf ``x @ W``, internal ``[hl, hr] @ U``)."""
    return Model(
        name="tree_lstm",
        title=f"binary Tree-LSTM {embed}/{hidden}",
        recursive=tree_lstm,
        state=tuple,
        leaf=leaf_cell,
        node=lambda p, token, kids: internal_cell(p, *kids[0], *kids[1]),
        level=_lstm_level,
        leaf_products=((embed, 3 * hidden),),  # x @ W
        internal_products=((2 * hidden, 5 * hidden),),  # [hl, hr] @ U
        edge_products=(),
        ceiling_shape=(2 * hidden, 5 * hidden),
    )


def _fc_leaf(p, tokens):
    return (p["emb"][tokens],)


def _fc_node(p, token, kids):
    (hl,), (hr,) = kids
    return (nn.tanh(jnp.concatenate([hl, hr]) @ p["W"] + p["b"]),)


def _fc_level(p, tokens, kids, parent, n):
    (h,) = kids  # [2n, H], left then right child of each node: one row is [hl, hr]
    return (nn.tanh(h.reshape(n, -1) @ p["W"] + p["b"]),)


def tree_fc_model(hidden):
    """``recjax.nn.tree_fc``: a leaf is its embedding, a node ``tanh([hl, hr] @ W + b)``."""
    return Model(
        name="tree_fc",
        title=f"TreeFC {hidden}",
        recursive=nn.tree_fc,
        state=lambda h: (h,),
        leaf=_fc_leaf,
        node=_fc_node,
        level=_fc_level,
        leaf_products=(),  # the embedding alone
        internal_products=((2 * hidden, hidden),),  # [hl, hr] @ W
        edge_products=(),
        ceiling_shape=(2 * hidden, hidden),
    )


def _cs_leaf(p, tokens):
    # A leaf's child sums are zero: h_sum @ U and the forget terms vanish.
    x = p["emb"][tokens]
    i, o, u = jnp.split(x @ p["W"] + p["b"], 3, axis=-1)
    c = nn.sigmoid(i) * nn.tanh(u)
    return nn.sigmoid(o) * nn.tanh(c), c


def _cs_node(p, token, kids):
    x = p["emb"][token]
    h = jnp.stack([k[0] for k in kids])
    c = jnp.stack([k[1] for k in kids])
    i, o, u = jnp.split(x @ p["W"] + h.sum(0) @ p["U"] + p["b"], 3)
    f = nn.sigmoid(x @ p["W_f"] + h @ p["U_f"] + p["b_f"])
    c_new = nn.sigmoid(i) * nn.tanh(u) + (f * c).sum(0)
    return nn.sigmoid(o) * nn.tanh(c_new), c_new


def _cs_level(p, tokens, kids, parent, n):
    h, c = kids
    x = p["emb"][tokens]
    h_sum = jax.ops.segment_sum(h, parent, num_segments=n)
    i, o, u = jnp.split(x @ p["W"] + h_sum @ p["U"] + p["b"], 3, axis=-1)
    # x @ W_f once per node, gathered per edge (not once per edge)
    f = nn.sigmoid((x @ p["W_f"])[parent] + h @ p["U_f"] + p["b_f"])
    c_new = nn.sigmoid(i) * nn.tanh(u) + jax.ops.segment_sum(f * c, parent, num_segments=n)
    return nn.sigmoid(o) * nn.tanh(c_new), c_new


def child_sum_model(embed, hidden):
    """``recjax.nn.child_sum_tree_lstm`` (any arity, one forget gate per child)."""
    return Model(
        name="child_sum",
        title=f"Child-Sum Tree-LSTM {embed}/{hidden}",
        recursive=nn.child_sum_tree_lstm,
        state=tuple,
        leaf=_cs_leaf,
        node=_cs_node,
        level=_cs_level,
        leaf_products=((embed, 3 * hidden),),  # x @ W
        # internal: x @ W, h_sum @ U and x @ W_f
        internal_products=((embed, 3 * hidden), (hidden, 3 * hidden), (embed, hidden)),
        edge_products=((hidden, hidden),),  # h @ U_f
        ceiling_shape=(hidden, 3 * hidden),
    )


# ====================================================================== workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its parameters and a deterministic batch of trees for each batch size."""

    name: str  # short id used in test ids
    title: str
    model: Model
    make_params: Callable[[], dict]  # -> {name: jnp array}
    make_trees: Callable[[int], list]  # batch size -> trees
    batches: tuple[int, ...]
    quick_batches: tuple[int, ...]
    # Batches where the per-node peers run: they walk the first trees of the batch, so
    # where two batches start with the same trees (chains), the smallest one is enough.
    per_node_batches: tuple[int, ...] | None = None  # None: every batch


def _sst_trees(batch):
    return sst_like_trees(np.random.default_rng(1), batch)


def _full_trees(batch, vocab):
    return complete_binary_trees(np.random.default_rng(2), batch, 128, vocab)


def _chains(batch, num_nodes):
    return left_deep_chains(np.random.default_rng(3), batch, num_nodes, VOCAB)


FULL_HIDDEN = 256
FULL_VOCAB = 1000
AST_SIZE = 128

WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            name="sst",
            title="binary Tree-LSTM 300/150, SST-like trees",
            model=binary_tree_lstm_model(EMBED, HIDDEN),
            make_params=lambda: make_params(np.random.default_rng(0)),
            make_trees=_sst_trees,
            batches=(1, 32, 256),
            quick_batches=(1, 32),
        ),
        Workload(
            name="ast",
            title=f"Child-Sum Tree-LSTM {AST_SIZE}/{AST_SIZE}, stdlib function ASTs",
            model=child_sum_model(AST_SIZE, AST_SIZE),
            make_params=lambda: nn.init_child_sum_tree_lstm(
                jax.random.key(0), vocab=len(rj.data.AST_KINDS), embed=AST_SIZE, hidden=AST_SIZE
            ),
            make_trees=stdlib_function_trees,
            batches=(1, 32, 256),
            quick_batches=(1, 32),
        ),
        Workload(
            name="full_fc",
            title=f"TreeFC {FULL_HIDDEN}, complete binary trees of 128 leaves",
            model=tree_fc_model(FULL_HIDDEN),
            make_params=lambda: nn.init_tree_fc(jax.random.key(0), vocab=FULL_VOCAB, hidden=FULL_HIDDEN),
            make_trees=functools.partial(_full_trees, vocab=FULL_VOCAB),
            batches=(1, 32, 256),
            quick_batches=(1, 32),
        ),
        Workload(
            name="full_lstm",
            title=f"binary Tree-LSTM {FULL_HIDDEN}/{FULL_HIDDEN}, complete binary trees of 128 leaves",
            model=binary_tree_lstm_model(FULL_HIDDEN, FULL_HIDDEN),
            make_params=lambda: make_params(
                np.random.default_rng(0), vocab=FULL_VOCAB, embed=FULL_HIDDEN, hidden=FULL_HIDDEN
            ),
            make_trees=functools.partial(_full_trees, vocab=FULL_VOCAB),
            batches=(1, 32, 256),
            quick_batches=(1, 32),
        ),
        Workload(
            name="chain1k",
            title="binary Tree-LSTM 300/150, left-deep chains of 999 nodes",
            model=binary_tree_lstm_model(EMBED, HIDDEN),
            make_params=lambda: make_params(np.random.default_rng(0)),
            make_trees=functools.partial(_chains, num_nodes=999),
            batches=(1, 32),
            quick_batches=(1,),
            per_node_batches=(1,),
        ),
        Workload(
            name="chain10k",
            title="binary Tree-LSTM 300/150, a left-deep chain of 9,999 nodes",
            model=binary_tree_lstm_model(EMBED, HIDDEN),
            make_params=lambda: make_params(np.random.default_rng(0)),
            make_trees=functools.partial(_chains, num_nodes=9999),
            batches=(1,),
            quick_batches=(),
        ),
    )
}


def root_loss(h_roots):
    """The training loss of every system: ``sum(h[roots] ** 2)``."""
    return jnp.sum(h_roots**2)


# ====================================================================== JAX peers


def postorder(tree):
    """The nodes of ``tree``, children before parents (iterative: any depth)."""
    order, stack = [], [tree]
    while stack:
        t = stack.pop()
        order.append(t)
        stack.extend(t.children)
    return order[::-1]


class JaxPerNode:
    """Peer (a): one jitted cell call per node, from a Python walk over each tree.

    The leaf form and the per-node form of the model are each ``jax.jit``-ed (the node
    form compiles once per arity); the walk is iterative, children before parents.
    Training is ``jax.grad`` of the same walk (eager: the walk is Python).
    """

    def __init__(self, model: Model):
        self.leaf = jax.jit(model.leaf)
        self.node = jax.jit(model.node)

    def root_states(self, p, trees):
        roots = []
        for tree in trees:
            done = {}
            for t in postorder(tree):
                token = t.data["token"]
                if t.is_leaf:
                    done[id(t)] = self.leaf(p, token)
                else:
                    done[id(t)] = self.node(p, token, tuple(done[id(c)] for c in t.children))
            roots.append(done[id(tree)])
        return roots

    def forward(self, p, trees):
        """Every root's ``h``, stacked ``[num_trees, H]``."""
        return jnp.stack([s[0] for s in self.root_states(p, trees)])

    def loss(self, p, trees):
        return root_loss(self.forward(p, trees))

    def train(self, p, trees):
        """Gradient of ``root_loss`` with respect to every parameter."""
        return jax.grad(self.loss)(p, trees)


def _ranges(starts, counts):
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(offsets - starts, counts)


@dataclasses.dataclass
class Levels:
    """The level peers' host plan: nodes renumbered by height, leaves first, one block per level.

    ``sizes[h]`` rows have height ``h`` (``sizes[0]`` leaves), rows ``starts[h] ..
    starts[h] + sizes[h] - 1``. ``leaf_tokens[sizes[0]]``; for every internal level,
    ``tokens[n]``, ``child[E]`` (the rows of the level's children, node by node, in child
    order) and ``parent[E]`` (each edge's node, ``0..n-1``); ``roots`` are the roots'
    rows in input order.
    """

    num_nodes: int
    sizes: np.ndarray
    leaf_tokens: np.ndarray
    levels: list[dict]
    roots: np.ndarray

    @property
    def starts(self):
        return np.cumsum(self.sizes) - self.sizes

    @classmethod
    def from_trees(cls, trees):
        """Numbers the nodes (pre-order), computes heights and groups them by level."""
        nodes, ids, roots = [], {}, []
        for root in trees:
            stack = [root]
            while stack:
                t = stack.pop()
                ids[id(t)] = len(nodes)
                nodes.append(t)
                stack.extend(reversed(t.children))
            roots.append(ids[id(root)])
        n = len(nodes)
        degree = np.fromiter((len(t.children) for t in nodes), np.int64, n)
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(degree, out=ptr[1:])
        kids = np.fromiter((ids[id(c)] for t in nodes for c in t.children), np.int64, int(ptr[-1]))
        tokens = np.fromiter((t.data["token"] for t in nodes), np.int32, n)
        # In pre-order a child's number is larger than its parent's: one backward sweep.
        height = [0] * n
        kid_list = kids.tolist()
        for i in range(n - 1, -1, -1):
            if degree[i]:
                height[i] = 1 + max(height[c] for c in kid_list[ptr[i] : ptr[i + 1]])
        height = np.asarray(height)
        order = np.argsort(height, kind="stable")
        row = np.empty(n, np.int64)
        row[order] = np.arange(n)
        sizes = np.bincount(height)
        first = np.cumsum(sizes) - sizes
        levels = []
        for h in range(1, sizes.size):
            members = order[first[h] : first[h] + sizes[h]]
            deg = degree[members]
            levels.append({
                "tokens": tokens[members],
                "child": row[kids[_ranges(ptr[members], deg)]].astype(np.int32),
                "parent": np.repeat(np.arange(members.size, dtype=np.int32), deg),
            })
        return cls(n, sizes, tokens[order[: sizes[0]]], levels, row[roots].astype(np.int32))

    def arrays(self):
        """The tables as a pytree of arrays (the argument of the jitted program)."""
        return {"leaf_tokens": self.leaf_tokens, "levels": self.levels, "roots": self.roots}


def levels_forward(model, p, lv):
    """Every node's state, rows in ``Levels`` order: leaves in one batch, then each level
    gathers its children's rows, runs the level cell and writes its contiguous rows."""
    state = model.leaf(p, lv["leaf_tokens"])
    num_rows = lv["leaf_tokens"].shape[0] + sum(level["tokens"].shape[0] for level in lv["levels"])
    bufs = [jnp.zeros((num_rows,) + s.shape[1:], s.dtype).at[: s.shape[0]].set(s) for s in state]
    start = state[0].shape[0]
    for level in lv["levels"]:  # unrolled: one block of ops per level
        n = level["tokens"].shape[0]
        kids = tuple(b[level["child"]] for b in bufs)
        new = model.level(p, level["tokens"], kids, level["parent"], n)
        bufs = [lax.dynamic_update_slice_in_dim(b, x, start, 0) for b, x in zip(bufs, new)]
        start += n
    return tuple(bufs)


class JaxLevels:
    """Peer (b): hand-written level batching in JAX, jitted per batch structure."""

    def __init__(self, model: Model):
        self.model = model
        # forward: every node's state (rows in Levels order), like recjax's forward
        self.forward = jax.jit(functools.partial(levels_forward, model))
        self.train = jax.jit(jax.grad(self._loss))

    def _loss(self, p, lv):
        return root_loss(levels_forward(self.model, p, lv)[0][lv["roots"]])
