"""Forest: the array form of a batch of trees or DAGs, validated once."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _planner
from ._tree import Tree

# A forest with more distinct arities than this cannot run a function that specialises
# its trace per arity (iterating or indexing ``node.children``); ``map`` still works.
MAX_SPECIALISED_ARITIES = 16


@dataclasses.dataclass(frozen=True)
class _Meta:
    """Static part of a Forest (pytree aux data). Equal metas share compiled programs."""

    num_nodes: int
    key: _planner.PlanKey
    arities: tuple[int, ...] | None  # None: more than MAX_SPECIALISED_ARITIES distinct
    # Not compared: used only for error messages while tracing.
    example_node: dict = dataclasses.field(compare=False, hash=False, default_factory=dict)
    # The node-kind vocabulary (names; None: the forest has no kinds), and the (kind id,
    # arity) pairs of its internal nodes: what a function specialised per kind traces.
    kinds: tuple | None = None
    kind_arities: tuple = ()
    # A node with several parents, or a root that is also a child (-1 if none): top-down
    # passes need a single parent per node.
    shared_node: int = dataclasses.field(compare=False, hash=False, default=-1)
    # A node in several trees (a subtree shared between trees, or a Tree passed as two
    # roots; -1 if none): ``pool`` needs one tree per node.
    cross_tree_node: int = dataclasses.field(compare=False, hash=False, default=-1)
    # Whether there is such a node, compared: forests stacked on a leading axis (for
    # vmap, pmap, shard_map) take one Meta, so a DAG must not pass as a tree there.
    has_shared_node: bool = False
    has_cross_tree_node: bool = False


class _PadShape(NamedTuple):
    """The sizes ``Forest.pad_all`` pads to: equal shapes share compiled programs."""

    key: _planner.PlanKey
    num_roots: int
    arities: tuple[int, ...]
    kind_arities: tuple

    def union(self, other: _PadShape) -> _PadShape:
        return _PadShape(
            self.key.union(other.key),
            max(self.num_roots, other.num_roots),
            tuple(sorted(set(self.arities) | set(other.arities))),
            tuple(sorted(set(self.kind_arities) | set(other.kind_arities))),
        )

    def covers(self, other: _PadShape) -> bool:
        """Whether a forest of shape ``other`` can be padded to this one."""
        return self.union(other) == self


@jax.tree_util.register_pytree_node_class
class Forest:
    """The array form of a batch of trees or DAGs: structure, per-node data and a plan.

    Node ``i`` (``0 <= i < num_nodes``) has data ``jax.tree.map(lambda a: a[i], data)``
    and children ``child_idx[child_ptr[i]:child_ptr[i + 1]]`` in order. Build one with
    ``from_trees``, ``from_parents`` or ``from_children``; the constructors validate the
    input and plan the evaluation order once (numpy, host side).

    A Forest is a pytree: its leaves are the per-node data padded to
    ``plan.key.num_node_rows`` rows (the padding rows copy node 0) and the plan's index
    tables; the static sizes are metadata. So it can be an argument of a ``jax.jit``-ed
    function; ``padded()`` makes the node and root counts bucket sizes too, so that
    forests of similar size share one trace. The children arrays stay on the host.

    Attributes:
      num_nodes: number of nodes (padding nodes included, see ``padded``).
      roots: ``[num_roots]`` int array, the root nodes in input order.
      node_mask, root_mask: bool arrays, False on the padding that ``padded`` appends.
      data: pytree of arrays with leading axis ``num_nodes``.
      child_ptr, child_idx: the children CSR arrays (host only; ``None`` inside ``jit``).
      plan: the ``Plan`` (index tables; see ``recjax._planner``).

    Example:
      >>> import recjax as rj
      >>> f = rj.Forest.from_parents([-1, 0, 0, 1], {"x": [1.0, 2.0, 3.0, 4.0]})
      >>> f.num_nodes, f.roots.tolist(), f.children(0).tolist()
      (4, [0], [1, 2])
    """

    def __init__(self, *, meta, arrays, child_ptr=None, child_idx=None):
        self._meta = meta
        self._arrays = arrays
        self.child_ptr = child_ptr
        self.child_idx = child_idx
        self._kind = None  # host kind ids, when the forest has kinds

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_trees(cls, trees: Sequence[Tree], kinds: Sequence[str] | None = None) -> Forest:
        """Numbers the nodes of ``trees`` in depth-first pre-order, tree after tree.

        A ``Tree`` object reachable more than once (a DAG) becomes one node, numbered at
        its first visit and computed once. Iterative: no recursion limit.

        Args:
          trees: the root ``Tree`` objects.
          kinds: the vocabulary of node kinds, when the trees have ``kind`` tags (every
            node then needs one from it). A function reading ``node.kind`` is traced per
            kind; keep the vocabulary fixed across batches so they share programs.

        Returns:
          A Forest whose ``roots`` are the node ids of ``trees``, in order.

        Raises:
          TypeError: an element is not a ``Tree``.
          ValueError: no trees, or node data differ in structure, shape or dtype.

        Example:
          >>> import recjax as rj
          >>> shared = rj.Tree({"x": 1.0})
          >>> f = rj.Forest.from_trees([rj.Tree({"x": 0.0}, [shared, shared])])
          >>> f.num_nodes, f.children(0).tolist()
          (2, [1, 1])
        """
        trees = _tree_list(trees)
        with _gc_paused():
            child_ptr, child_idx, data, roots, kind = _tree_arrays(trees, kinds)
            return cls._build(child_ptr, child_idx, data, roots, kind=kind, kinds=kinds)

    @classmethod
    def _pad_trees(cls, groups: list[list[Tree]], kinds=None, shapes: list | None = None) -> list[Forest]:
        """``pad_all([from_trees(g, kinds) for g in groups], shapes)``, planned less.

        ``pad_all`` plans each forest twice more (at the shared classes, then at the
        shared shape); the plan ``from_trees`` makes first serves only to choose those
        classes, so here each group gets ``class_steps`` instead of a whole plan.
        """
        groups = [_tree_list(g) for g in groups]
        with _gc_paused():
            parts = [_tree_arrays(g, kinds) for g in groups]
            return cls._pad_parts(parts, kinds, shapes)

    @classmethod
    def _pad_parts(cls, parts: list[tuple], kinds=None, shapes: list | None = None) -> list[Forest]:
        """``_pad_trees`` of groups already converted (``_tree_arrays`` or a ``_TreeTable``)."""
        with _gc_paused():
            classes = _planner.shared_classes(
                [_planner.class_steps(ptr, idx, kind) for ptr, idx, _, _, kind in parts]
            )
            forests = [
                cls._build(ptr, idx, data, roots, at_least=classes,
                           pad_roots=_planner.ladder(roots.size), kind=kind, kinds=kinds)
                for ptr, idx, data, roots, kind in parts
            ]
            return cls._pad_to_one_shape(forests, shapes, 1.25)

    @staticmethod
    def _check_trees(trees: list[Tree], kinds=None):
        """Raises what ``from_trees(trees, kinds)`` would raise on bad trees (the walk, the
        data, the kinds, a cycle), without planning or building a forest: a data loader
        checks a whole dataset with it before it plans any batch. Returns the node data's
        structure and per-node shapes and dtypes (to compare between chunks)."""
        with _gc_paused():
            child_ptr, child_idx, data, _, _ = _tree_arrays(_tree_list(trees), kinds)
            _planner.heights(child_ptr, child_idx)
        return _layout(data)

    @classmethod
    def from_parents(
        cls, parent: Any, data: Any = None, kind: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> Forest:
        """Builds a forest of trees from a parent array; node numbering is kept.

        ``parent[i]`` is the parent of node ``i``, or -1 for a root. The children of
        ``i`` are the nodes ``j`` with ``parent[j] == i``, in increasing ``j``.

        Args:
          parent: ``[N]`` integer array.
          data: pytree of arrays with leading axis ``N`` (node ``i``'s data is row ``i``);
            a list is read as one array, tuples and dicts as containers.
          kind, kinds: optional node kinds: ``kind[i]`` is node ``i``'s, from the
            vocabulary ``kinds`` (see ``from_trees``).

        Raises:
          ValueError: empty, out-of-range parents, a node that is its own parent, a cycle,
            or data whose leading axis is not ``N``.
          TypeError: ``parent`` is not an integer array.

        Example:
          >>> import recjax as rj
          >>> f = rj.Forest.from_parents([2, 2, -1], {"x": [1.0, 2.0, 3.0]})
          >>> f.roots.tolist(), f.children(2).tolist()
          ([2], [0, 1])
        """
        try:
            parent = np.asarray(parent)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"parent must be a 1-D integer array ({e}).") from None
        if parent.ndim != 1:
            raise ValueError(f"parent must be a 1-D array; got shape {parent.shape}.")
        if parent.size == 0:
            raise ValueError("empty forest: the parent array has no nodes.")
        if not np.issubdtype(parent.dtype, np.integer):
            raise TypeError(
                f"parent must be an integer array; got dtype {parent.dtype}. "
                "Convert it with np.asarray(parent, dtype=int)."
            )
        n = parent.size
        bad = np.flatnonzero((parent < -1) | (parent >= n))
        if bad.size:
            raise ValueError(
                f"parent[{bad[0]}] = {parent[bad[0]]} is out of range for {n} nodes "
                f"({bad.size} bad entries, first at nodes {bad[:5].tolist()}); use -1 for a "
                f"root and 0..{n - 1} for a parent."
            )
        selfloop = np.flatnonzero(parent == np.arange(n))
        if selfloop.size:
            raise ValueError(
                f"node {selfloop[0]} is its own parent (a cycle); use -1 for a root."
            )
        parent = parent.astype(np.int64)
        has_parent = parent >= 0
        child_idx = np.flatnonzero(has_parent)[np.argsort(parent[has_parent], kind="stable")]
        child_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent[has_parent], minlength=n), out=child_ptr[1:])
        data = _check_array_data(data, n)
        kind = _kind_ids(_kind_list(kind, n), kinds)
        return cls._build(child_ptr, child_idx, data, np.flatnonzero(~has_parent), kind=kind, kinds=kinds)

    @classmethod
    def from_children(
        cls, children: Sequence[Sequence[int]], data: Any = None,
        kind: Sequence[str] | None = None, kinds: Sequence[str] | None = None,
    ) -> Forest:
        """Builds a forest (trees or a DAG) from children lists; node numbering is kept.

        ``children[i]`` is the ordered list of node ``i``'s children. A node may be the
        child of several nodes (a DAG); it is computed once. The roots are the nodes that
        are nobody's child, in increasing order.

        Args:
          children: ``N`` sequences of node ids.
          data: pytree of arrays with leading axis ``N``; a list is read as one array.
          kind, kinds: optional node kinds, as in ``from_parents``.

        Raises:
          ValueError: empty, a child id out of range, a cycle, or data of the wrong length.
          TypeError: a child id is not an integer.

        Example:
          >>> import recjax as rj
          >>> f = rj.Forest.from_children([[1, 2], [2], []], {"x": [1.0, 2.0, 3.0]})
          >>> f.roots.tolist(), f.children(1).tolist()
          ([0], [2])
        """
        try:
            children = list(children)
        except TypeError:
            raise TypeError(
                f"children must be a list of lists of node ids; got a {type(children).__name__}."
            ) from None
        n = len(children)
        if n == 0:
            raise ValueError("empty forest: the children list has no nodes.")
        child_ptr, child_idx = _csr_from_lists(children, n)
        data = _check_array_data(data, n)
        is_child = np.zeros(n, dtype=bool)
        is_child[child_idx] = True
        roots = np.flatnonzero(~is_child)
        if roots.size == 0:
            raise ValueError(
                "the forest has no root (every node is somebody's child), so it has a cycle."
            )
        kind = _kind_ids(_kind_list(kind, n), kinds)
        return cls._build(child_ptr, child_idx, data, roots, kind=kind, kinds=kinds)

    def padded(
        self,
        key: _planner.PlanKey | None = None,
        num_roots: int | None = None,
        arities: tuple[int, ...] | None = None,
        kind_arities: tuple = (),
    ) -> Forest:
        """This forest grown to bucket sizes, so that jitted code sees bucketed shapes only.

        ``num_nodes`` becomes the plan's node bucket and ``roots`` is padded to a ladder
        length (or ``num_roots``). The padding nodes hold copies of node 0's data, are not
        computed (their output rows are copies of a real leaf's output, finite but
        meaningless), and are False in ``node_mask``; padding roots are node 0 and False
        in ``root_mask``. With ``key``, the plan is at least that large (see
        ``pad_all``).

        Use it when a ``jax.jit``-ed function takes the Forest as an argument: forests
        with equal padded shapes share one trace, where exact sizes retrace per batch.

        Args:
          key: optional ``PlanKey`` to grow the plan to (for example a union of keys).
          num_roots: optional length of ``roots`` (at least the real number of roots).
          arities: optional arities to trace for (a superset of this forest's), so that
            forests with different arity sets share one program.
          kind_arities: likewise, ``(kind id, arity)`` pairs for node kinds.

        Example:
          >>> import recjax as rj
          >>> f = rj.Forest.from_parents([-1, 0, 0, 1, 1], {"x": [1.0, 2.0, 3.0, 4.0, 5.0]}).padded()
          >>> f.num_nodes, f.node_mask.tolist(), f.roots.tolist(), f.root_mask.tolist()
          (6, [True, True, True, True, True, False], [0], [True])
        """
        if self.child_ptr is None:
            raise ValueError("Forest.padded() needs the host arrays; call it outside jit.")
        n = int(np.count_nonzero(np.asarray(self.node_mask)))
        r = int(np.count_nonzero(np.asarray(self.root_mask)))
        num_roots = _planner.ladder(r) if num_roots is None else num_roots
        if num_roots < r:
            raise ValueError(f"num_roots={num_roots} is less than the {r} roots of this forest.")
        child_ptr, child_idx = self.child_ptr[: n + 1], self.child_idx
        data = jax.tree.map(lambda a: a[:n], self.data)
        roots = np.asarray(self.roots)[:r]
        return Forest._build(
            child_ptr, child_idx, data, roots, at_least=key, pad_roots=num_roots, arities=arities,
            kind=self._kind, kinds=self._meta.kinds, kind_arities=kind_arities,
            reuse=getattr(self, "_plan", None),
        )

    @classmethod
    def pad_all(
        cls, forests: Sequence[Forest], shapes: list | None = None, slack: float = 1.25
    ) -> list[Forest]:
        """Pads every forest to one shape (the union of their plan keys, the most roots).

        The padded forests share one compiled program, inside ``f.batch`` and inside a
        jitted function that takes them as an argument. Each costs what the largest
        needs, so pad together forests of similar size (for example batches of random
        trees, whose level widths are alike). Their plans use one set of step widths,
        the set whose padded union computes the fewest rows, steps and phases. The
        union's step counts and leaf rows are rounded up ``ladder``'s coarse rungs (a
        forest alone is planned on finer ones), so that later batches fit the shape.

        With ``shapes``, a list of the shapes earlier calls padded to (updated in place),
        the forests are padded to a listed shape instead when it holds them and computes
        at most ``slack`` times the rows of their own union: that shape's program is
        compiled already. Otherwise their union is appended to ``shapes``.

        Args:
          forests: forests with one kind vocabulary (or none).
          shapes: optional list of earlier shapes to reuse (opaque items; start with []).
          slack: how many times the rows of the forests' union a reused shape may compute.

        Example:
          >>> import recjax as rj
          >>> a = rj.Forest.from_parents([-1, 0, 0], {"x": [1.0, 2.0, 3.0]})
          >>> b = rj.Forest.from_parents([-1, 0, 1, -1], {"x": [1.0, 2.0, 3.0, 4.0]})
          >>> pa, pb = rj.Forest.pad_all([a, b])
          >>> pa._meta == pb._meta, pa.roots.shape == pb.roots.shape
          (True, True)
          >>> seen = []
          >>> _ = rj.Forest.pad_all([a, b], seen)
          >>> (pc,) = rj.Forest.pad_all([b], seen)   # fits in the shape seen already
          >>> pc._meta == pa._meta, len(seen)
          (True, 1)
          >>> (pd,) = rj.Forest.pad_all([a], seen)   # 10 rows; the listed shape has 18
          >>> pd._meta == pa._meta, len(seen)
          (False, 2)
        """
        forests = list(forests)
        if not forests:
            raise ValueError("Forest.pad_all got no forests.")
        for i, f in enumerate(forests):
            if not isinstance(f, Forest):
                raise TypeError(
                    f"Forest.pad_all takes a list of Forests; item {i} is a {type(f).__name__}."
                )
        kinds = {f._meta.kinds for f in forests}
        if len(kinds) > 1:
            raise ValueError(
                "Forest.pad_all: the forests have different kind vocabularies; build them "
                "with one kinds= list."
            )
        # One set of width classes for all: each forest choosing its own, their union
        # would hold every class any of them chose.
        classes = _planner.shared_classes([f.plan.class_steps for f in forests])
        return cls._pad_to_one_shape([f.padded(classes) for f in forests], shapes, slack)

    @classmethod
    def _pad_to_one_shape(cls, forests: list[Forest], shapes: list | None, slack: float) -> list[Forest]:
        """``pad_all``'s second half: forests padded at shared classes, padded to one shape."""
        want = forests[0]._pad_shape()
        for f in forests[1:]:
            want = want.union(f._pad_shape())
        # a new shape is rounded up the coarse ladder, so that later batches fit it
        want = want._replace(key=want.key.coarse())
        if shapes is not None:
            rows = want.key.num_buffer_rows
            for s in sorted(shapes, key=lambda s: s.key.num_buffer_rows):
                if s.covers(want) and s.key.num_buffer_rows <= slack * rows:
                    out = [f._padded_to(s) for f in forests]
                    # the plans are restricted to the shape's classes: check they fit
                    if all(f._is_padded_to(s) for f in out):
                        return out
            shapes.append(want)
        out = [f._padded_to(want) for f in forests]
        assert all(f._is_padded_to(want) for f in out), (
            "Forest.pad_all: forests padded to one shape differ: a bug in recjax"
        )
        return out

    def _padded_to(self, shape: _PadShape) -> Forest:
        return self.padded(shape.key, shape.num_roots, shape.arities, shape.kind_arities)

    def _is_padded_to(self, shape: _PadShape) -> bool:
        own = self._pad_shape()
        return own.key == shape.key and own[2:] == shape[2:] and self.roots.shape[0] == shape.num_roots

    def _pad_shape(self) -> _PadShape:
        """The smallest shape ``pad_all`` can pad this forest to."""
        return _PadShape(
            self._meta.key,
            _planner.ladder(int(np.count_nonzero(np.asarray(self.root_mask)))),
            tuple(sorted(self._meta.example_node)),
            tuple(sorted(self._meta.kind_arities)),
        )

    @classmethod
    def _build(
        cls, child_ptr, child_idx, data, roots, at_least=None, pad_roots=None, arities=None,
        kind=None, kinds=None, kind_arities=(), reuse=None,
    ) -> Forest:
        """Plans and packs a validated forest; with ``pad_roots`` it is padded (see ``padded``).
        ``reuse``: the same forest's plan, whose layout ``plan`` may take over."""
        n = child_ptr.shape[0] - 1
        plan = _planner.plan(child_ptr, child_idx, at_least, kind, reuse)
        degree = np.diff(child_ptr)
        own, first = np.unique(degree[degree > 0], return_index=True)
        arities = np.union1d(own, np.asarray(arities or (), dtype=np.int64))
        internal = np.flatnonzero(degree > 0)
        # -1: the arity occurs only in another forest padded together with this one.
        example = {int(a): -1 for a in arities}
        example.update({int(a): int(internal[i]) for a, i in zip(own, first)})
        num_nodes = n if pad_roots is None else plan.key.num_node_rows
        node_mask = np.arange(num_nodes) < n
        root_mask = np.arange(max(roots.size, pad_roots or 0)) < roots.size
        roots = np.concatenate([roots, np.zeros(root_mask.size - roots.size, roots.dtype)])
        if num_nodes > n:  # padding nodes are leaves in the host view (never computed)
            child_ptr = np.concatenate([child_ptr, np.full(num_nodes - n, child_ptr[-1])])
        tree_of, shared, cross = _tree_of(child_ptr[: n + 1], child_idx, roots[: int(root_mask.sum())])
        if kind is not None:
            pairs = np.unique(np.stack([kind[internal], degree[internal]]), axis=1).T.tolist()
            kind_arities = tuple(sorted(set(map(tuple, pairs)) | set(kind_arities)))
        meta = _Meta(
            num_nodes=num_nodes,
            key=plan.key,
            arities=tuple(int(a) for a in arities) if arities.size <= MAX_SPECIALISED_ARITIES else None,
            example_node=example,
            kinds=None if kinds is None else tuple(kinds),
            kind_arities=kind_arities if kind is not None else (),
            shared_node=shared,
            cross_tree_node=cross,
            has_shared_node=shared >= 0,
            has_cross_tree_node=cross >= 0,
        )
        pad = plan.key.num_node_rows
        padded = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], pad - n, 0)]), data)
        arrays = {
            "data": padded,
            "roots": roots.astype(np.int32),
            "node_mask": node_mask,
            "root_mask": root_mask,
            "tree_of": np.concatenate(
                [tree_of, np.full(plan.key.num_node_rows - n, root_mask.size)]
            ).astype(np.int32),
            "leaf_node": plan.leaf_node,
            "row_of_node": plan.row_of_node,
            "phases": [dataclasses.asdict(t) for t in plan.phases],
        }
        forest = cls(meta=meta, arrays=arrays, child_ptr=child_ptr, child_idx=child_idx)
        forest._plan = plan
        forest._kind = kind
        return forest

    def _check_not_stacked(self, where: str) -> None:
        """Refuses forests stacked on a leading axis (for ``vmap``) used as one forest."""
        shape = jnp.shape(self._arrays["node_mask"])
        if len(shape) != 1:
            raise TypeError(
                f"{where}: this Forest holds {shape[0]} forests stacked on a leading axis "
                f"(node_mask has shape {shape}); map over that axis with jax.vmap or "
                "jax.pmap, which hand the function one forest at a time. Inside "
                "jax.shard_map each device gets a block of the stack: take its forest "
                "with jax.tree.map(lambda a: a[0], forest)."
            )

    # ------------------------------------------------------------------ accessors

    @property
    def num_nodes(self) -> int:
        return self._meta.num_nodes

    @property
    def roots(self):
        return self._arrays["roots"]

    @property
    def node_mask(self):
        """``[num_nodes]`` bool: False for the padding nodes that ``padded()`` appends."""
        return self._arrays["node_mask"]

    @property
    def root_mask(self):
        """``[len(roots)]`` bool: False for the padding entries that ``padded()`` appends."""
        return self._arrays["root_mask"]

    @property
    def tree_of(self):
        """``[num_nodes]`` int32: the tree of every node, as an index into ``roots``.

        A node shared by several trees (a DAG) belongs to the tree of its first parent
        (``pool`` refuses such forests). Padding nodes (see ``padded``) get
        ``len(roots)``, which segment ops drop.

        Example:
          >>> import recjax as rj
          >>> f = rj.Forest.from_parents([-1, 0, -1, 2, 2])
          >>> f.tree_of.tolist()
          [0, 0, 1, 1, 1]
        """
        return self._arrays["tree_of"][: self._meta.num_nodes]

    def pool(self, values, op: str = "mean"):
        """Reduces per-node ``values`` over each tree: ``[len(roots), ...]``, aligned with ``roots``.

        ``values`` is a pytree with leading axis ``num_nodes`` (what ``f.batch`` returns);
        ``op`` is ``"sum"``, ``"mean"`` or ``"max"``, in ``jnp.sum``'s (``mean``'s, ``max``'s)
        dtypes and precision: bools give a count, a fraction, any; int8 sums are int32;
        float16 and bfloat16 accumulate in float32.
        Works under ``jit``; padding nodes
        and padding roots contribute nothing (a padding root's entry is 0).

        Raises:
          ValueError: an unknown ``op``, ``values`` without a ``num_nodes`` leading axis,
            or a node in several trees (``from_trees`` keeps one node per ``Tree``
            object, so a subtree shared between trees, or a tree passed twice, is one
            node that each tree would need to count).

        Example:
          >>> import jax.numpy as jnp
          >>> import recjax as rj
          >>> f = rj.Forest.from_parents([-1, 0, -1, 2, 2])
          >>> f.pool(jnp.arange(5.0), "sum").tolist()
          [1.0, 9.0]
        """
        self._check_not_stacked("Forest.pool")
        if op not in ("sum", "mean", "max"):
            raise ValueError(f"Forest.pool: op must be 'sum', 'mean' or 'max', not {op!r}.")
        if self._meta.cross_tree_node >= 0:
            raise ValueError(
                f"Forest.pool: node {self._meta.cross_tree_node} belongs to several trees "
                "(a subtree shared between trees, or one Tree passed twice), and pool "
                "reduces each node into one tree. Pass separate copies (copy.deepcopy) "
                "of trees that share nodes."
            )
        num = self._arrays["root_mask"].shape[0]

        def one(v):
            v = jnp.asarray(v)
            if v.ndim == 0 or v.shape[0] != self._meta.num_nodes:
                raise ValueError(
                    f"Forest.pool: values need a leading axis of num_nodes = "
                    f"{self._meta.num_nodes}, got shape {v.shape}."
                )
            return segment_reduce(op, v, self.tree_of, num)

        return jax.tree.map(one, values)

    @property
    def data(self):
        n = self._meta.num_nodes
        return jax.tree.map(lambda a: a[:n], self._arrays["data"])

    @property
    def plan(self) -> _planner.Plan:
        plan = getattr(self, "_plan", None)
        if plan is None:
            raise ValueError("this Forest was rebuilt from its pytree leaves; its host plan is gone.")
        return plan

    def children(self, i: int) -> np.ndarray:
        """The children of node ``i``, in order (host only)."""
        if self.child_ptr is None:
            raise ValueError("the children arrays of a Forest are not available inside jit.")
        n = self.child_ptr.shape[0] - 1
        if not (isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < n):
            raise IndexError(f"Forest.children: no node {i!r}; the nodes are 0 to {n - 1}.")
        return self.child_idx[self.child_ptr[i] : self.child_ptr[i + 1]]

    def __repr__(self) -> str:
        return (
            f"Forest(num_nodes={self.num_nodes}, num_roots={np.shape(self.roots)[0]}, "
            f"steps={sum(p.steps for p in self._meta.key.phases)})"
        )

    # ------------------------------------------------------------------ pytree

    def tree_flatten(self):
        return (self._arrays,), self._meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(meta=meta, arrays=children[0])


