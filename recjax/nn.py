"""A model zoo: recursive neural networks over trees and DAGs, written with the public API.

Every model is a ``@rj.recursive`` function ``model(params, node)`` and an
``init_<model>(key, ...)`` that returns its parameters as a plain dict of ``jnp``
arrays (a pytree that ``jax.grad`` and ``optax`` take as is). Call a model on an
``rj.Tree`` for plain Python recursion (the reference meaning), or ``model.batch(params,
forest)`` for every node of an ``rj.Forest`` in one compiled program.

Data convention: every node's data is a dict with an integer ``"token"`` (a vocabulary
id, ``0 <= token < vocab``). Each model's docstring says which nodes' tokens it reads:
the binary cells (``tree_rnn``, ``rntn``, ``tree_fc``) read leaves' only (give internal
nodes any valid id, e.g. 0); the others read every node's. Other keys (for example an
SST-style ``"label"`` per node, read by the loss and not by the model) are carried
along and ignored.

Outputs: each model returns the node's hidden state ``h`` of shape ``[hidden]``, except
the two Tree-LSTMs, which return ``(h, c)``. Weights act on row vectors (``x @ W``),
and a weight that feeds several gates is one matrix whose columns are the gates'
blocks, in the order the docstring lists them.

Example:
  >>> import jax
  >>> import recjax as rj
  >>> from recjax import nn
  >>> p = nn.init_child_sum_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2)
  >>> leaf = lambda token, label: rj.Tree({"token": token, "label": label})
  >>> tree = rj.Tree({"token": 1, "label": 0}, [leaf(2, 1), leaf(3, 0)])
  >>> forest = rj.Forest.from_trees([tree])
  >>> h, c = nn.child_sum_tree_lstm.batch(p, forest)
  >>> h.shape, forest.data["label"].tolist()  # one row per node, in pre-order
  ((3, 2), [0, 1, 0])
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import recjax as rj

__all__ = [
    "bidirectional_tree_lstm",
    "child_attention",
    "child_sum_tree_lstm",
    "dag_rnn",
    "init_bidirectional_tree_lstm",
    "init_child_attention",
    "init_child_sum_tree_lstm",
    "init_dag_rnn",
    "init_rntn",
    "init_tree_fc",
    "init_tree_gru",
    "init_tree_lstm",
    "init_tree_rnn",
    "rntn",
    "sigmoid",
    "tanh",
    "tree_fc",
    "tree_gru",
    "tree_lstm",
    "tree_rnn",
]


# ---------------------------------------------------------------------- helpers


def _sample(key, spec):
    """Parameters ``{name: mean + std * normal(shape)}`` for ``(name, shape, std, mean)`` in spec.

    One random draw of a power-of-two size, so initialisers of similar size share one
    compiled draw (compiling a draw per shape costs far more than drawing).
    """
    total = sum(math.prod(shape) for _, shape, _, _ in spec)
    return _unpack(_normal(key, 1 << max(total - 1, 255).bit_length()), spec)


@functools.partial(jax.jit, static_argnums=1)
def _normal(key, size):
    return jax.random.normal(key, (size,))


@functools.partial(jax.jit, static_argnums=1)
def _unpack(flat, spec):
    params, start = {}, 0
    for name, shape, std, mean in spec:
        size = math.prod(shape)
        normal = flat[start : start + size].reshape(shape)
        params[name] = jnp.asarray(mean, flat.dtype) + std * normal
        start += size
    return params


def _dense(name, fan_in, fan_out):
    """A ``[fan_in, fan_out]`` weight with variance ``1 / fan_in`` (LeCun normal)."""
    return (name, (fan_in, fan_out), fan_in**-0.5, 0.0)


def _const(name, size, value=0.0):
    return (name, (size,), 0.0, value)


def _embedding(vocab, dim):
    return ("emb", (vocab, dim), 1.0, 0.0)


def _binary_children(name, node, fn):
    """The two children's outputs of a binary cell; a clear error for another arity."""
    n = len(node.children)
    if n != 2:
        raise ValueError(
            f"{name} is a binary cell but got a node with {n} children; binarise the trees "
            "first (for example right-branching), or use a model that takes any arity "
            "(child_sum_tree_lstm, tree_gru, child_attention, dag_rnn)."
        )
    return [fn(ch) for ch in node.children]


