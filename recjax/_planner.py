"""Plan: turn the structure of a forest into padded per-step index tables (numpy only).

This module never imports jax: it runs on the host, in a loader thread if wanted, and
its output shapes depend on the data (it is not jittable). Everything the executor
needs under ``jit`` is in the returned tables, whose shapes come only from ``PlanKey``.

Buffer layout. The executor keeps one state buffer of ``PlanKey.num_buffer_rows`` rows:

  rows [0, num_leaf_rows)            the leaves, node order; the tail is padding
  then, for each phase p in order,   ``steps`` blocks of ``width`` rows each; block t
                                     holds the nodes computed at step t of the phase

A padding row copies a real internal node of its step (the one with the fewest
children): it reads that node's data, has its degree and its ``edge_start`` (so a
fixed-arity template reads that node's children), and owns one edge slot holding the
node's first child (so ``children.map`` reductions see a real child, never an empty sum
that node-level code might divide by). A cell evaluated on padding then sees a real
node's inputs: code that is finite at every real node is finite there, and so is its
gradient (a padding row's cotangent is zero, but ``0 * inf`` would be NaN). A step
without real rows copies a node whose children are leaves (see ``plan``); a padding leaf
row reads a real leaf. A padding row is told from a real one by ``row_of_node[node] !=
row``. Unused edge slots carry segment id ``width`` so that segment ops drop them, and
read the last row's first child (the row whose node-level values they borrow), so no
value crosses from one tree to another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Row widths of the step classes. A plan uses the set of classes that minimises the rows
# computed plus _STEP_COST rows per scan step and _PHASE_COST rows per class used (each
# class is a phase: one loop to compile, forward and backward; measured on the CPU, a
# Tree-LSTM training step compiles in 1.1 s with one phase and 2.8 s with three), see
# _width_class. The narrowest class serves only a long run of one-node levels at the top
# of the forest (a chain, a very deep tree): a short run (the top of the tallest tree of
# a random batch) stays in the other classes, so that whether a batch has one does not
# split its bucket. It is 2, not 1: with 1-row steps XLA:CPU turns the row reads into
# dynamic slices and copies the whole state buffer at every step (quadratic in the
# chain's length; 3x slower at 3,000 nodes, hidden 150); with 2-row steps it updates in
# place.
WIDTH_CLASSES = (2, 8, 32, 128, 512)
# 32, not 64: with 64, a batch of 32 ASTs took a 128-row class for a level of 19 nodes
# and padded its 13 steps to 16; with 32 the level takes three 8-row steps, and Child-Sum
# training ran 1.75x faster (52 -> 29 ms; mostly because its temporaries fell from 34.6
# to 28.0 MiB, under this CPU's 32 MiB L3: see benchmarks/RESULTS.md), other suite
# workloads within noise, SST batch 256 in one phase (128x48: compile 2.9 -> 1.5 s).
# Per-step overheads are larger on a GPU: this constant should come from the backend.
_STEP_COST = 32
_PHASE_COST = 512
# Every non-empty set of the classes _width_class chooses from (all but the narrowest).
CLASS_SETS = np.array(
    [[(s >> c) & 1 for c in range(len(WIDTH_CLASSES) - 1)] for s in range(1, 2 ** (len(WIDTH_CLASSES) - 1))],
    dtype=bool,
)  # [sets, classes]
_MIN_NARROW_RUN = 32


def ladder(n: int) -> int:
    """Rounds ``n`` up the geometric bucket ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, ...

    Every static size of a plan is a ladder value, so batches of similar size share a
    compiled program; the ratio between rungs (at most 1.5) bounds the padding waste.

    >>> [ladder(n) for n in (0, 1, 5, 7, 9, 13, 100)]
    [0, 1, 6, 8, 12, 16, 128]
    """
    n = int(n)
    if n <= 4:
        return max(n, 0)
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return p * 3 // 4 if n <= p * 3 // 4 else p


def fine_ladder(n: int) -> int:
    """Rounds ``n`` up a ladder of four rungs per octave: 1 .. 8, 10, 12, 14, 16, 20, 24, ...

    A plan's step counts, edge slots and leaf rows use it (at most 25% padding, 12% on
    average, where ``ladder``'s rungs pad by up to 50%); ``Forest.pad_all`` rounds the
    shapes it creates up ``ladder``, whose fewer rungs let more batches share a program.

    >>> [fine_ladder(n) for n in (0, 5, 9, 13, 17, 37, 100)]
    [0, 5, 10, 14, 20, 40, 112]
    """
    n = int(n)
    if n <= 8:
        return max(n, 0)
    q = 1 << ((n - 1).bit_length() - 3)  # an eighth of the power of two >= n
    return -(-n // q) * q


class PhaseKey(NamedTuple):
    """Static sizes of one phase: ``steps`` scan steps of ``width`` rows, ``edges`` child slots each."""

    width: int
    steps: int
    edges: int


class PlanKey(NamedTuple):
    """The static sizes of a plan: two plans with equal keys run the same compiled program.

    With node kinds (``plan(..., kind=...)``), ``leaf_blocks`` lays the leaf rows out as
    one block per kind, ``(kind, rows)`` in kind order, and ``kinds`` lists the kinds of
    internal nodes: every step computes nodes of one kind, ``kinds[step_kind]``.
    """

    num_leaf_rows: int
    num_node_rows: int
    phases: tuple[PhaseKey, ...]
    leaf_blocks: tuple[tuple[int, int], ...] = ()
    kinds: tuple[int, ...] = ()

    @property
    def num_buffer_rows(self) -> int:
        return self.num_leaf_rows + sum(p.width * p.steps for p in self.phases)

    def coarse(self) -> PlanKey:
        """This key with its step counts, edge slots and leaf rows rounded up ``ladder``
        (coarser rungs).

        ``Forest.pad_all`` creates shapes this way, so that later batches fit one more often.

        >>> PlanKey(10, 16, (PhaseKey(8, 10, 16),)).coarse()
        PlanKey(num_leaf_rows=12, num_node_rows=16, phases=(PhaseKey(width=8, steps=12, edges=16),), leaf_blocks=(), kinds=())
        """
        leaf_rows = self.num_leaf_rows if self.leaf_blocks else ladder(self.num_leaf_rows)
        phases = tuple(p._replace(steps=ladder(p.steps), edges=ladder(p.edges)) for p in self.phases)
        return self._replace(num_leaf_rows=leaf_rows, phases=phases)

    def union(self, other: PlanKey) -> PlanKey:
        """The smallest key at least as large as both: every size is the larger one.

        A forest planned with ``plan(..., at_least=a.union(b))`` runs the program of that
        key; planning a list of batches at their union gives them one compiled program.

        >>> a = PlanKey(4, 8, (PhaseKey(8, 2, 4),))
        >>> b = PlanKey(6, 6, (PhaseKey(32, 1, 32), PhaseKey(8, 1, 8)))
        >>> a.union(b)
        PlanKey(num_leaf_rows=6, num_node_rows=8, phases=(PhaseKey(width=32, steps=1, edges=32), PhaseKey(width=8, steps=2, edges=8)), leaf_blocks=(), kinds=())
        """
        by_width: dict[int, PhaseKey] = {}
        for p in self.phases + other.phases:
            q = by_width.get(p.width, PhaseKey(p.width, 0, 0))
            by_width[p.width] = PhaseKey(p.width, max(p.steps, q.steps), max(p.edges, q.edges))
        blocks: dict[int, int] = {}
        for k, rows in self.leaf_blocks + other.leaf_blocks:
            blocks[k] = max(rows, blocks.get(k, 0))
        leaf_blocks = tuple(sorted(blocks.items()))
        return PlanKey(
            max(self.num_leaf_rows, other.num_leaf_rows, sum(r for _, r in leaf_blocks)),
            max(self.num_node_rows, other.num_node_rows),
            tuple(by_width[w] for w in WIDTH_CLASSES[::-1] if w in by_width),
            leaf_blocks,
            tuple(sorted(set(self.kinds) | set(other.kinds))),
        )


@dataclasses.dataclass(frozen=True)
class PhaseTables:
    """Index tables of one phase; ``S`` steps, ``K`` rows and ``KE`` edge slots per step.

    Attributes:
      node: ``[S, K]`` node whose data each row reads (for a padding row, the real node
        it copies; node 0 in a forest without internal nodes).
      degree: ``[S, K]`` number of children of each row (a padding row: its node's).
      edge_start: ``[S, K]`` slot of each row's first child in the step's edge block;
        row r's children are slots ``edge_start[r] .. edge_start[r] + degree[r] - 1``
        (a padding row: its node's, which it reads but does not own; 0 in a step
        without real rows, whose slots hold that node's children in turn).
      edge_child: ``[S, KE]`` buffer row of the child on each edge slot (a padding row's
        slot: its node's first child; the last row's first child for unused slots).
      edge_segment: ``[S, KE]`` row (0..K-1) that owns each edge slot, ascending; ``K``
        for unused slots. A padding row owns one slot, after the real ones.
      step_kind: ``[S]`` index into ``PlanKey.kinds`` of the kind every row of the step
        has (0 without kinds); a step without real rows has its copied node's kind.
    """

    node: np.ndarray
    degree: np.ndarray
    edge_start: np.ndarray
    edge_child: np.ndarray
    edge_segment: np.ndarray
    step_kind: np.ndarray


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-step index tables for one forest (host arrays, int32).

    Attributes:
      key: the static sizes.
      leaf_node: ``[num_leaf_rows]`` node whose data each leaf row reads.
      row_of_node: ``[num_node_rows]`` buffer row holding node i's output (0 for padding).
      phases: one ``PhaseTables`` per entry of ``key.phases``.
      height: ``[num_nodes]`` height of every node (0 for leaves).
      class_steps: ``[sets, classes]`` steps each width class would take (before the
        ladder) with each set of classes (``CLASS_SETS``); batches padded together
        choose one set with ``shared_classes``.
      layout: the nodes' steps and rows before padding, for ``plan(..., reuse=)``.
    """

    key: PlanKey
    leaf_node: np.ndarray
    row_of_node: np.ndarray
    phases: tuple[PhaseTables, ...]
    height: np.ndarray
    class_steps: np.ndarray
    layout: _Layout | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_steps(self) -> int:
        """Sequential device steps after the leaves (the scan lengths added up)."""
        return sum(p.steps for p in self.key.phases)


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, counts)


def stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")``; small keys (heights, depths) are sorted as
    16-bit integers, for which numpy's stable sort is a radix sort (~8x faster)."""
    keys = np.asarray(keys)
    if keys.size and -(2**15) <= keys.min() and keys.max() < 2**15:
        keys = keys.astype(np.int16)
    return np.argsort(keys, kind="stable")


def heights(child_ptr: np.ndarray, child_idx: np.ndarray, parent: np.ndarray | None = None) -> np.ndarray:
    """Height of every node (0 for leaves, 1 + max over children otherwise).

    ``parent``: ``_parents(child_ptr, child_idx)`` if the caller has it. Where every node
    has at most one parent and the forest is shallow, ``_shallow_tree_heights`` (a
    round per level, no setup) is tried first; otherwise, and where it gives up:

    A node with one internal (non-leaf) child ``c`` has height ``height[c] + 1``
    whatever its leaf children (they add 1 at most), so runs of such nodes are contracted
    first by pointer jumping (O(N log L) for runs of length L): single-child chains and
    left-deep binary chains alike. The remaining graph is resolved level-synchronously:
    one round of numpy operations per level of the other nodes, none per node, and no
    recursion (following parent pointers where every node has one parent, through the
    edges sorted by child in a DAG). A 100,000-node chain takes about 17 rounds.

    Raises:
      ValueError: the children graph has a cycle; the message lists the nodes on it.
    """
    n = child_ptr.shape[0] - 1
    degree = np.diff(child_ptr)
    if parent is None:
        parent = _parents(child_ptr, child_idx)
    if parent is not None:
        height = _shallow_tree_heights(parent, degree)
        if height is not None:
            return height
    nodes = np.arange(n, dtype=np.int64)
    parent_of_edge = np.repeat(nodes, degree)
    # end[v]: the first node at or below v with other than one internal child; dist[v]:
    # how far. An edge to a node of a cycle counts as internal (the node has children).
    to_internal = degree[child_idx] > 0
    unary = np.bincount(parent_of_edge[to_internal], minlength=n) == 1
    end = nodes.copy()
    only = to_internal & unary[parent_of_edge]  # the one internal child of a unary node
    end[parent_of_edge[only]] = child_idx[only]
    dist = unary.astype(np.int64)
    for _ in range(max(n, 1).bit_length() + 1):
        nxt = end[end]
        if np.array_equal(nxt, end):
            break
        dist += dist[end]
        end = nxt
    stuck = end[end] != end  # on (or above) a cycle of single-child nodes

    # Longest paths over the contracted graph: an edge p -> c counts dist[c] + 1 levels.
    branching = ~unary
    keep = branching[parent_of_edge]
    e_parent, e_child = parent_of_edge[keep], child_idx[keep]
    e_target, e_weight = end[e_child], dist[e_child] + 1
    in_count = np.bincount(e_target, minlength=n)
    height = np.full(n, -1, dtype=np.int64)
    best = np.zeros(n, dtype=np.int64)
    pending = np.where(branching, degree, 0).astype(np.int64)
    frontier = np.flatnonzero(branching & (degree == 0) & ~stuck)
    if in_count.max(initial=0) <= 1:  # trees: one parent each, no sort and no unique
        up = np.full(n, -1, dtype=np.int64)
        weight = np.zeros(n, dtype=np.int64)
        up[e_target], weight[e_target] = e_parent, e_weight
        last = np.full(n, -1, dtype=np.int64)
        while frontier.size:
            height[frontier] = best[frontier]
            frontier = frontier[up[frontier] >= 0]
            parents = up[frontier]
            np.maximum.at(best, parents, height[frontier] + weight[frontier])
            np.subtract.at(pending, parents, 1)
            done = pending[parents] == 0
            frontier, parents = frontier[done], parents[done]
            last[parents] = frontier  # one child per finished parent wins the write
            frontier = parents[last[parents] == frontier]
    else:
        _dag_rounds(frontier, e_parent, e_target, e_weight, in_count, height, best, pending)
    resolved = (height[end] >= 0) & ~stuck
    height = np.where(resolved, height[end] + dist, -1)
    if (height < 0).any():
        raise ValueError(_describe_cycle(child_ptr, child_idx, height))
    return height


# _shallow_tree_heights gives up once the levels left are sure to be more than this.
_MAX_SHALLOW_ROUNDS = 64


def _shallow_tree_heights(parent: np.ndarray, degree: np.ndarray) -> np.ndarray | None:
    """Heights of a forest of trees, level by level from the leaves; None if it is deep.

    A node is ready once its last child is done, in the round numbered by its height, so
    a round is a dozen numpy operations over one level and nothing more. In a forest of
    trees no level is larger than the one below it (every node of height h + 1 has its
    own child of height h), so with ``r`` nodes left and ``f`` in the frontier at least
    ``r / f`` levels are left: past ``_MAX_SHALLOW_ROUNDS`` of them (a chain, a very deep
    tree) this gives up for ``heights``' contraction, which takes O(log) rounds. None
    too where nodes are never ready (a cycle: ``heights`` describes it).
    """
    n = degree.size
    up = np.where(parent >= 0, parent, n)  # roots point to a node that is never ready
    pending = np.append(degree, n + 1)  # more than the roots
    height = np.zeros(n, dtype=np.int64)
    last = np.empty(n + 1, dtype=np.int64)
    frontier = np.flatnonzero(degree == 0)
    left = n - frontier.size
    level = 0
    while left:
        parents = up[frontier]
        np.subtract.at(pending, parents, 1)
        done = pending[parents] == 0
        frontier, parents = frontier[done], parents[done]
        last[parents] = frontier  # one child per finished parent wins the write
        frontier = parents[last[parents] == frontier]
        if frontier.size == 0 or left > _MAX_SHALLOW_ROUNDS * frontier.size:
            return None
        level += 1
        height[frontier] = level
        left -= frontier.size
    return height


def _dag_rounds(frontier, e_parent, e_target, e_weight, in_count, height, best, pending):
    """``heights``' level-synchronous rounds where a node may have several parents
    (edges ``e_parent -> e_target`` of weight ``e_weight``); fills ``height`` in place."""
    by_target = np.argsort(e_target, kind="stable")
    target_ptr = np.zeros(height.size + 1, dtype=np.int64)
    np.cumsum(in_count, out=target_ptr[1:])
    in_parent, in_weight = e_parent[by_target], e_weight[by_target]
    while frontier.size:
        height[frontier] = best[frontier]
        starts = target_ptr[frontier]
        sel = concat_ranges(starts, target_ptr[frontier + 1] - starts)
        if sel.size == 0:
            break
        parents = in_parent[sel]
        reach = np.repeat(height[frontier], target_ptr[frontier + 1] - starts) + in_weight[sel]
        np.maximum.at(best, parents, reach)
        uniq, counts = np.unique(parents, return_counts=True)
        pending[uniq] -= counts
        frontier = uniq[pending[uniq] == 0]


def _describe_cycle(child_ptr, child_idx, height) -> str:
    # Error path only: walk unresolved children from an unresolved node until one repeats.
    # Every unresolved node has an unresolved child, so the walk must close a cycle.
    node = int(np.flatnonzero(height < 0)[0])
    seen: dict[int, int] = {}
    path: list[int] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        kids = child_idx[child_ptr[node] : child_ptr[node + 1]]
        node = int(kids[height[kids] < 0][0])
    cycle = path[seen[node] :] + [node]
    shown = " -> ".join(map(str, cycle[:12])) + (" -> ..." if len(cycle) > 12 else "")
    return (
        f"the forest has a cycle through nodes {shown}: node {cycle[0]} is its own "
        "descendant. A forest must be acyclic (a tree or a DAG); check the parent or "
        "children arrays."
    )


def _spare_donor(height, degree) -> int:
    """The node padding rows copy in steps without real rows: a node of height 1 (its
    children are leaves, computed before every step) with the fewest children; -1 if
    the forest has no internal node. Its kind becomes the padding step's kind."""
    low = np.flatnonzero(height == 1)
    return int(low[np.argmin(degree[low])]) if low.size else -1


def _leaf_blocks(leaves, kind, row_of_node, at_least):
    """Leaf rows as one block per kind (kind order), each a ladder size; the layout."""
    leaf_kind = kind[leaves]
    sizes = dict(zip(*np.unique(leaf_kind, return_counts=True)))
    floor = dict(at_least.leaf_blocks) if at_least is not None else {}
    blocks = tuple(
        (int(k), max(ladder(int(sizes.get(k, 0))), floor.get(k, 0)))
        for k in sorted(set(sizes) | set(floor))
    )
    offset = dict(zip((k for k, _ in blocks), np.cumsum([0] + [r for _, r in blocks])[:-1]))
    by_kind = leaves[stable_order(leaf_kind)]
    sorted_kind = kind[by_kind]
    rank = np.arange(by_kind.size) - np.searchsorted(sorted_kind, sorted_kind)
    block_start = np.zeros(max(offset) + 1, dtype=np.int64)
    block_start[list(offset)] = list(offset.values())
    row_of_node[by_kind] = block_start[sorted_kind] + rank
    leaf_node = np.empty(sum(r for _, r in blocks), dtype=np.int64)
    for k, rows in blocks:  # padding rows of a block read a leaf of that kind if any
        mine = by_kind[sorted_kind == k]
        start = offset[k]
        leaf_node[start : start + rows] = mine[0] if mine.size else leaves[0]
        leaf_node[start : start + mine.size] = mine
    return blocks, row_of_node, leaf_node


def _width_class(n: np.ndarray, allowed: np.ndarray | None = None):
    """Width class of each level (``n`` rows each, in height order), not growing with height.

    For every set of classes, each level takes its cheapest class in the set (then the
    width is made not to grow with height); the set chosen minimises what the plan will
    cost (``_set_cost``): the rows computed, an overhead per scan step, and one per phase
    (a loop that is compiled forward and backward). With ``allowed`` (a bool mask over
    ``CLASS_SETS``' classes) only that set is used.

    Two sets are chosen: one where every level takes whole steps, and one for a plan
    that fills steps across levels (see ``_pack``), where a class's steps are estimated
    as its nodes over its width, and at least one per level (a node comes after its
    child of the level below).

    Returns:
      ``(width, class_steps, packed_width)``: ``[levels]`` widths with whole steps per
      level, their ``[sets, classes]`` steps, and the ``[levels]`` widths of the set
      chosen for packed steps (``width`` where ``allowed`` fixes the set).
    """
    width = np.zeros(n.size, dtype=np.int64)
    classes = np.array(WIDTH_CLASSES[1:])
    # levels are in height order: a long run of one-node levels at the top gets width 2
    run = n.size - (np.flatnonzero(n != 1)[-1] + 1 if (n != 1).any() else 0)
    if run >= _MIN_NARROW_RUN:
        width[n.size - run :] = WIDTH_CLASSES[0]
        n = n[: n.size - run]
    if not n.size:
        return width, np.zeros(CLASS_SETS.shape, dtype=np.int64), width
    steps = -(-n[:, None] // classes[None, :])  # [levels, classes]
    level_cost = steps * (_STEP_COST + classes[None, :])
    cost = np.where(CLASS_SETS[:, None, :], level_cost[None], np.iinfo(np.int64).max)
    # [sets, levels]: the cheapest class of each level, then the running maximum from
    # the top (class indices grow with the width), so that widths never grow with height
    pick = np.maximum.accumulate(np.argmin(cost, axis=2)[:, ::-1], axis=1)[:, ::-1]
    in_class = pick[:, :, None] == np.arange(classes.size)  # [sets, levels, classes]
    class_steps = np.sum(np.where(in_class, steps[None], 0), axis=1)
    packed_width = width.copy()
    if allowed is None or not allowed.any():
        chosen = int(np.argmin(_set_cost(class_steps)))
        packed_steps = np.maximum(
            -(-np.sum(np.where(in_class, n[None, :, None], 0), axis=1) // classes), np.sum(in_class, axis=1)
        )
        packed_width[: n.size] = classes[pick[int(np.argmin(_set_cost(packed_steps)))]]
    else:
        chosen = int(np.flatnonzero((CLASS_SETS == allowed).all(axis=1))[0])
        packed_width[: n.size] = classes[pick[chosen]]
    width[: n.size] = classes[pick[chosen]]
    return width, class_steps, packed_width


def _class_depths(parent, order, level_size, level_classes, packed) -> list:
    """The internal nodes' distances from the top of their class's run of levels, in
    ``order``, for each of ``level_classes`` (widths of the levels); None where no class
    is packed (``packed``: each one's ``_packed``). One pointer-jumping pass over the
    internal nodes serves all of them."""
    todo = [i for i, p in enumerate(packed) if p]
    if not todo:
        return [None] * len(level_classes)
    n, m = parent.size, order.size
    position = np.full(n + 1, -1, dtype=np.int64)  # n: the roots' parent (-1)
    position[order] = np.arange(m)
    up = position[parent[order]]
    offset = np.arange(len(todo))[:, None] * m  # one copy of the internal nodes each
    stacked = np.where(up >= 0, up + offset, -1).ravel()
    cls = np.concatenate([np.repeat(level_classes[i], level_size) for i in todo])
    depth = dict(zip(todo, _depth_in_class(stacked, cls).reshape(len(todo), m)))
    return [depth.get(i) for i in range(len(level_classes))]


def _runs(level_size: np.ndarray, level_class: np.ndarray) -> dict:
    """Each class's levels and nodes (positions in ``order``) as slices, ``{width: (levels,
    nodes)}``: widths never grow with height, so a class is one run of levels."""
    if not level_class.size:
        return {}
    change = np.flatnonzero(level_class[1:] != level_class[:-1]) + 1
    bounds = np.concatenate(([0], change, [level_class.size]))
    node_bounds = np.concatenate(([0], np.cumsum(level_size)))[bounds].tolist()
    bounds, widths = bounds.tolist(), level_class[bounds[:-1]].tolist()
    return {
        w: (slice(bounds[i], bounds[i + 1]), slice(node_bounds[i], node_bounds[i + 1]))
        for i, w in enumerate(widths)
    }


def _packed(level_size: np.ndarray, runs: dict) -> list:
    """The widths whose levels ``_pack`` lays out (for trees): not the narrowest class
    (one-node chain levels), and only where the level-by-level layout leaves a step's
    worth of rows that a later level could fill."""
    out = []
    for width, (levels, _) in runs.items():
        gaps = int(np.sum(-level_size[levels][:-1] % width))
        if width != WIDTH_CLASSES[0] and gaps >= width:
            out.append(width)
    return out


def _layout(order, level_size, runs, child_ptr, child_idx, depth, packed, scratch):
    """Every class's nodes and their slots (``step * width + row``), widest class first.

    ``order``: the internal nodes level by level (``level_size`` each, in height order);
    ``runs``: each class's levels (``_runs``); ``depth``: ``_class_depths``. The classes
    in ``packed`` fill steps across levels (``_pack``); in the others each level starts
    a step.
    """
    out = []
    for width in WIDTH_CLASSES[::-1]:
        if width not in runs:
            out.append((width, order[:0], order[:0]))
            continue
        levels, at = runs[width]
        nodes = order[at]
        if width in packed:
            slot = _pack(nodes, depth[at], width, child_ptr, child_idx, scratch)
            by_slot = np.full(int(slot.max()) + 1, -1, dtype=np.int64)  # slots are distinct
            by_slot[slot] = np.arange(slot.size)
            by_slot = by_slot[by_slot >= 0]
            nodes, slot = nodes[by_slot], slot[by_slot]
        else:  # a level's k-th node: row k % width of its (k // width)-th step
            sizes = level_size[levels]
            steps = -(-sizes // width)
            first_slot = (np.cumsum(steps) - steps) * width
            slot = np.arange(nodes.size) + np.repeat(first_slot - (np.cumsum(sizes) - sizes), sizes)
        out.append((width, nodes, slot))
    return out


def _estimated_cost(level_size, runs, depth, packed) -> int:
    """What ``_set_cost`` charges for a layout (rows, steps and phases after the ladder),
    before it is laid out: a packed class takes ``max_j (j + ceil(n_j / width))`` steps
    for ``n_j`` its nodes at least ``j`` below the top of the phase (Hu's bound, which
    ``_pack`` reaches), the others a whole number of steps per level."""
    cost = 0
    for width, (levels, at) in runs.items():
        if width in packed:
            below = np.bincount(depth[at])[::-1].cumsum()[::-1]
            steps = int(np.max(np.arange(below.size) - (-below // width)))
        else:
            steps = int(np.sum(-(-level_size[levels] // width)))
        cost += fine_ladder(steps) * (_STEP_COST + width) + _PHASE_COST
    return cost


def _parents(child_ptr: np.ndarray, child_idx: np.ndarray) -> np.ndarray | None:
    """Every node's parent (-1 for roots), or None where a node has several parents."""
    n = child_ptr.shape[0] - 1
    if np.bincount(child_idx, minlength=n).max(initial=0) > 1:
        return None
    parent = np.full(n, -1, dtype=np.int64)
    parent[child_idx] = np.repeat(np.arange(n, dtype=np.int64), np.diff(child_ptr))
    return parent


def _depth_in_class(parent: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Every node's distance up to its highest ancestor of the same class (``cls[v]``).

    A class is a run of levels, so this is the distance from the top of the node's
    phase. Pointer jumping: O(N log D) for depth D, whatever the shape.
    """
    nodes = np.arange(parent.size, dtype=np.int64)
    up = parent >= 0
    up[up] = cls[parent[up]] == cls[up]
    jump = np.where(up, parent, nodes)
    depth = up.astype(np.int64)
    for _ in range(max(parent.size, 1).bit_length() + 1):
        nxt = jump[jump]
        if np.array_equal(nxt, jump):
            break
        depth += depth[jump]
        jump = nxt
    return depth


def _pack(nodes, depth, width, child_ptr, child_idx, scratch) -> np.ndarray:
    """Slots (``step * width + row``) of one phase's nodes, filling steps across levels.

    Hu's list schedule: step by step, the ready nodes (every child in an earlier step or
    an earlier phase) farthest from the top of the phase (``depth``, one per node) go
    first. It takes the fewest steps a tree can take at this width,
    ``max_j (j + ceil(n_j / width))`` with ``n_j`` the nodes at least ``j`` below the top.

    Computed a depth at a time, farthest first: the deeper nodes never wait for
    shallower ones, so their steps are final before a group is placed, and the group
    takes, step by step, the rows they left free. A group is a queue: its nodes arrive
    at their ready steps (one after the latest child's), step ``t`` serves
    ``min(backlog, free rows)`` of them, and the departures through step ``t`` are
    ``C(t) + min(0, min_{s <= t} (A(s) - C(s)))`` for ``A``, ``C`` the arrivals and free
    rows through ``t``: a dozen numpy operations per depth. ``scratch``: ``[num_nodes]``
    all 1 (a node of an earlier phase makes its parent ready at step 1); it holds the
    step after each node's while this runs.

    For a batch of 256 SST-like binary trees (4,511 internal nodes, 13 levels) at width
    128 this takes 36 steps where the level-by-level layout takes 44.
    """
    by_depth = stable_order(-depth)
    nodes, d = nodes[by_depth], depth[by_depth]
    ends = np.flatnonzero(d[1:] != d[:-1]) + 1
    firsts, ends = np.concatenate(([0], ends)), np.concatenate((ends, [nodes.size]))
    starts = child_ptr[nodes]
    deg = child_ptr[nodes + 1] - starts  # >= 1: a phase holds internal nodes
    edge_end = np.cumsum(deg)
    edge_first = edge_end - deg
    kids = child_idx[np.arange(int(edge_end[-1])) + np.repeat(starts - edge_first, deg)]  # node by node
    # A list schedule never idles a row while a node is ready, so it ends within
    # ceil(nodes / width) steps plus the longest chain (Graham's bound). Step 0 below is
    # a step before the phase with no rows (it keeps the arrays free of edge cases).
    horizon = -(-nodes.size // width) + int(d[0]) + 2
    small = np.int16 if horizon < 2**15 else np.int64  # stable sorts of int16 are radix sorts
    free = np.full(horizon, width, dtype=np.int64)  # rows left per step
    free[0] = 0
    count = np.arange(int(np.max(ends - firsts)), dtype=np.int64)
    slot = np.empty(nodes.size, dtype=np.int64)
    group_edge_first = edge_first - np.repeat(edge_first[firsts], ends - firsts)  # from the group's first
    step_end = np.arange(horizon, dtype=np.int64) * width  # one past the step's last slot
    groups = zip(firsts.tolist(), ends.tolist(), edge_first[firsts].tolist(), edge_end[ends - 1].tolist())
    for first, end, e0, e1 in groups:
        ready = np.maximum.reduceat(scratch[kids[e0:e1]], group_edge_first[first:end])
        queue = first + np.argsort(ready.astype(small), kind="stable")  # first come, first served
        rows = np.cumsum(free)
        served = rows + np.minimum(np.minimum.accumulate(np.cumsum(np.bincount(ready, minlength=horizon)) - rows), 0)
        c = count[: end - first]
        step = np.searchsorted(served, c, side="right")
        # a step's first free slot, less the group's nodes served before it
        first_free = step_end - free
        first_free[1:] -= served[:-1]
        slot[queue] = first_free[step] + c
        free[1:] -= served[1:] - served[:-1]
        scratch[nodes[queue]] = step + 1
    scratch[nodes] = 1
    out = np.empty_like(slot)
    out[by_depth] = slot
    return out


def _set_cost(class_steps: np.ndarray) -> np.ndarray:
    """Cost of a plan per set of classes: ``fine_ladder(steps) * (_STEP_COST + width)`` per
    class plus ``_PHASE_COST`` per class used (``class_steps``: ``[sets, classes]``)."""
    classes = np.array(WIDTH_CLASSES[1:])
    return np.sum(_fine_ladders(class_steps) * (_STEP_COST + classes) + (class_steps > 0) * _PHASE_COST, axis=-1)


def _fine_ladders(n: np.ndarray) -> np.ndarray:
    """``fine_ladder`` of every element of an integer array."""
    n = np.maximum(np.asarray(n, dtype=np.int64), 0)
    if n.size and n.max() < _FINE_LADDER.size:
        return _FINE_LADDER[n]
    bits = np.frexp(np.maximum(n - 1, 1).astype(np.float64))[1]  # (n - 1).bit_length()
    q = np.left_shift(1, np.maximum(bits - 3, 0)).astype(np.int64)
    return np.where(n <= 8, n, -(-n // q) * q)


_FINE_LADDER = np.array([fine_ladder(n) for n in range(4096)], dtype=np.int64)


def shared_classes(steps: Sequence[np.ndarray]) -> PlanKey:
    """The width classes for forests padded together: the set whose union costs least.

    ``steps`` holds each forest's ``class_steps`` (of its plan, or of ``class_steps``).
    Returns a key with an empty phase of each chosen class: planning with it as
    ``at_least`` restricts a forest to those classes, so the forests' phases agree
    (each choosing its own set, random batches differ and their union holds every
    class any of them chose).
    """
    steps = np.max(np.stack(steps), axis=0)
    best = int(np.argmin(_set_cost(steps)))
    used = CLASS_SETS[best] & (steps[best] > 0)
    widths = [w for w, u in zip(WIDTH_CLASSES[1:], used) if u] or [WIDTH_CLASSES[1]]
    return PlanKey(0, 0, tuple(PhaseKey(w, 0, 0) for w in widths[::-1]))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What ``plan`` computes before the padded sizes are known: heights, the class
    steps, and every phase's nodes and slots (``_layout``) for the allowed classes."""

    allowed: tuple | None  # the width classes it was laid out for (None: any)
    height: np.ndarray
    class_steps: np.ndarray
    phases: list  # [(width, nodes, slot)], widest first
    kinds: tuple  # the kinds of the internal nodes' groups


def _groups(child_ptr, child_idx, degree, kind, parent):
    """Heights, the internal nodes in group order, and each group's size and kind.

    Steps hold nodes of one level (and one kind): a group. Without kinds a group is a
    level; with kinds, a (height, kind) pair, in order of height then kind. ``parent``:
    ``_parents``.
    """
    height = heights(child_ptr, child_idx, parent)
    internal = np.flatnonzero(degree > 0)
    group_key = height[internal] if kind is None else height[internal] * (int(kind.max()) + 1) + kind[internal]
    by_group = stable_order(group_key)
    order, sorted_key = internal[by_group], group_key[by_group]  # by group, then id
    if kind is None:  # every level from 1 to the top holds a node
        level_size = np.bincount(sorted_key)[1:]
        return height, order, level_size, np.zeros(level_size.size, np.int64)
    first = np.flatnonzero(np.r_[sorted_key.size > 0, sorted_key[1:] != sorted_key[:-1]])
    groups, level_size = sorted_key[first], np.diff(np.r_[first, sorted_key.size])
    return height, order, level_size, groups % (int(kind.max()) + 1)


def class_steps(child_ptr: np.ndarray, child_idx: np.ndarray, kind: np.ndarray | None = None) -> np.ndarray:
    """``plan(child_ptr, child_idx, kind=kind).class_steps`` without the rest of the plan.

    What ``shared_classes`` needs of a forest that is planned again at the chosen
    classes anyway (``Forest.pad_all`` of trees): heights and level sizes, no layout.
    """
    child_ptr = np.asarray(child_ptr, dtype=np.int64)
    child_idx = np.asarray(child_idx, dtype=np.int64)
    parent = _parents(child_ptr, child_idx)
    _, _, level_size, _ = _groups(child_ptr, child_idx, np.diff(child_ptr), kind, parent)
    return _width_class(level_size)[1]


def _lay_out(child_ptr, child_idx, degree, allowed, kind) -> _Layout:
    """``plan``'s layout of a forest for the width classes ``allowed`` (a bool per class
    of ``WIDTH_CLASSES[1:]``, or None to choose them)."""
    n = degree.size
    parent = _parents(child_ptr, child_idx)  # None for a DAG
    height, order, level_size, group_kind = _groups(child_ptr, child_idx, degree, kind, parent)
    # Classes must not grow with height so that each class is one run of levels.
    mask = None if allowed is None else np.array(allowed)
    level_class, class_steps, alt = _width_class(level_size, mask)
    # Steps filled across levels (_pack) can make another set of classes cheaper than the
    # one chosen for whole steps per level: cost both, lay out the cheaper.
    scratch = np.ones(n, dtype=np.int64)
    trees = parent is not None and kind is None  # steps of one kind are not packed
    runs = _runs(level_size, level_class)
    packed = _packed(level_size, runs) if trees else []
    layout = None
    if trees and allowed is None and not np.array_equal(alt, level_class):
        alt_runs = _runs(level_size, alt)
        alt_packed = _packed(level_size, alt_runs)
        depth, alt_depth = _class_depths(parent, order, level_size, [level_class, alt], [packed, alt_packed])
        if _estimated_cost(level_size, alt_runs, alt_depth, alt_packed) < _estimated_cost(
            level_size, runs, depth, packed
        ):
            layout = _layout(order, level_size, alt_runs, child_ptr, child_idx, alt_depth, alt_packed, scratch)
    else:
        (depth,) = _class_depths(parent, order, level_size, [level_class], [packed])
    if layout is None:
        layout = _layout(order, level_size, runs, child_ptr, child_idx, depth, packed, scratch)
    kinds = tuple(sorted(set(group_kind.tolist()))) if kind is not None else ()
    return _Layout(allowed, height, class_steps, layout, kinds)


def plan(
    child_ptr: np.ndarray,
    child_idx: np.ndarray,
    at_least: PlanKey | None = None,
    kind: np.ndarray | None = None,
    reuse: Plan | None = None,
) -> Plan:
    """Plans the bottom-up evaluation of a forest given as children CSR arrays.

    Equivalent program (what the executor does with the plan)::

      for node in leaves: out[node] = leaf_cell(data[node])            # one batched op
      for level in 1 .. max height:                                   # scan steps
        for node at this level: out[node] = cell(data[node], out[children of node])

    Not jittable: the output shape depends on the data.

    Args:
      child_ptr: ``[N + 1]`` CSR offsets; node i's children are
        ``child_idx[child_ptr[i]:child_ptr[i + 1]]``, in order.
      child_idx: ``[E]`` child node ids, already validated to lie in ``[0, N)``.
      at_least: optional key; every static size of the plan is at least its size
        (extra steps and rows are padding), so several forests can share one program.
      kind: optional ``[N]`` non-negative kind ids. Then leaves are laid out in one
        block per kind and every step holds nodes of one height and one kind, so that a
        function specialised per kind runs one kind's code per step.
      reuse: optional plan of the same forest (and kinds): where ``at_least`` allows
        the same width classes as it did, its layout (which nodes go to which step and
        row, the costly part) is taken as it is and only the tables are rebuilt.

    Returns:
      A ``Plan``.

    Raises:
      ValueError: the graph has a cycle.
    """
    child_ptr = np.asarray(child_ptr, dtype=np.int64)
    child_idx = np.asarray(child_idx, dtype=np.int64)
    n = child_ptr.shape[0] - 1
    degree = np.diff(child_ptr)
    floor = {p.width: p for p in at_least.phases} if at_least is not None else {}
    allowed = None
    if at_least is not None:  # the classes of the key it must fit
        allowed = tuple(np.isin(WIDTH_CLASSES[1:], [p.width for p in at_least.phases]).tolist())
    lay = reuse.layout if reuse is not None else None
    lay = lay if lay is not None and lay.allowed == allowed else None
    if lay is None:
        lay = _lay_out(child_ptr, child_idx, degree, allowed, kind)
    height, class_steps, layout = lay.height, lay.class_steps, lay.phases
    kinds = ()
    if kind is not None:
        kinds = tuple(sorted(set(lay.kinds) | set(at_least.kinds if at_least else ())))

    leaves = np.flatnonzero(degree == 0)
    row_of_node = np.zeros(max(ladder(n), at_least.num_node_rows if at_least else 0), dtype=np.int64)
    leaf_blocks: tuple = ()
    if kind is None:
        num_leaf_rows = max(fine_ladder(leaves.size), at_least.num_leaf_rows if at_least else 0)
        row_of_node[leaves] = np.arange(leaves.size)
        leaf_node = np.full(num_leaf_rows, leaves[0], dtype=np.int64)
        leaf_node[: leaves.size] = leaves
    else:
        leaf_blocks, row_of_node, leaf_node = _leaf_blocks(leaves, kind, row_of_node, at_least)
        num_leaf_rows = max(sum(r for _, r in leaf_blocks), at_least.num_leaf_rows if at_least else 0)
        leaf_node = np.concatenate([leaf_node, np.full(num_leaf_rows - leaf_node.size, leaves[0])])

    # First pass: every node's buffer row, phase by phase.
    phases = []
    base = num_leaf_rows
    for width, nodes, slot in layout:
        real_steps = int(slot[-1]) // width + 1 if slot.size else 0
        steps = max(fine_ladder(real_steps), floor[width].steps if width in floor else 0)
        if steps == 0:
            continue
        row_of_node[nodes] = base + slot
        phases.append((width, steps, nodes, slot))
        base += steps * width

    # Second pass: the tables (children's rows are known now). Nodes are in slot order,
    # so a step's nodes are contiguous, take its first rows, and own its first edge slots.
    spare = _spare_donor(height, degree)
    phase_keys, tables = [], []
    for width, steps, nodes, slot in phases:
        step = slot // width
        deg = degree[nodes]
        edge_end = np.cumsum(deg)
        real_rows = np.bincount(step, minlength=steps)
        node_end = np.cumsum(real_rows)  # one past a step's last node
        edge_bound = np.concatenate(([0], edge_end))
        step_edge_first = edge_bound[node_end - real_rows]
        real_edges = edge_bound[node_end] - step_edge_first
        # Padding rows copy a donor: the step's real row with the fewest children (so its
        # kind too). They read its data and, in fixed-arity templates, its children (from
        # its slots), and each owns one slot after the real edges holding its first child
        # (a map reduction sees a real child, never an empty sum). A step without real
        # rows copies a node whose children are leaves (the step gets its kind): row r
        # owns slot r, holding the node's child r % degree, and every row reads the
        # node's children from slot 0 on. Without any internal node: node 0, degree 0,
        # one slot holding row 0.
        donor = np.full(steps, spare, dtype=np.int64)
        donor_start = np.zeros(steps, dtype=np.int64)
        if nodes.size:
            first = np.lexsort((deg, step))  # by step, then by degree
            head = first[np.r_[True, step[first][1:] != step[first][:-1]]]
            donor[step[head]] = nodes[head]
            donor_start[step[head]] = edge_end[head] - deg[head] - step_edge_first[step[head]]
        donor_deg = np.where(donor >= 0, degree[np.maximum(donor, 0)], 0)
        pad_rows = width - real_rows
        num_edges = fine_ladder(int((real_edges + pad_rows).max()))
        num_edges = max(num_edges, floor[width].edges if width in floor else 0, 1)
        phase_keys.append(PhaseKey(width, steps, num_edges))
        step_kind = np.zeros(steps, dtype=np.int32)
        if kinds:
            has_donor = donor >= 0
            step_kind[has_donor] = np.searchsorted(kinds, kind[donor[has_donor]])

        node_t = np.repeat(np.maximum(donor, 0), width).astype(np.int32)
        degree_t = np.repeat(donor_deg, width).astype(np.int32)
        node_t[slot] = nodes
        degree_t[slot] = deg
        own_slot = (real_edges - real_rows)[:, None] + np.arange(width)  # a padding row's slot
        start_t = np.where((donor_deg > 0)[:, None], donor_start[:, None], own_slot)
        start_t.reshape(-1)[slot] = edge_end - deg - step_edge_first[step]

        # Real edges, flat in [steps, num_edges]: edge e of the phase (node order) goes
        # to slot e - step_edge_first of its node's step.
        first_edge = edge_end - deg
        edge_slot = np.arange(int(edge_bound[-1]), dtype=np.int64) + np.repeat(
            step * num_edges - step_edge_first[step], deg
        )
        edge_src = np.arange(edge_slot.size, dtype=np.int64) + np.repeat(child_ptr[nodes] - first_edge, deg)
        edge_child = np.zeros(steps * num_edges, dtype=np.int64)
        edge_child[edge_slot] = row_of_node[child_idx[edge_src]]
        edge_seg = np.full(steps * num_edges, width, dtype=np.int64)
        edge_seg[edge_slot] = np.repeat(slot - step * width, deg)
        # Padding slots: one per padding row, holding the donor's first child (child
        # r % degree in a step without real rows; row 0 without a donor).
        pad_step = np.repeat(np.arange(steps), pad_rows)
        pad_row = concat_ranges(real_rows, pad_rows)  # the padding rows' local indices
        pad_slot = pad_step * num_edges + own_slot[pad_step, pad_row]
        edge_seg[pad_slot] = pad_row
        with_donor = donor_deg[pad_step] > 0
        which = np.where(real_rows[pad_step] > 0, 0, pad_row % np.maximum(donor_deg[pad_step], 1))
        src = child_ptr[donor[pad_step][with_donor]] + which[with_donor]
        edge_child[pad_slot[with_donor]] = row_of_node[child_idx[src]]
        edge_child = edge_child.reshape(steps, num_edges)
        edge_seg = edge_seg.reshape(steps, num_edges)
        # Unused slots borrow the last row's node-level values in map reductions (their
        # results are dropped); they read that row's own first child too, so a NaN in one
        # tree can only reach rows of that tree, even through zero cotangents.
        last_first_child = edge_child[np.arange(steps), start_t[:, width - 1]]
        edge_child = np.where(edge_seg == width, last_first_child[:, None], edge_child)
        tables.append(
            PhaseTables(
                node_t.reshape(steps, width),
                degree_t.reshape(steps, width),
                start_t.astype(np.int32),
                edge_child.astype(np.int32),
                edge_seg.astype(np.int32),
                step_kind,
            )
        )

    key = PlanKey(
        num_leaf_rows=num_leaf_rows,
        num_node_rows=row_of_node.shape[0],
        phases=tuple(phase_keys),
        leaf_blocks=leaf_blocks,
        kinds=kinds,
    )
    return Plan(
        key=key,
        leaf_node=leaf_node.astype(np.int32),
        row_of_node=row_of_node.astype(np.int32),
        phases=tuple(tables),
        height=height,
        class_steps=class_steps,
        layout=lay,
    )