# ---------------------------------------------------------------------- reductions


def segment_reduce(op: str, v, segment, n: int, indices_are_sorted: bool = False):
    """``[n, ...]``: row ``s`` reduces the rows of ``v`` whose ``segment`` is ``s`` with
    ``op`` (sum, mean, max, min), in the dtype and precision ``jnp.sum`` (``mean``,
    ``max``, ``min``) over those rows would give: bools and small ints sum to int32,
    means of ints are float32, float16 and bfloat16 accumulate in float32. An empty
    segment is 0."""
    dense = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max, "min": jnp.min}[op]
    out = jax.eval_shape(lambda x: dense(x, axis=0), jax.ShapeDtypeStruct(v.shape, v.dtype)).dtype
    if op in ("max", "min"):
        seg = jax.ops.segment_max if op == "max" else jax.ops.segment_min
        r = seg(v, segment, n, indices_are_sorted=indices_are_sorted).astype(out)
        count = jax.ops.segment_sum(jnp.ones(segment.shape, jnp.int32), segment, n,
                                    indices_are_sorted=indices_are_sorted)
        # Every row of a plan owns at least one edge (see the planner); in ``pool`` a
        # padding root owns no node: 0 rather than -inf.
        return jnp.where((count > 0).reshape((-1,) + (1,) * (v.ndim - 1)), r, jnp.zeros_like(r))
    narrow = jnp.issubdtype(out, jnp.floating) and jnp.finfo(out).bits < 32
    acc = jnp.float32 if narrow else out
    s = jax.ops.segment_sum(v.astype(acc), segment, n, indices_are_sorted=indices_are_sorted)
    if op == "mean":
        count = jax.ops.segment_sum(jnp.ones(segment.shape, acc), segment, n,
                                    indices_are_sorted=indices_are_sorted)
        s = s / jnp.maximum(count, 1).reshape((-1,) + (1,) * (v.ndim - 1))
    return s.astype(out)