# ---------------------------------------------------------------------- activations


@jax.custom_jvp
def sigmoid(x):
    """``jax.nn.sigmoid`` whose derivative keeps only the output for the backward pass.

    Same values as ``jax.nn.sigmoid`` and the same derivative, ``y * (1 - y)``, but
    reverse mode saves one array per call, the output ``y``, and recomputes the slope
    from it in the backward pass. ``jax.nn.sigmoid`` saves the slope as a second array
    beside ``y`` (which a gate's product with another value keeps anyway). Inside a
    ``lax.scan``, such as recjax's level loop, every saved array is stacked over the
    steps: for the Tree-LSTMs this halves the gates' saved arrays, and training steps
    that outgrow the CPU's cache gain most (``benchmarks/RESULTS.md``). Every model of
    this module uses it; use it in your own cells the same way. Forward mode, ``vmap``
    and higher derivatives work as with ``jax.nn.sigmoid``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from recjax import nn
      >>> x = jnp.array([-2.0, 0.0, 3.0])
      >>> bool(jnp.allclose(nn.sigmoid(x), jax.nn.sigmoid(x)))
      True
      >>> slope = jax.grad(lambda x: nn.sigmoid(x).sum())(x)
      >>> bool(jnp.allclose(slope, jax.grad(lambda x: jax.nn.sigmoid(x).sum())(x)))
      True
    """
    return jax.nn.sigmoid(x)


@jax.custom_jvp
def tanh(x):
    """``jnp.tanh`` whose derivative keeps only the output for the backward pass.

    Same values and derivative, ``(1 - y) * (1 + y)``, as ``jnp.tanh``, whose reverse
    mode saves both ``y`` and ``1 - y``; this one saves ``y`` alone and recomputes the
    slope in the backward pass (see ``sigmoid`` for why that matters in a scan). Every
    model of this module uses it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from recjax import nn
      >>> x = jnp.array([-2.0, 0.0, 3.0])
      >>> bool(jnp.allclose(nn.tanh(x), jnp.tanh(x)))
      True
      >>> slope = jax.grad(lambda x: nn.tanh(x).sum())(x)
      >>> bool(jnp.allclose(slope, jax.grad(lambda x: jnp.tanh(x).sum())(x)))
      True
    """
    return jnp.tanh(x)


def _times_slope(g, y, slope):
    """``g * slope(y)``, where reverse mode saves ``y`` and recomputes ``slope(y)``.

    Partial evaluation would save ``slope(y)`` (it depends on the primal only) as well
    as ``y``; under ``jax.checkpoint`` with nothing saveable it keeps the checkpoint's
    inputs, ``y``, and the backward pass recomputes the slope.
    """
    scaled = jax.checkpoint(lambda g, y: g * slope(y), policy=jax.checkpoint_policies.nothing_saveable)
    return scaled(g, y)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (g,) = primals, tangents
    y = sigmoid(x)
    return y, _times_slope(g, y, lambda y: y * (1 - y))


@tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (g,) = primals, tangents
    y = tanh(x)
    return y, _times_slope(g, y, lambda y: (1 - y) * (1 + y))


# ---------------------------------------------------------------------- tree RNN


