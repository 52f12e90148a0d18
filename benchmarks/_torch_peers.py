"""PyTorch peers: (c) eager per-node recursion and (d) hand-written level batching.

The cells are the arithmetic of ``_workloads``' models written with torch ops, in the
same three forms: ``leaf(p, tokens)``, ``node(p, token, kids)`` (one node, its
children's state tuples) and ``level(p, tokens, kids, parent, n)`` (one level's nodes,
children's states stacked per edge).

Importing this module imports torch and sets its intra-op threads to the machine's CPU
count (``RECJAX_BENCH_TORCH_THREADS`` overrides it). On a machine shared with other busy
processes, torch's OpenMP threads wait on each other at every op and small ops get orders
of magnitude slower; run the suite on an idle machine.
"""

from __future__ import annotations

import os

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("RECJAX_BENCH_TORCH_THREADS", os.cpu_count() or 1)))


def _sig(x):
    return torch.sigmoid(x)


# ---------------------------------------------------------------------- binary Tree-LSTM


def lstm_leaf(p, tokens):
    x = p["emb"][tokens]
    i, o, u = (x @ p["W"] + p["b"]).chunk(3, -1)
    c = _sig(i) * torch.tanh(u)
    return _sig(o) * torch.tanh(c), c


def lstm_internal(p, hl, cl, hr, cr):
    i, fl, fr, o, u = (torch.cat([hl, hr], -1) @ p["U"] + p["bu"]).chunk(5, -1)
    c = _sig(i) * torch.tanh(u) + _sig(fl) * cl + _sig(fr) * cr
    return _sig(o) * torch.tanh(c), c


def lstm_node(p, token, kids):
    return lstm_internal(p, *kids[0], *kids[1])


def lstm_level(p, tokens, kids, parent, n):
    h, c = (k.view(n, 2, -1) for k in kids)
    return lstm_internal(p, h[:, 0], c[:, 0], h[:, 1], c[:, 1])


# ---------------------------------------------------------------------- TreeFC


def fc_leaf(p, tokens):
    return (p["emb"][tokens],)


def fc_node(p, token, kids):
    (hl,), (hr,) = kids
    return (torch.tanh(torch.cat([hl, hr]) @ p["W"] + p["b"]),)


def fc_level(p, tokens, kids, parent, n):
    return (torch.tanh(kids[0].view(n, -1) @ p["W"] + p["b"]),)


# ---------------------------------------------------------------------- Child-Sum Tree-LSTM


def cs_leaf(p, tokens):
    x = p["emb"][tokens]
    i, o, u = (x @ p["W"] + p["b"]).chunk(3, -1)
    c = _sig(i) * torch.tanh(u)
    return _sig(o) * torch.tanh(c), c


def cs_node(p, token, kids):
    x = p["emb"][token]
    h = torch.stack([k[0] for k in kids])
    c = torch.stack([k[1] for k in kids])
    i, o, u = (x @ p["W"] + h.sum(0) @ p["U"] + p["b"]).chunk(3, -1)
    f = _sig(x @ p["W_f"] + h @ p["U_f"] + p["b_f"])
    c_new = _sig(i) * torch.tanh(u) + (f * c).sum(0)
    return _sig(o) * torch.tanh(c_new), c_new


def _segment_sum(x, parent, n):
    return x.new_zeros((n,) + x.shape[1:]).index_add_(0, parent, x)


def cs_level(p, tokens, kids, parent, n):
    h, c = kids
    x = p["emb"][tokens]
    i, o, u = (x @ p["W"] + _segment_sum(h, parent, n) @ p["U"] + p["b"]).chunk(3, -1)
    f = _sig((x @ p["W_f"]).index_select(0, parent) + h @ p["U_f"] + p["b_f"])
    c_new = _sig(i) * torch.tanh(u) + _segment_sum(f * c, parent, n)
    return _sig(o) * torch.tanh(c_new), c_new


CELLS = {  # model name -> (leaf, node, level)
    "tree_lstm": (lstm_leaf, lstm_node, lstm_level),
    "tree_fc": (fc_leaf, fc_node, fc_level),
    "child_sum": (cs_leaf, cs_node, cs_level),
}


# ---------------------------------------------------------------------- peers


def params_to_torch(p, requires_grad=False):
    """The JAX parameters as float32 torch tensors (copies)."""
    return {k: torch.tensor(np.asarray(v)).requires_grad_(requires_grad) for k, v in p.items()}