# ---------------------------------------------------------------------- validation


_CHILDREN = operator.attrgetter("children")
_DATA = operator.attrgetter("data")
_KIND = operator.attrgetter("kind")


def _tree_list(trees) -> list[Tree]:
    """``trees`` as a list, checked as ``Forest.from_trees`` documents."""
    if isinstance(trees, Tree):
        raise TypeError("Forest.from_trees takes a list of trees; wrap one tree as [tree].")
    try:
        trees = list(trees)
    except TypeError:
        raise TypeError(
            f"Forest.from_trees takes a list of trees; got a {type(trees).__name__}."
        ) from None
    if not trees:
        raise ValueError("empty forest: Forest.from_trees got no trees.")
    for i, t in enumerate(trees):
        if not isinstance(t, Tree):
            raise TypeError(
                f"Forest.from_trees: element {i} is a {type(t).__name__}, not an rj.Tree."
            )
    return trees


def _tree_arrays(trees: list[Tree], kinds):
    """``(child_ptr, child_idx, data, roots, kind)`` of ``Tree`` objects, numbered in pre-order.

    Iterative pre-order; a node reached again (a DAG) keeps its first number. A cycle
    (possible only by reassigning Tree.children) is reported by the planner. Everything
    after the walk iterates in C (map, itemgetter), not in Python.
    """
    ids: dict[int, int] = {}
    nodes: list[Tree] = []
    roots = []
    try:
        for root in trees:
            stack = [root]
            pop, push = stack.pop, stack.extend
            while stack:
                t = pop()
                key = id(t)
                if key in ids:
                    continue
                ids[key] = len(nodes)
                nodes.append(t)
                push(t.children[::-1])
            roots.append(ids[id(root)])
    except (AttributeError, TypeError):  # only by reassigning Tree.children
        if isinstance(t, Tree):
            raise TypeError(
                f"node {ids[id(t)]}'s children are a {type(t.children).__name__}; "
                "Tree.children must be a tuple of rj.Tree objects."
            ) from None
        nodes.append(t)
    if not all(map(isinstance, nodes, itertools.repeat(Tree))):  # the same
        bad = next(t for t in nodes if not isinstance(t, Tree))
        parent = next(i for i, n in enumerate(nodes) if any(c is bad for c in n.children))
        raise TypeError(
            f"node {parent} has a child that is a {type(bad).__name__}, not an rj.Tree."
        )
    counts = np.fromiter(map(len, map(_CHILDREN, nodes)), dtype=np.int64, count=len(nodes))
    child_ptr = np.zeros(len(nodes) + 1, dtype=np.int64)
    np.cumsum(counts, out=child_ptr[1:])
    children = itertools.chain.from_iterable(map(_CHILDREN, nodes))
    child_idx = np.fromiter(
        map(ids.__getitem__, map(id, children)), dtype=np.int64, count=int(child_ptr[-1])
    )
    data = _stack_tree_data(list(map(_DATA, nodes)))
    kind = _kind_ids(list(map(_KIND, nodes)), kinds)
    return child_ptr, child_idx, data, np.asarray(roots, dtype=np.int64), kind