@rj.recursive
def tree_rnn(p, node):
    """Recursive neural network of Socher et al. 2011 over binary trees.

    Reads ``node.data["token"]`` at leaves only. Equivalent to::

        def tree_rnn(p, node):
            if node.is_leaf:
                return tanh(p["emb"][token] @ p["W_e"] + p["b_e"])
            h_l, h_r = [tree_rnn(p, c) for c in node.children]
            return tanh(concatenate([h_l, h_r]) @ p["W"] + p["b"])

    Args:
      p: parameters from ``init_tree_rnn``.
      node: a node with zero or two children.

    Returns:
      ``h``, shape ``[hidden]``.

    Raises:
      ValueError: a node with one or more than two children.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_tree_rnn(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": 1}), rj.Tree({"token": 4})])
      >>> nn.tree_rnn.batch(p, rj.Forest.from_trees([tree])).shape
      (3, 2)
    """
    if node.is_leaf:
        return tanh(p["emb"][node.data["token"]] @ p["W_e"] + p["b_e"])
    h_l, h_r = _binary_children("tree_rnn", node, lambda c: tree_rnn(p, c))
    return tanh(jnp.concatenate([h_l, h_r]) @ p["W"] + p["b"])


def init_tree_rnn(key, vocab, embed, hidden):
    """Parameters of ``tree_rnn``.

    Returns:
      ``{"emb": [vocab, embed], "W_e": [embed, hidden], "b_e": [hidden],
      "W": [2 * hidden, hidden], "b": [hidden]}``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> p = nn.init_tree_rnn(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> {k: v.shape for k, v in p.items()}
      {'W': (4, 2), 'W_e': (3, 2), 'b': (2,), 'b_e': (2,), 'emb': (5, 3)}
    """
    return _sample(
        key,
        (
            _embedding(vocab, embed),
            _dense("W_e", embed, hidden),
            _const("b_e", hidden),
            _dense("W", 2 * hidden, hidden),
            _const("b", hidden),
        ),
    )


# ---------------------------------------------------------------------- RNTN


@rj.recursive
def rntn(p, node):
    """Recursive neural tensor network of Socher et al. 2013 over binary trees.

    Reads ``node.data["token"]`` at leaves only; a leaf's state is its word vector.
    Equivalent to::

        def rntn(p, node):
            if node.is_leaf:
                return p["emb"][token]
            a, b = [rntn(p, c) for c in node.children]
            x = concatenate([a, b])                       # [2d]
            bilinear = einsum("i,kij,j->k", x, p["V"], x)  # x^T V[k] x for every k
            return tanh(bilinear + x @ p["W"] + p["b"])

    Args:
      p: parameters from ``init_rntn``.
      node: a node with zero or two children.

    Returns:
      ``h``, shape ``[hidden]``.

    Raises:
      ValueError: a node with one or more than two children.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_rntn(jax.random.key(0), vocab=5, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": 1}), rj.Tree({"token": 4})])
      >>> nn.rntn.batch(p, rj.Forest.from_trees([tree])).shape
      (3, 2)
    """
    if node.is_leaf:
        return p["emb"][node.data["token"]]
    a, b = _binary_children("rntn", node, lambda c: rntn(p, c))
    x = jnp.concatenate([a, b])
    bilinear = jnp.einsum("i,kij,j->k", x, p["V"], x)
    return tanh(bilinear + x @ p["W"] + p["b"])


def init_rntn(key, vocab, hidden):
    """Parameters of ``rntn`` (word vectors have size ``hidden``).

    Returns:
      ``{"emb": [vocab, hidden], "V": [hidden, 2 * hidden, 2 * hidden],
      "W": [2 * hidden, hidden], "b": [hidden]}``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> nn.init_rntn(jax.random.key(0), vocab=5, hidden=2)["V"].shape
      (2, 4, 4)
    """
    d2 = 2 * hidden
    return _sample(
        key,
        (
            _embedding(vocab, hidden),
            # x^T V[k] x sums (2d)^2 products: std 1 / 2d keeps it of order |x|^2 / 2d.
            ("V", (hidden, d2, d2), 1.0 / d2, 0.0),
            _dense("W", d2, hidden),
            _const("b", hidden),
        ),
    )


# ---------------------------------------------------------------------- N-ary Tree-LSTM