def _postorder(tree):
    order, stack = [], [tree]
    while stack:
        t = stack.pop()
        order.append(t)
        stack.extend(t.children)
    return order[::-1]


class TorchPerNode:
    """Peer (c): eager PyTorch, one cell call per node from a Python walk over each tree.

    Forward runs under ``torch.inference_mode``; training builds the autograd graph node
    by node and takes ``torch.autograd.grad`` of the root loss.
    """

    def __init__(self, model_name):
        self.leaf, self.node, _ = CELLS[model_name]

    def _roots_h(self, p, trees):
        roots = []
        for tree in trees:
            done = {}
            for t in _postorder(tree):
                token = int(t.data["token"])
                if t.is_leaf:
                    done[id(t)] = self.leaf(p, token)
                else:
                    done[id(t)] = self.node(p, token, tuple(done[id(c)] for c in t.children))
            roots.append(done[id(tree)][0])
        return torch.stack(roots)

    def forward(self, p, trees):
        with torch.inference_mode():
            return self._roots_h(p, trees)

    def train(self, p, trees):
        params = list(p.values())
        grads = torch.autograd.grad((self._roots_h(p, trees) ** 2).sum(), params)
        return dict(zip(p, grads))


class TorchLevels:
    """Peer (d): hand-written level batching in PyTorch.

    Takes the same host plan as the JAX level peer (``_workloads.Levels``). Leaves run as
    one batch; then per level: gather the children's states with index tensors, one
    batched cell call, and keep the level's output as its own tensor.

    Gathers read per-level tensors, never one growing buffer: in eager autograd, writing
    each level into slices of a preallocated ``[num_nodes, H]`` buffer makes the backward
    clone the whole buffer's gradient at every level (``CopySlices``), and gathering from
    it allocates a whole-buffer gradient per level; both cost levels x nodes, minutes per
    training step on a 10,000-node chain. Here every leaf child of every level is gathered
    in one ``index_select`` at the start and ``split`` per level (one concatenation in the
    backward), and internal children with one ``index_select`` per source level, so a
    level's gradient work is proportional to its own and its sources' sizes.
    """

    def __init__(self, model_name):
        self.leaf, _, self.level = CELLS[model_name]

    @staticmethod
    def tables(levels):
        """Index tensors (int64) for one batch, built once: for each level, where each
        child comes from (the leaves, or the rows of an earlier level) and the permutation
        that puts the gathered children back in edge order."""
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))
        starts = levels.starts
        leaf_rows, leaf_counts, out = [], [], []
        for lv in levels.levels:
            child = lv["child"].astype(np.int64)
            source = np.searchsorted(starts, child, side="right") - 1
            local = child - starts[source]
            edges = [np.flatnonzero(source == 0)]
            leaf_rows.append(local[edges[0]])
            leaf_counts.append(edges[0].size)
            sources = []
            for k in np.unique(source[source > 0]):
                e = np.flatnonzero(source == k)
                edges.append(e)
                sources.append((int(k), t(local[e])))
            gathered_order = np.concatenate(edges)
            out.append({
                "tokens": t(lv["tokens"]),
                "parent": t(lv["parent"]),
                "sources": sources,
                "to_edge_order": t(np.argsort(gathered_order)),
            })
        return {
            "leaf_tokens": t(levels.leaf_tokens),
            "leaf_rows": t(np.concatenate(leaf_rows)),
            "leaf_counts": leaf_counts,
            "levels": out,
            "roots": t(levels.roots),
        }

    def _states(self, p, tb):
        states = [self.leaf(p, tb["leaf_tokens"])]  # one state tuple per level
        leaf_kids = [s.index_select(0, tb["leaf_rows"]).split(tb["leaf_counts"]) for s in states[0]]
        for i, lv in enumerate(tb["levels"]):
            kids = tuple(
                torch.cat([leaf_kids[c][i]] + [states[k][c].index_select(0, rows) for k, rows in lv["sources"]])
                .index_select(0, lv["to_edge_order"])
                for c in range(len(states[0]))
            )
            states.append(self.level(p, lv["tokens"], kids, lv["parent"], lv["tokens"].shape[0]))
        return [torch.cat([s[c] for s in states]) for c in range(len(states[0]))]

    def forward(self, p, tb):
        """Every node's state (rows in ``Levels`` order)."""
        with torch.inference_mode():
            return self._states(p, tb)

    def train(self, p, tb):
        h = self._states(p, tb)[0]
        params = list(p.values())
        grads = torch.autograd.grad((h[tb["roots"]] ** 2).sum(), params)
        return dict(zip(p, grads))