def _layout(data) -> tuple:
    """The node data's structure and per-node ``(dtype, shape)`` of every field."""
    leaves, treedef = jax.tree.flatten(data)
    return treedef, tuple((a.dtype, a.shape[1:]) for a in leaves)


class _TreeTable:
    """A dataset's trees in one numbering, for planning many batches of them: ``Tree``
    objects walked once (``build``), or the trees of one Forest (``of_forest``).

    ``arrays(indices)`` equals ``_tree_arrays([trees[j] for j in indices], kinds)`` for
    distinct ``indices``, by numpy indexing instead of a Python walk: 0.14 ms against
    1.9 ms for 32 SST-like trees (benchmarks/RESULTS.md). One pre-order walk numbers the
    whole dataset, tree after tree; when every node is in one tree (``build`` returns
    None otherwise), tree ``j``'s nodes are the numbers ``start[j] .. start[j] +
    sizes[j]``, its edges are contiguous too, and a group's arrays are those ranges
    renumbered. The data are stacked once (a copy of the dataset's node data). Built
    from trees that must not change while the table is in use.
    """

    def __init__(self, child_ptr, child_idx, data, start, kind, roots=None):
        self.child_ptr, self.child_idx, self.data, self.kind = child_ptr, child_idx, data, kind
        self.start = start
        self.sizes = np.diff(np.append(start, child_ptr.shape[0] - 1))
        self.degree = np.diff(child_ptr)
        # each tree's root, counted from its first node (0 for Tree objects: pre-order)
        self.root_offset = np.zeros_like(start) if roots is None else roots - start
        self.layout = _layout(data)

    @classmethod
    def of_forest(cls, forest: Forest) -> _TreeTable:
        """The trees of an unpadded, unstacked forest with every node in one tree (the
        caller checks): each tree's nodes are renumbered to be contiguous, in their order."""
        n = forest.num_nodes
        tree = np.asarray(forest.tree_of, dtype=np.int64)[:n]
        order = np.argsort(tree, kind="stable")
        new = np.empty(n, dtype=np.int64)
        new[order] = np.arange(n)
        child_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.diff(forest.child_ptr)[order], out=child_ptr[1:])
        first_edge = forest.child_ptr[order]
        edge = np.arange(child_ptr[-1]) + np.repeat(first_edge - child_ptr[:-1], np.diff(child_ptr))
        child_idx = new[forest.child_idx[edge]]
        start = np.zeros(forest.roots.shape[0], dtype=np.int64)
        np.cumsum(np.bincount(tree, minlength=start.size)[:-1], out=start[1:])
        data = jax.tree.map(lambda a: np.asarray(a)[:n][order], forest.data)
        kind = None if forest._kind is None else forest._kind[order]
        return cls(child_ptr, child_idx, data, start, kind, new[np.asarray(forest.roots)])

    @classmethod
    def build(cls, trees: list[Tree], kinds=None) -> _TreeTable | None:
        """Raises what ``Forest.from_trees(trees, kinds)`` raises on bad trees (the walk,
        the data, the kinds, a cycle); None when a node is in several trees."""
        with _gc_paused():
            child_ptr, child_idx, data, roots, kind = _tree_arrays(_tree_list(trees), kinds)
            _planner.heights(child_ptr, child_idx)  # a cycle
        if _tree_of(child_ptr, child_idx, roots)[2] >= 0:
            return None
        return cls(child_ptr, child_idx, data, roots, kind)

    def arrays(self, indices: np.ndarray) -> tuple:
        """``(child_ptr, child_idx, data, roots, kind)`` of the trees ``indices`` (distinct)."""
        indices = np.asarray(indices, dtype=np.int64)
        start, sizes = self.start[indices], self.sizes[indices]
        offset = np.zeros(indices.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offset[1:])
        shift = start - offset[:-1]  # old number - new number, per tree
        node = np.arange(offset[-1]) + np.repeat(shift, sizes)
        child_ptr = np.zeros(node.size + 1, dtype=np.int64)
        np.cumsum(self.degree[node], out=child_ptr[1:])
        first_edge = self.child_ptr[start]
        edges = self.child_ptr[start + sizes] - first_edge
        edge = np.arange(child_ptr[-1]) + np.repeat(first_edge - child_ptr[offset[:-1]], edges)
        child_idx = self.child_idx[edge] - np.repeat(shift, edges)
        data = jax.tree.map(lambda a: a[node], self.data)
        kind = None if self.kind is None else self.kind[node]
        return child_ptr, child_idx, data, offset[:-1] + self.root_offset[indices], kind