@rj.recursive
def tree_lstm(p, node):
    """N-ary Tree-LSTM of Tai et al. 2015 (binary for ``arity=2``).

    Every child position ``l`` has its own weights ``p["U"][l]``, which feed every gate,
    and its own forget gate ``f_l``. Reads ``node.data["token"]`` at every node (for
    constituency trees, give internal nodes a reserved token). A node with ``k`` children
    (``0 <= k <= arity``) uses only the first ``k`` position blocks: ``U[0..k-1]`` and the
    forget gates ``f_0..f_{k-1}``; the other blocks are ignored (as if those children
    had ``h = c = 0``), so a leaf is the ``k = 0`` case. Equivalent to::

        def tree_lstm(p, node):
            kids = [tree_lstm(p, c) for c in node.children]      # k <= arity
            g = p["emb"][token] @ p["W"] + p["b"]
            g += sum(h_l @ p["U"][l] for l, (h_l, _) in enumerate(kids))
            i, o, u, f = g[:H], g[H:2H], g[2H:3H], g[3H:].reshape(arity, H)
            c = sigmoid(i) * tanh(u) + sum(sigmoid(f[l]) * c_l for l, (_, c_l) in enumerate(kids))
            return sigmoid(o) * tanh(c), c

    The function iterates ``node.children``, so recjax compiles one template per arity
    found in the forest.

    Args:
      p: parameters from ``init_tree_lstm``.
      node: a node with at most ``arity`` children.

    Returns:
      ``(h, c)``, each of shape ``[hidden]``.

    Raises:
      ValueError: a node with more than ``arity`` children.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2, arity=3)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": 1}, [rj.Tree({"token": 2})]),
      ...                               rj.Tree({"token": 3}), rj.Tree({"token": 4})])
      >>> h, c = nn.tree_lstm.batch(p, rj.Forest.from_trees([tree]))
      >>> h.shape, c.shape
      ((5, 2), (5, 2))
    """
    arity, hidden = p["U"].shape[0], p["U"].shape[1]
    kids = [tree_lstm(p, c) for c in node.children]
    if len(kids) > arity:
        raise ValueError(
            f"tree_lstm has weights for {arity} child positions but got a node with "
            f"{len(kids)} children; use init_tree_lstm(..., arity={len(kids)}) or more, or "
            "child_sum_tree_lstm for any number of children."
        )
    g = p["emb"][node.data["token"]] @ p["W"] + p["b"]
    for l, (h_l, _) in enumerate(kids):
        g = g + h_l @ p["U"][l]
    i, o, u = g[:hidden], g[hidden : 2 * hidden], g[2 * hidden : 3 * hidden]
    c = sigmoid(i) * tanh(u)
    for l, (_, c_l) in enumerate(kids):
        f_l = g[(3 + l) * hidden : (4 + l) * hidden]
        c = c + sigmoid(f_l) * c_l
    return sigmoid(o) * tanh(c), c


def init_tree_lstm(key, vocab, embed, hidden, arity=2):
    """Parameters of ``tree_lstm`` for nodes of up to ``arity`` children.

    The gate columns are ``[i, o, u, f_0, ..., f_{arity-1}]``, ``hidden`` each; the
    forget-gate biases start at 1.

    Returns:
      ``{"emb": [vocab, embed], "W": [embed, G], "U": [arity, hidden, G], "b": [G]}``
      with ``G = (3 + arity) * hidden``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> p = nn.init_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2, arity=2)
      >>> p["W"].shape, p["U"].shape
      ((3, 10), (2, 2, 10))
    """
    gates = (3 + arity) * hidden
    return _sample(
        key,
        (
            _embedding(vocab, embed),
            _dense("W", embed, gates),
            ("U", (arity, hidden, gates), (arity * hidden) ** -0.5, 0.0),
            ("b", (gates,), 0.0, (0.0,) * (3 * hidden) + (1.0,) * (arity * hidden)),
        ),
    )


# ---------------------------------------------------------------------- Child-Sum Tree-LSTM


@rj.recursive
def child_sum_tree_lstm(p, node):
    """Child-Sum Tree-LSTM of Tai et al. 2015: any number of children, one template.

    Reads ``node.data["token"]`` at every node. Each child has its own forget gate,
    computed from the node's input ``x`` and that child's ``h``. Equivalent to::

        def child_sum_tree_lstm(p, node):
            x = p["emb"][token]
            kids = [child_sum_tree_lstm(p, c) for c in node.children]
            h_sum = sum((h for h, _ in kids), zeros(hidden))
            i, o, u = split(x @ p["W"] + h_sum @ p["U"] + p["b"], 3)
            c = sigmoid(i) * tanh(u) + sum(
                sigmoid(x @ p["W_f"] + h @ p["U_f"] + p["b_f"]) * c_k for h, c_k in kids)
            return sigmoid(o) * tanh(c), c

    Written with ``node.children.map``, so nodes of every arity share one template.

    Args:
      p: parameters from ``init_child_sum_tree_lstm``.
      node: a node with any number of children.

    Returns:
      ``(h, c)``, each of shape ``[hidden]``.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_child_sum_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": k}) for k in range(1, 5)])
      >>> h, c = nn.child_sum_tree_lstm.batch(p, rj.Forest.from_trees([tree]))
      >>> h.shape
      (5, 2)
    """
    x = p["emb"][node.data["token"]]
    hidden = p["U"].shape[0]
    zeros = jnp.zeros(hidden)  # the neutral element with h's shape, for leaves
    h_sum = node.children.map(lambda ch: child_sum_tree_lstm(p, ch)[0]).sum(initial=zeros)
    i, o, u = jnp.split(x @ p["W"] + h_sum @ p["U"] + p["b"], 3)

    def forget(ch):  # closes over the node-level x: one forget gate per child
        h, c = child_sum_tree_lstm(p, ch)
        return sigmoid(x @ p["W_f"] + h @ p["U_f"] + p["b_f"]) * c

    c = sigmoid(i) * tanh(u) + node.children.map(forget).sum(initial=zeros)
    return sigmoid(o) * tanh(c), c


def init_child_sum_tree_lstm(key, vocab, embed, hidden):
    """Parameters of ``child_sum_tree_lstm``; gate columns ``[i, o, u]``.

    Returns:
      ``{"emb": [vocab, embed], "W": [embed, 3 * hidden], "U": [hidden, 3 * hidden],
      "b": [3 * hidden], "W_f": [embed, hidden], "U_f": [hidden, hidden],
      "b_f": [hidden]}`` (forget bias 1).

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> nn.init_child_sum_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2)["U"].shape
      (2, 6)
    """
    return _sample(
        key,
        (
            _embedding(vocab, embed),
            _dense("W", embed, 3 * hidden),
            _dense("U", hidden, 3 * hidden),
            _const("b", 3 * hidden),
            _dense("W_f", embed, hidden),
            _dense("U_f", hidden, hidden),
            _const("b_f", hidden, 1.0),
        ),
    )


# ---------------------------------------------------------------------- bidirectional