def _kind_list(kind, n):
    if kind is None:
        return [None] * n
    kind = list(kind)
    if len(kind) != n:
        raise ValueError(f"kind has {len(kind)} entries for {n} nodes; give one kind per node.")
    return kind


def _kind_ids(names: list, kinds) -> np.ndarray | None:
    """Kind ids (positions in the vocabulary ``kinds``) of every node, or None."""
    if kinds is None:
        if names.count(None) == len(names):
            return None
        tagged = next(i for i, k in enumerate(names) if k is not None)
        raise ValueError(
            f"node {tagged} has kind {names[tagged]!r} but no kinds= vocabulary was "
            "given; pass kinds=[...] listing every kind (the same list for every batch)."
        )
    kinds = list(kinds)
    if len(set(kinds)) != len(kinds):
        raise ValueError("kinds= lists a kind twice; give each kind once.")
    index = {k: i for i, k in enumerate(kinds)}
    ids = np.fromiter((index.get(k, -1) for k in names), dtype=np.int64, count=len(names))
    bad = np.flatnonzero(ids < 0)
    if bad.size:
        raise ValueError(
            f"node {bad[0]} has kind {names[bad[0]]!r}, which is not in the kinds= "
            f"vocabulary ({len(kinds)} kinds); tag every node with one of them."
        )
    return ids