@rj.recursive
def bidirectional_tree_lstm(p, node):
    """Bidirectional Tree-LSTM of Teng & Zhang 2017: a top-down LSTM over bottom-up states.

    The bottom-up pass is ``child_sum_tree_lstm`` with ``p["up"]``; the top-down pass
    feeds each node's bottom-up ``h`` into an LSTM whose previous state is the parent's
    top-down ``(h, c)`` (zeros at a root). Reads ``node.data["token"]`` at every node
    (bottom-up). Equivalent to::

        def bidirectional_tree_lstm(p, node):
            h_up = child_sum_tree_lstm(p["up"], node)[0]
            if node.is_root:
                h_prev = c_prev = zeros(hidden)
            else:
                h_prev, c_prev = bidirectional_tree_lstm(p, node.parent)
            i, f, o, u = split(h_up @ p["W"] + h_prev @ p["U"] + p["b"], 4)
            c = sigmoid(i) * tanh(u) + sigmoid(f) * c_prev
            return sigmoid(o) * tanh(c), c

    Reading ``node.parent`` makes the function top-down: the batch runs the bottom-up
    pass, then this one from the roots to the leaves, in one program. A node's
    representation for tagging is ``concat(h_up, h_down)``.

    Args:
      p: parameters from ``init_bidirectional_tree_lstm``.
      node: a node of a tree (top-down passes need one parent per node).

    Returns:
      ``(h, c)`` of the top-down pass, each of shape ``[hidden]``.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_bidirectional_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": 1}), rj.Tree({"token": 2})])
      >>> h, c = nn.bidirectional_tree_lstm.batch(p, rj.Forest.from_trees([tree]))
      >>> h.shape
      (3, 2)
    """
    h_up = child_sum_tree_lstm(p["up"], node)[0]
    if node.is_root:
        h_prev = c_prev = jnp.zeros(p["U"].shape[0])
    else:
        h_prev, c_prev = bidirectional_tree_lstm(p, node.parent)
    i, f, o, u = jnp.split(h_up @ p["W"] + h_prev @ p["U"] + p["b"], 4)
    c = sigmoid(i) * tanh(u) + sigmoid(f) * c_prev
    return sigmoid(o) * tanh(c), c


def init_bidirectional_tree_lstm(key, vocab, embed, hidden):
    """Parameters of ``bidirectional_tree_lstm``; top-down gate columns ``[i, f, o, u]``.

    Returns:
      ``{"up": init_child_sum_tree_lstm(...), "W": [hidden, 4 * hidden],
      "U": [hidden, 4 * hidden], "b": [4 * hidden]}`` (forget bias 1).

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> p = nn.init_bidirectional_tree_lstm(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> p["W"].shape, p["up"]["U"].shape
      ((2, 8), (2, 6))
    """
    k_up, k_down = jax.random.split(key)
    down = _sample(
        k_down,
        (
            _dense("W", hidden, 4 * hidden),
            _dense("U", hidden, 4 * hidden),
            ("b", (4 * hidden,), 0.0, (0.0,) * hidden + (1.0,) * hidden + (0.0,) * (2 * hidden)),
        ),
    )
    return {"up": init_child_sum_tree_lstm(k_up, vocab, embed, hidden), **down}


# ---------------------------------------------------------------------- Tree-GRU


@rj.recursive
def tree_gru(p, node):
    """A child-sum GRU cell over trees: any number of children, one reset gate per child.

    Reads ``node.data["token"]`` at every node. Equivalent to::

        def tree_gru(p, node):
            x = p["emb"][token]
            hs = [tree_gru(p, c) for c in node.children]
            h_sum = sum(hs, zeros(hidden))
            z = sigmoid(x @ p["W_z"] + h_sum @ p["U_z"] + p["b_z"])             # update gate
            r_h = sum((sigmoid(x @ p["W_r"] + h @ p["U_r"] + p["b_r"]) * h      # reset gate
                       for h in hs), zeros(hidden))                             # per child
            candidate = tanh(x @ p["W_h"] + r_h @ p["U_h"] + p["b_h"])
            return z * h_sum + (1 - z) * candidate

    A leaf is the no-children case: ``h = (1 - z) * tanh(x @ W_h + b_h)``.

    Args:
      p: parameters from ``init_tree_gru``.
      node: a node with any number of children.

    Returns:
      ``h``, shape ``[hidden]``.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_tree_gru(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": k}) for k in range(1, 4)])
      >>> nn.tree_gru.batch(p, rj.Forest.from_trees([tree])).shape
      (4, 2)
    """
    x = p["emb"][node.data["token"]]
    zeros = jnp.zeros(p["U_h"].shape[0])
    h_sum = node.children.map(lambda ch: tree_gru(p, ch)).sum(initial=zeros)
    z = sigmoid(x @ p["W_z"] + h_sum @ p["U_z"] + p["b_z"])

    def reset(ch):  # closes over the node-level x: one reset gate per child
        h = tree_gru(p, ch)
        return sigmoid(x @ p["W_r"] + h @ p["U_r"] + p["b_r"]) * h

    r_h = node.children.map(reset).sum(initial=zeros)
    candidate = tanh(x @ p["W_h"] + r_h @ p["U_h"] + p["b_h"])
    return z * h_sum + (1 - z) * candidate