def _tree_of(child_ptr, child_idx, roots) -> tuple[np.ndarray, int, int]:
    """Every node's tree (index into ``roots``), a node with several parents (or -1) and
    a node in several trees (or -1).

    A node's tree is its first parent's (pointer jumping: O(N log depth), no Python loop
    over nodes).
    """
    n = child_ptr.shape[0] - 1
    parent = np.repeat(np.arange(n, dtype=np.int64), np.diff(child_ptr))
    # A root that is also another node's child (a Tree passed as a root and reached again)
    # has two contexts too: its own tree's root, and a child.
    contexts = np.bincount(child_idx, minlength=n) + np.bincount(roots, minlength=n)
    shared = np.flatnonzero(contexts > 1)
    first_parent = np.arange(n, dtype=np.int64)
    first_parent[child_idx[::-1]] = parent[::-1]  # the last write is the first edge
    top = first_parent
    while True:
        nxt = top[top]
        if np.array_equal(nxt, top):
            break
        top = nxt
    index = np.zeros(n, dtype=np.int64)
    index[roots[::-1]] = np.arange(roots.size - 1, -1, -1)  # first occurrence wins
    tree = index[top]
    # in several trees: a child of a node of another tree, or a root counted in another
    # tree (a root listed twice, or a node of another tree passed as a root)
    cross = child_idx[tree[parent] != tree[child_idx]]
    cross = np.concatenate([cross, roots[tree[roots] != np.arange(roots.size)]])
    return tree, int(shared[0]) if shared.size else -1, int(cross.min()) if cross.size else -1


def _canonical(a: np.ndarray, where: str) -> np.ndarray:
    """``a`` in JAX's dtype for it (int64 -> int32 without x64), refusing values it cannot hold."""
    if not (jax.dtypes.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise TypeError(f"{where} has dtype {a.dtype}; node data must be numeric arrays.")
    target = jax.dtypes.canonicalize_dtype(a.dtype)
    if target == a.dtype:
        return a
    with np.errstate(over="ignore", invalid="ignore"):
        cast = a.astype(target)
    if np.issubdtype(a.dtype, np.integer):
        lost = cast != a  # int64 -> int32 and uint64 -> uint32 wrap around
    else:  # float64 -> float32 (and complex) overflow to inf
        lost = np.isfinite(a) & ~np.isfinite(cast)
    if lost.any():
        index = np.unravel_index(int(np.argmax(lost)), a.shape)
        raise ValueError(
            f"{where} at node {index[0]} holds {a[index]}, which does not fit {target} (JAX "
            f"stores {a.dtype} data as {target} while jax_enable_x64 is off; it would become "
            f"{cast[index]}). Rescale or "
            "re-encode the values, or enable 64-bit types with "
            "jax.config.update('jax_enable_x64', True)."
        )
    return cast


@contextlib.contextmanager
def _gc_paused():
    """Pauses Python's cyclic garbage collector (restoring its state after).

    Converting Python trees allocates a few objects per node and frees none; each
    automatic collection then walks every live object, the user's whole dataset of
    ``Tree`` objects included. Measured on 256 complete binary trees of 255 nodes:
    ``from_trees`` 658 ms with the collector running, 263 ms paused.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_SCALAR_TYPES = (bool, int, float, complex, np.generic, np.ndarray)


def _stack_tree_data(datas: list) -> Any:
    """Stacks per-node data pytrees into one pytree of ``[N, ...]`` arrays, checking the schema."""
    first = datas[0]
    if type(first) is dict and all(
        isinstance(k, str) and isinstance(v, _SCALAR_TYPES) for k, v in first.items()
    ):
        # The common case, a flat dict of scalars or arrays: columns by key, without a
        # pytree flatten per node (which dominated the conversion of large batches). Dicts
        # of one size that all hold the first one's keys have exactly its keys.
        if set(map(type, datas)) == {dict} and set(map(len, datas)) == {len(first)}:
            names = sorted(first)  # the pytree order of dict keys
            try:
                stacked = [
                    _stack_column(tuple(map(operator.itemgetter(k), datas)), f"data[{k!r}]", True)
                    for k in names
                ]
            except KeyError:
                stacked = [None]
            if all(a is not None for a in stacked):
                return {k: _canonical(a, f"data[{k!r}]") for k, a in zip(names, stacked)}
    flat0, treedef = jax.tree_util.tree_flatten_with_path(first)
    paths = [jax.tree_util.keystr(p) for p, _ in flat0]
    flatten = jax.tree_util.tree_flatten
    rows = [flatten(d) for d in datas]
    if all(td == treedef for _, td in rows):
        columns = list(zip(*(leaves for leaves, _ in rows))) if paths else []
        stacked = [_stack_column(c, f"data{p}") for c, p in zip(columns, paths)]
        if all(a is not None for a in stacked):
            return jax.tree_util.tree_unflatten(
                treedef, [_canonical(a, f"data{p}") for a, p in zip(stacked, paths)]
            )
    # Slow path, only to say exactly which nodes differ.
    ref = [np.asarray(x) for _, x in flat0]
    problems = []
    for i, (leaves, td) in enumerate(rows):
        if td != treedef:
            problems.append(f"node {i}: data structure {td} differs from node 0's {treedef}")
        else:
            for j, leaf in enumerate(leaves):
                a = np.asarray(leaf)
                if a.shape != ref[j].shape or a.dtype != ref[j].dtype:
                    problems.append(
                        f"node {i}: data{paths[j]} has shape {a.shape} and dtype {a.dtype}; "
                        f"node 0 has shape {ref[j].shape} and dtype {ref[j].dtype}"
                    )
        if len(problems) >= 10:
            break
    raise ValueError(
        "node data must have the same structure, shapes and dtypes on every node:\n  "
        + "\n  ".join(problems)
        + "\nConvert the data to one schema (for example floats everywhere: 1.0, not 1)."
    )


def _stack_column(column: tuple, where: str, scalars_only: bool = False) -> np.ndarray | None:
    """``np.stack`` of one data field over all nodes, or None if the nodes disagree
    (with ``scalars_only``, also when a value is not a scalar or numpy array: a list is a
    container there, as in the pytree path).

    The dtype depends on the field's types only, never on its values, so that any group
    of nodes stacks to the same dtype (``fit`` stacks a whole dataset at once, a batch
    its own nodes): Python ints are int64, and one outside int64 is refused.
    """
    types = set(map(type, column))
    if scalars_only and not all(issubclass(t, _SCALAR_TYPES) for t in types):
        return None
    kind = types.pop() if len(types) == 1 else object  # mixed types (1.0 and np.float64): as arrays
    if issubclass(kind, np.number):  # numpy scalars of one type: one dtype
        return np.fromiter(column, dtype=kind, count=len(column))
    if kind is int:
        try:
            return np.array(column, dtype=np.int64)
        except OverflowError:
            raise _outside_int64(where, [[v] for v in column]) from None
    if kind in (bool, float, complex) or issubclass(kind, np.generic):
        return np.array(column)  # one scalar type: one dtype, shape ()
    if issubclass(kind, (np.ndarray, np.generic)):
        if len({(a.shape, a.dtype) for a in column}) != 1:
            return None
        return np.stack(column)
    arrays = [np.asarray(a) for a in column]  # other array types (jax arrays, ...)
    if len({(a.shape, a.dtype) for a in arrays}) != 1:
        return None
    return np.stack(arrays)


def _check_array_data(data: Any, n: int) -> Any:
    # A list is read as one array ([1.0, 2.0] or nested lists); tuples and dicts are containers.
    flat, treedef = jax.tree_util.tree_flatten_with_path(data, is_leaf=lambda x: isinstance(x, list))
    out = []
    for path, leaf in flat:
        where = f"data{jax.tree_util.keystr(path)}"
        try:
            a = np.asarray(leaf)
        except ValueError as e:  # ragged nested lists
            raise ValueError(
                f"{where} is not a rectangular array ({e}); every node's row must have one shape."
            ) from None
        if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(
                f"{where} has shape {a.shape}; its leading axis must be the number of nodes ({n})."
            )
        if isinstance(leaf, list) and a.dtype.kind in "fO":
            a = _python_ints(leaf, a, where)
        out.append(_canonical(a, where))
    return jax.tree_util.tree_unflatten(treedef, out)


def _python_ints(leaf: list, a: np.ndarray, where: str) -> np.ndarray:
    """A (nested) list of Python ints as int64, as ``from_trees`` stacks them, where numpy
    alone made it float64 or object because of values outside int64 (``[2**63, 1]``),
    which are refused; ``a`` (numpy's conversion) for any other list."""
    values = np.asarray(leaf, dtype=object)
    rows = values.reshape(values.shape[0], -1)
    if not all(type(v) is int for v in rows.flat):
        return a
    raise _outside_int64(where, rows)


def _outside_int64(where: str, rows) -> ValueError:
    """The refusal of the first Python int outside int64 in ``rows`` (one per node)."""
    node, value = next(
        (i, v) for i, row in enumerate(rows) for v in row if not -(2**63) <= v < 2**63
    )
    return ValueError(
        f"{where} at node {node} is the Python int {value}, outside int64; Python int "
        "data are stored as int64 (int32 while jax_enable_x64 is off). Re-encode the "
        "values (hash ids into range) or store them as floats."
    )


def _csr_from_lists(children: Sequence[Sequence[int]], n: int):
    try:
        counts = np.fromiter((len(c) for c in children), dtype=np.int64, count=n)
        flat = np.array(list(itertools.chain.from_iterable(children)))
    except (TypeError, ValueError) as e:  # ValueError: ragged nested ids
        bad = _first_non_integer(children) if isinstance(e, ValueError) else None
        if bad is not None:
            raise TypeError(f"child ids must be integers; node {bad[0]} has child {bad[1]!r}.") from None
        raise TypeError(f"children must be a list of lists of node ids ({e}).") from None
    child_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=child_ptr[1:])
    if flat.ndim != 1 or (flat.size and not np.issubdtype(flat.dtype, np.integer)):
        bad = _first_non_integer(children)
        what = f"node {bad[0]} has child {bad[1]!r}" if bad is not None else f"got dtype {flat.dtype}"
        raise TypeError(f"child ids must be integers; {what}.")
    if flat.size == 0:
        return child_ptr, np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= n))
    if bad.size:
        node = int(np.searchsorted(child_ptr, bad[0], side="right") - 1)
        raise ValueError(
            f"child id {flat[bad[0]]} of node {node} is out of range: the forest has {n} "
            f"nodes (valid ids 0..{n - 1})."
        )
    selfloop = np.flatnonzero(flat == np.repeat(np.arange(n), counts))
    if selfloop.size:
        node = int(flat[selfloop[0]])
        raise ValueError(f"node {node} is its own child (a cycle).")
    return child_ptr, flat.astype(np.int64)


def _first_non_integer(children):
    """Error path only: ``(node, value)`` of the first child id that is not an integer."""
    for i, kids in enumerate(children):
        for c in kids:
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                return i, c
    return None