def init_tree_gru(key, vocab, embed, hidden):
    """Parameters of ``tree_gru``.

    Returns:
      ``{"emb": [vocab, embed]}`` and, for each gate ``g`` in ``z`` (update), ``r``
      (reset) and ``h`` (candidate), ``"W_g": [embed, hidden]``, ``"U_g": [hidden,
      hidden]`` and ``"b_g": [hidden]``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> sorted(nn.init_tree_gru(jax.random.key(0), vocab=5, embed=3, hidden=2))
      ['U_h', 'U_r', 'U_z', 'W_h', 'W_r', 'W_z', 'b_h', 'b_r', 'b_z', 'emb']
    """
    spec = [_embedding(vocab, embed)]
    for g in "zrh":
        spec += [
            _dense(f"W_{g}", embed, hidden),
            _dense(f"U_{g}", hidden, hidden),
            _const(f"b_{g}", hidden),
        ]
    return _sample(key, tuple(spec))


# ---------------------------------------------------------------------- TreeFC


@rj.recursive
def tree_fc(p, node):
    """TreeFC, the fully connected binary tree cell of the Cavs and Cortex benchmarks.

    Reads ``node.data["token"]`` at leaves only; a leaf's state is a learned embedding.
    Equivalent to::

        def tree_fc(p, node):
            if node.is_leaf:
                return p["emb"][token]
            h_l, h_r = [tree_fc(p, c) for c in node.children]
            return tanh(concatenate([h_l, h_r]) @ p["W"] + p["b"])

    Args:
      p: parameters from ``init_tree_fc``.
      node: a node with zero or two children.

    Returns:
      ``h``, shape ``[hidden]``.

    Raises:
      ValueError: a node with one or more than two children.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_tree_fc(jax.random.key(0), vocab=5, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": 1}), rj.Tree({"token": 4})])
      >>> nn.tree_fc.batch(p, rj.Forest.from_trees([tree])).shape
      (3, 2)
    """
    if node.is_leaf:
        return p["emb"][node.data["token"]]
    h_l, h_r = _binary_children("tree_fc", node, lambda c: tree_fc(p, c))
    return tanh(jnp.concatenate([h_l, h_r]) @ p["W"] + p["b"])


def init_tree_fc(key, vocab, hidden):
    """Parameters of ``tree_fc``.

    Returns:
      ``{"emb": [vocab, hidden], "W": [2 * hidden, hidden], "b": [hidden]}``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> nn.init_tree_fc(jax.random.key(0), vocab=5, hidden=2)["W"].shape
      (4, 2)
    """
    return _sample(
        key, (_embedding(vocab, hidden), _dense("W", 2 * hidden, hidden), _const("b", hidden))
    )


# ---------------------------------------------------------------------- DAG-RNN


@rj.recursive
def dag_rnn(p, node):
    """A DAG-RNN computed bottom-up: a node reads the mean state of its children.

    Made for DAGs (a node may be the child of several nodes, and is computed once), and
    runs on trees too. Reads ``node.data["token"]`` at every node. Equivalent to::

        def dag_rnn(p, node):
            x = p["emb"][token]
            if node.is_leaf:
                return tanh(x @ p["W"] + p["b"])
            m = mean([dag_rnn(p, c) for c in node.children])
            return tanh(x @ p["W"] + m @ p["U"] + p["b"])

    Args:
      p: parameters from ``init_dag_rnn``.
      node: a node with any number of children.

    Returns:
      ``h``, shape ``[hidden]``.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_dag_rnn(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> dag = rj.Forest.from_children([[1, 2], [2], []], {"token": [0, 1, 2]})
      >>> nn.dag_rnn.batch(p, dag).shape  # node 2 has two parents
      (3, 2)
    """
    x = p["emb"][node.data["token"]] @ p["W"] + p["b"]
    if node.is_leaf:
        return tanh(x)
    m = node.children.map(lambda ch: dag_rnn(p, ch)).mean()
    return tanh(x + m @ p["U"])


def init_dag_rnn(key, vocab, embed, hidden):
    """Parameters of ``dag_rnn``.

    Returns:
      ``{"emb": [vocab, embed], "W": [embed, hidden], "U": [hidden, hidden],
      "b": [hidden]}``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> nn.init_dag_rnn(jax.random.key(0), vocab=5, embed=3, hidden=2)["U"].shape
      (2, 2)
    """
    return _sample(
        key,
        (
            _embedding(vocab, embed),
            _dense("W", embed, hidden),
            _dense("U", hidden, hidden),
            _const("b", hidden),
        ),
    )


# ---------------------------------------------------------------------- child attention


@rj.recursive
def child_attention(p, node):
    """Attention over a node's children, any number of them.

    The node's input queries its children's states; the softmax is computed with
    ``node.children.map`` and the max trick, closing over the node-level max ``m`` and
    normaliser ``s``. Reads ``node.data["token"]`` at every node. Equivalent to::

        def child_attention(p, node):
            x = p["emb"][token]
            if node.is_leaf:
                return tanh(x @ p["W"] + p["b"])
            hs = [child_attention(p, c) for c in node.children]
            q = x @ p["W_q"]
            scores = [q @ (h @ p["W_k"]) / sqrt(attention) for h in hs]
            m = max(scores)
            s = sum(exp(a - m) for a in scores)
            context = sum(exp(a - m) / s * h for a, h in zip(scores, hs))
            return tanh(x @ p["W"] + context @ p["U"] + p["b"])

    Args:
      p: parameters from ``init_child_attention``.
      node: a node with any number of children.

    Returns:
      ``h``, shape ``[hidden]``.

    Example:
      >>> import jax, recjax as rj
      >>> from recjax import nn
      >>> p = nn.init_child_attention(jax.random.key(0), vocab=5, embed=3, hidden=2)
      >>> tree = rj.Tree({"token": 0}, [rj.Tree({"token": k}) for k in range(1, 4)])
      >>> nn.child_attention.batch(p, rj.Forest.from_trees([tree])).shape
      (4, 2)
    """
    x = p["emb"][node.data["token"]]
    pre = x @ p["W"] + p["b"]
    if node.is_leaf:  # a softmax over no children has no max: leaves are their own case
        return tanh(pre)
    q = (x @ p["W_q"]) * p["W_q"].shape[1] ** -0.5

    def score(ch):
        return q @ (child_attention(p, ch) @ p["W_k"])

    m = node.children.map(score).max()
    s = node.children.map(lambda ch: jnp.exp(score(ch) - m)).sum()  # >= 1: the top child adds 1

    def weighted(ch):  # closes over the node-level m and s
        return jnp.exp(score(ch) - m) / s * child_attention(p, ch)

    context = node.children.map(weighted).sum()
    return tanh(pre + context @ p["U"])


def init_child_attention(key, vocab, embed, hidden, attention=None):
    """Parameters of ``child_attention``; ``attention`` (default ``hidden``) is the key size.

    Returns:
      ``{"emb": [vocab, embed], "W": [embed, hidden], "U": [hidden, hidden],
      "b": [hidden], "W_q": [embed, attention], "W_k": [hidden, attention]}``.

    Example:
      >>> import jax
      >>> from recjax import nn
      >>> p = nn.init_child_attention(jax.random.key(0), vocab=5, embed=3, hidden=2, attention=4)
      >>> p["W_q"].shape, p["W_k"].shape
      ((3, 4), (2, 4))
    """
    attention = hidden if attention is None else attention
    return _sample(
        key,
        (
            _embedding(vocab, embed),
            _dense("W", embed, hidden),
            _dense("U", hidden, hidden),
            _const("b", hidden),
            _dense("W_q", embed, attention),
            _dense("W_k", hidden, attention),
        ),
    )
