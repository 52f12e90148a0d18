"""Trace: turn a recursive Python function into one pure template per node signature.

A signature is what the function may branch on in Python: whether the node is a leaf
and, when the code iterates, indexes or measures ``node.children``, its arity. The
function is called with a symbolic node whose ``data`` are traced arrays and whose
children, when passed back to the function, stand for their already-computed outputs.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.extend.core import ClosedJaxpr, Jaxpr, Var, jaxpr_as_fun

try:
    from jax.extend.core import DebugInfo
except ImportError:  # jax < 0.7 (the newest for Python 3.10 is 0.6.2) keeps it internal
    from jax._src.core import DebugInfo

from . import _executor
from ._forest import MAX_SPECIALISED_ARITIES, Forest, segment_reduce
from ._tree import Position, Tree

_DATA_FLOW_ERRORS = (
    jax.errors.TracerBoolConversionError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


_CONSTRUCTS = {
    "TracerBoolConversionError": "an `if`, `while`, `and`/`or` or `bool()`",
    "TracerIntegerConversionError": "`range()`, a Python list index or `int()`",
    "ConcretizationTypeError": "a Python value (a shape, a size, a `float()`)",
    "TracerArrayConversionError": "a NumPy conversion (`np.asarray`)",
}


class _UsageError(TypeError):
    """A rule of recjax broken by the user's code: raised as is, never wrapped."""


class _NeedsArity(Exception):
    """Internal: the trace of a variable-arity node read the arity; retrace per arity."""


class _NeedsKind(Exception):
    """Internal: a bottom-up trace read ``node.kind``; retrace once per kind."""


class _NeedsLeaf(Exception):
    """Internal: a top-down trace read ``node.is_leaf``; retrace for leaves and the rest."""


class _IsTopDown(Exception):
    """Internal: a bottom-up trace read ``node.parent`` or ``node.is_root``: retrace top-down."""

    def __init__(self, rec):
        super().__init__(rec)
        self.rec = rec


class _EmptyReductionError(TypeError):
    """A computation failed after a reduction over no children gave the scalar neutral element."""


_EMPTY_HINT = (
    "{name} failed at {where} after `children.map(...).sum()` over no children returned "
    "the scalar 0 (like Python's sum([])), which has no shape: {err}. Write a leaf branch "
    "(`if node.is_leaf: ...`) or pass the neutral element with its shape, for example "
    "`.sum(initial=jnp.zeros(hidden))`."
)


def _note_empty_reduction():
    if _frames.stack:
        _frames.stack[-1].empty_reduction = True


def _call_user(frame, fn, args, kwargs, where):
    """Calls the user's function inside ``frame``, turning known failures into clear errors."""
    _frames.stack.append(frame)
    try:
        return fn(*args, **kwargs)
    except (_NeedsArity, _NeedsKind, _NeedsLeaf, _IsTopDown, _EmptyReductionError, _UsageError):
        raise
    except _DATA_FLOW_ERRORS as e:
        construct = _CONSTRUCTS.get(type(e).__name__, "Python control flow")
        raise TypeError(
            f"{frame.rec._name} branches on traced data at {where}: {type(e).__name__} "
            f"({construct} on a traced value). Python `if`/`for`/`while` may only test "
            "structure such as `node.is_leaf`, `len(node.children)` or `node.kind`; use "
            "`jnp.where` or `lax.cond`/`lax.switch` to branch on data, and "
            "`lax.while_loop`/`lax.fori_loop` for loops whose length depends on data."
        ) from e
    except Exception as e:
        if frame.empty_reduction:
            raise _EmptyReductionError(
                _EMPTY_HINT.format(name=frame.rec._name, where=where, err=f"{type(e).__name__}: {e}")
            ) from e
        raise
    finally:
        _frames.stack.pop()


class _Frame(threading.local):
    def __init__(self):
        self.stack: list = []


_frames = _Frame()


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


# ---------------------------------------------------------------------- ragged values


class Ragged:
    """The result of ``node.children.map(fn)``: one value per child, reduced with a method.

    Each reduction applies leaf-wise to the pytree ``fn`` returns and is equivalent to
    the Python program on the list ``[fn(c) for c in node.children]``:

      sum()   ``sum(values, initial)`` with ``initial`` 0 by default, so a node
              without children gives the scalar 0 (like Python's ``sum([])``)
      mean()  ``sum(values) / len(values)``; an error for a node without children
      max()   ``max(values + [initial])``; without ``initial`` an error for no children
      min()   likewise
    """

    def sum(self, initial=None):
        return self._reduce("sum", initial)

    def mean(self):
        return self._reduce("mean", None)

    def max(self, initial=None):
        return self._reduce("max", initial)

    def min(self, initial=None):
        return self._reduce("min", initial)

    def __len__(self):
        raise TypeError(
            "children.map(...) has no len(): in a batched program it holds a different "
            "number of values at every node. Reduce it (.sum(), .mean(), .max(), .min()); "
            "for the number of children use node.children.map(lambda c: 1.0).sum()."
        )

    def __iter__(self):
        raise TypeError(
            "children.map(...) cannot be iterated: in a batched program it holds a "
            "different number of values at every node. Reduce it (.sum(), .mean(), "
            ".max(), .min()), or iterate node.children itself."
        )


def _combine(op, x, initial):
    if initial is None:
        return x
    if op == "sum":
        return jax.tree.map(lambda a, b: a + b, x, _like(initial, x))
    f = jnp.maximum if op == "max" else jnp.minimum
    return jax.tree.map(f, x, _like(initial, x))


def _like(initial, x):
    """``initial`` as a pytree like ``x``: a scalar applies to every leaf."""
    if jax.tree.structure(initial).num_leaves == 1 and jax.tree.structure(x).num_leaves != 1:
        return jax.tree.map(lambda _: initial, x)
    return initial


class _ListRagged(Ragged):
    """Values of a node whose children are known (eager, a leaf, or a fixed arity)."""

    def __init__(self, values: list):
        self._values = values

    def _reduce(self, op, initial):
        if not self._values:
            if op == "sum":
                if initial is None:
                    _note_empty_reduction()
                    return 0
                return initial
            if initial is None:
                raise ValueError(
                    f"children.map(...).{op}() at a node without children: there is no "
                    f"neutral element. Handle leaves first (`if node.is_leaf: ...`)"
                    + (f" or pass `initial=` to {op}()." if op != "mean" else ".")
                )
            return initial
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *self._values)
        return _combine(op, jax.tree.map(lambda a: _dense_reduce(op, a), stacked), initial)


class _SegmentRagged(Ragged):
    """Values of variable-arity nodes, computed over a step's edges with segment ops.

    Inside the template the row axis is ``vmap``-ed away; ``fn`` runs once per edge.
    The reduction is a ``custom_vmap`` whose rule sees the whole batch of rows: it
    computes the part of ``fn`` that does not depend on the child once per row (for
    example ``x @ W_f`` in a Child-Sum forget gate, where ``x`` is the node's input),
    gathers those row-level values onto the edges, evaluates the rest of ``fn``
    vectorised over the edges and reduces per row with ``jax.ops.segment_*``.
    """

    def __init__(self, fn, edges: _executor.Edges, row):
        # One slot's row and position, typed as the step's edges are (inside shard_map
        # they vary over its mesh axes, and the jaxpr replayed on them must say so).
        scalar = jax.tree.map(lambda a: a.reshape(-1)[0], (edges.rows, edges.position))
        # make_jaxpr exposes every value fn closes over (row-level tracers and the
        # buffers the child's outputs are read from) as a constant, which we pass
        # explicitly so the vmap rule can gather the row-level ones onto the edges.
        closed, out_shape = jax.make_jaxpr(
            lambda r, i: fn(_SymbolicChild(r, i)), return_shape=True
        )(*scalar)
        self._jaxpr = closed.jaxpr
        self._consts = list(closed.consts)
        self._out_tree = jax.tree.structure(out_shape)
        self._edges = edges
        self._row = row

    def _apply(self, child_row, child_index, consts):
        flat = jaxpr_as_fun(ClosedJaxpr(self._jaxpr, list(consts)))(child_row, child_index)
        return jax.tree.unflatten(self._out_tree, flat)

    def _reduce(self, op, initial):
        edges = self._edges

        @custom_vmap
        def reduce_one(row, child_rows, positions, segment, consts):
            # Unbatched meaning (used only for shapes): one row owning every edge.
            values = jax.vmap(self._apply, in_axes=(0, 0, None))(child_rows, positions, consts)
            return jax.tree.map(lambda v: _dense_reduce(op, v), values)

        @reduce_one.def_vmap
        def rule(axis_size, in_batched, row, child_rows, positions, segment, consts):
            row_fn, row_batched, edge_fn = _split_per_row(self._jaxpr, in_batched[4])
            # Row-level values: once per row; those that vary by row go onto the edges.
            # Unused edge slots (segment == axis_size) borrow the last row's values;
            # the segment op drops them. Every row, padding included, owns >= 1 edge.
            in_axes = [0 if b else None for b in in_batched[4]]
            out_axes = [0 if b else None for b in row_batched]
            per_row = jax.vmap(row_fn, in_axes=(in_axes,), out_axes=out_axes, axis_size=axis_size)(consts)
            owner = jnp.minimum(segment, axis_size - 1)
            per_edge = [v[owner] if b else v for v, b in zip(per_row, row_batched)]
            flat = jax.vmap(edge_fn, in_axes=(0, 0, out_axes))(child_rows, positions, per_edge)
            values = jax.tree.unflatten(self._out_tree, flat)
            out = jax.tree.map(lambda v: _segment_reduce(op, v, segment, axis_size), values)
            return out, jax.tree.map(lambda _: True, out)

        reduced = reduce_one(self._row, edges.rows, edges.position, edges.segment, self._consts)
        return _combine(op, reduced, initial)


def _split_per_row(jaxpr: Jaxpr, consts_batched):
    """Splits the jaxpr of a ``children.map`` function into a per-row and a per-edge part.

    ``jaxpr`` takes the child's row and index and closes over ``constvars``, of which
    those flagged in ``consts_batched`` vary by row. Equations that read neither the
    child nor an effect run once per row (loop-invariant code motion: the edges of a row
    share their results); the rest runs per edge. Returns ``(row_fn, row_batched,
    edge_fn)``: ``row_fn(consts)`` gives the row-level values the edge part reads,
    ``row_batched`` says which of them vary by row, and ``edge_fn(child_row,
    child_index, values)`` gives ``fn``'s flat outputs.
    """
    child = set(jaxpr.invars)
    batched = {v for v, b in zip(jaxpr.constvars, consts_batched) if b}
    row_eqns, edge_eqns = [], []
    for eqn in jaxpr.eqns:
        reads = [v for v in eqn.invars if isinstance(v, Var)]
        if eqn.effects or any(v in child for v in reads):
            edge_eqns.append(eqn)
            child.update(eqn.outvars)
        else:
            row_eqns.append(eqn)
            if any(v in batched for v in reads):
                batched.update(eqn.outvars)
    # What the edge part reads from the row part (or the constants), in a fixed order.
    needed = {}
    for v in [v for eqn in edge_eqns for v in eqn.invars] + list(jaxpr.outvars):
        if isinstance(v, Var) and v not in child:
            needed.setdefault(v, None)
    needed = list(needed)
    info = lambda part, n_in, n_out: DebugInfo(
        "children.map", f"{part} part of a children.map function", (part,) * n_in, (part,) * n_out
    )
    row_jaxpr = Jaxpr(
        [], list(jaxpr.constvars), needed, row_eqns,
        debug_info=info("row", len(jaxpr.constvars), len(needed)),
    )
    edge_in = list(jaxpr.invars) + needed
    edge_jaxpr = Jaxpr(
        [], edge_in, list(jaxpr.outvars), edge_eqns,
        effects=jaxpr.effects, debug_info=info("edge", len(edge_in), len(jaxpr.outvars)),
    )
    row_fn = lambda consts: jaxpr_as_fun(ClosedJaxpr(row_jaxpr, []))(*consts)
    edge_fn = lambda r, i, values: jaxpr_as_fun(ClosedJaxpr(edge_jaxpr, []))(r, i, *values)
    return row_fn, [v in batched for v in needed], edge_fn


def _dense_reduce(op, v):
    return {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max, "min": jnp.min}[op](v, axis=0)


def _segment_reduce(op, v, segment, n):
    return segment_reduce(op, v, segment, n, indices_are_sorted=True)


# ---------------------------------------------------------------------- nodes


class Children:
    """``node.children``: iterate, index or ``len()`` (specialises per arity), or ``map``.

    Iterating, indexing or taking ``len()`` makes the trace specialise per arity: the
    function is traced once for every arity found in the forest (right for N-ary cells
    with a weight per child position). ``map(fn)`` instead calls ``fn(child)`` on a
    symbolic child and returns a ``Ragged`` value: one template for every arity,
    executed with segment ops (right for child-sum cells over nodes with many children).
    The part of ``fn`` that reads only node-level values (``x @ W_f`` in a forget gate
    closing over the node's input ``x``) runs once per node, not once per child.
    Every child has ``child.index``, its position among the node's children.
    """

    def __init__(self, items=None):
        self._items = items

    def _list(self):
        if self._items is None:
            raise _NeedsArity
        return self._items

    def __len__(self):
        return len(self._list())

    def __iter__(self):
        return iter(self._list())

    def __getitem__(self, i):
        return self._list()[i]

    def map(self, fn: Callable[[Any], Any]) -> Ragged:
        """``fn(child)`` for every child, reduced later with ``.sum()``, ``.max()``, ...

        ``fn`` may call any recursive function on the child, read ``child.index`` and
        compute on the results, closing over node-level values.

        Example:
          >>> import jax.numpy as jnp
          >>> import recjax as rj
          >>> @rj.recursive
          ... def positional(node):  # sum over children of (index + 1) * child's value
          ...     own = jnp.float32(node.data)
          ...     return own + node.children.map(lambda c: (c.index + 1) * positional(c)).sum()
          >>> t = rj.Tree(1.0, [rj.Tree(10.0), rj.Tree(100.0)])
          >>> float(positional(t)), positional.batch(rj.Forest.from_trees([t])).tolist()
          (211.0, [211.0, 10.0, 100.0])
        """
        return _ListRagged([fn(c) for c in self._list()])


class _RaggedChildren(Children):
    def __init__(self, edges, row):
        super().__init__(None)
        self._edges = edges
        self._row = row

    def map(self, fn):
        return _SegmentRagged(fn, self._edges, self._row)


class _SymbolicChild:
    """A child inside a template: its buffer row and index; pass it to a recursive function."""

    def __init__(self, row, index):
        self.row = row
        self.index = index

    def __getattr__(self, name):
        raise AttributeError(
            f"a child node inside a @recursive function supports the recursive call "
            f"(f(..., child, ...)) and `child.index`; `child.{name}` is not available. "
            "Read data on the child's own call instead (its `node.data`)."
        )


class _SymbolicParent(_SymbolicChild):
    """``node.parent`` inside a top-down template: pass it to a recursive function."""

    def __getattr__(self, name):
        raise AttributeError(
            f"`node.parent` inside a @recursive function supports the recursive call "
            f"(f(..., node.parent, ...)) only; `node.parent.{name}` is not available."
        )


class _Node:
    """The node a @recursive function receives.

    ``data`` (arrays), ``index`` (position among the parent's children, int32; 0 at a
    root), ``is_leaf`` and ``children`` (bottom-up), ``is_root`` and ``parent``
    (top-down: reading either makes the function top-down).
    """

    def __init__(self, data):
        self.data = data


class _TraceNode(_Node):
    """A symbolic node: structure is static per signature, the rest is traced."""

    def __init__(self, data, frame):
        super().__init__(data)
        self._frame = frame

    @property
    def is_leaf(self):
        f = self._frame
        if f.direction == "up":
            return _plain(f.signature) == 0
        if f.signature[1] is None:
            raise _NeedsLeaf
        return f.signature[1]

    @property
    def children(self):
        f = self._frame
        if f.direction == "down":
            raise _UsageError(
                f"{f.rec._name} reads node.parent or node.is_root, which makes it top-down "
                "(parents before children), so it cannot also read node.children. Compute "
                "what needs the children in a bottom-up function and call it here on the "
                "node: `up(node)`."
            )
        signature = _plain(f.signature)
        if signature == 0:
            return Children([])
        if signature == "map":
            return _RaggedChildren(f.edges, f.ctx["row"])
        rows = f.ctx["children"]
        return Children([_SymbolicChild(rows[i], i) for i in range(signature)])

    @property
    def kind(self):
        f = self._frame
        kinds = f.program.kinds
        if kinds is None:
            raise _UsageError(
                f"{f.rec._name} reads node.kind, but the forest has no kinds; build it with "
                "tagged nodes and a vocabulary: rj.Tree(data, children, kind='Add') and "
                "rj.Forest.from_trees(trees, kinds=[...])."
            )
        if f.direction == "down":
            raise _UsageError(
                f"{f.rec._name} reads node.kind in a top-down function, which is not "
                "supported yet; read it in a bottom-up function and call that on the node."
            )
        if not _is_kinded(f.signature):
            raise _NeedsKind
        return kinds[f.signature[1]]

    @property
    def is_root(self):
        f = self._frame
        if f.direction == "up":
            raise _IsTopDown(f.rec)
        return f.signature[0]

    @property
    def parent(self):
        f = self._frame
        if f.direction == "up":
            raise _IsTopDown(f.rec)
        return None if f.signature[0] else _SymbolicParent(f.ctx["parent"], None)

    @property
    def index(self):
        self._frame.program.uses_rows = True
        return self._frame.ctx["index"]


def _eager_data(x):
    """A node's data for plain recursion: JAX arrays as they are (tracers too, so the
    reference call works under ``jit``, ``grad`` and ``vmap``), the rest as jnp arrays."""
    if isinstance(x, jax.Array):
        return x
    a = np.asarray(x)
    return jnp.asarray(a, jax.dtypes.canonicalize_dtype(a.dtype))


class _EagerNode(_Node):
    """A node of a concrete tree during plain Python recursion."""

    def __init__(self, pos: Position, rec):
        tree = pos.tree
        data = jax.tree.map(_eager_data, tree.data)
        super().__init__(data)
        self._pos = pos
        self._rec = rec

    @property
    def is_leaf(self):
        return self._pos.tree.is_leaf

    @property
    def kind(self):
        return self._pos.tree.kind

    @property
    def children(self):
        pos = self._pos
        return Children([_EagerChild(Position(c, pos, i)) for i, c in enumerate(pos.tree.children)])

    @property
    def is_root(self):
        self._rec._top_down = True
        return self._pos.parent is None

    @property
    def parent(self):
        self._rec._top_down = True
        return None if self._pos.parent is None else _EagerChild(self._pos.parent, is_parent=True)

    @property
    def index(self):
        return jnp.int32(self._pos.index)


class _EagerChild:
    """A child (or parent) during plain recursion: pass it to a recursive function.

    Reading anything else fails as it does when batched (``_SymbolicChild``), so that
    plain recursion and ``batch`` accept the same programs."""

    def __init__(self, pos: Position, is_parent: bool = False):
        self.pos = pos
        self.index = jnp.int32(pos.index)
        self._is_parent = is_parent

    def __getattr__(self, name):
        if name.startswith("__") or name in ("pos", "index", "_is_parent"):
            return object.__getattribute__(self, name)  # Python's own AttributeError
        symbolic = _SymbolicParent if self._is_parent else _SymbolicChild
        return symbolic.__getattr__(self, name)


# ---------------------------------------------------------------------- the decorator


def recursive(fn: Callable) -> Recursive:
    """Makes ``fn`` a recursive function over trees that recjax can batch and compile.

    ``fn`` takes exactly one node argument among its arguments. Called with a concrete
    ``Tree`` it is plain Python recursion (the reference meaning); ``fn.batch`` takes
    the same arguments with a ``Forest`` in place of the node and returns ``fn``'s
    output for every node, stacked on a leading node axis, in one compiled program;
    ``fn.roots`` returns the roots' outputs only (cheaper when that is all a loss reads).

    Inside ``fn``: ``node.data`` (the node's data, arrays), ``node.index`` (its position
    among its parent's children), and either

    - bottom-up: ``node.is_leaf`` (a Python bool) and ``node.children`` (see
      ``Children``); ``fn`` calls itself on children, or
    - top-down: ``node.is_root`` (a Python bool) and ``node.parent`` (``None`` at a
      root); ``fn`` calls itself on ``node.parent``. Reading either makes ``fn``
      top-down: the batch runs from the roots to the leaves.

    ``fn`` may call other ``@recursive`` functions on the node itself, its children or
    its parent, including functions that call ``fn`` back (mutual recursion): all run
    in one program, each computed once per node. Python ``if``/``for`` may test
    structure only; branch on data with ``jnp.where`` or ``lax.cond``. Every call of one
    function passes the same non-node arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> import recjax as rj
      >>> @rj.recursive
      ... def total(w, node):
      ...     return w * node.data + node.children.map(lambda c: total(w, c)).sum()
      >>> tree = rj.Tree(1.0, [rj.Tree(2.0), rj.Tree(3.0, [rj.Tree(4.0)])])
      >>> float(total(2.0, tree))
      20.0
      >>> forest = rj.Forest.from_trees([tree, rj.Tree(5.0)])
      >>> total.batch(jnp.float32(2.0), forest).tolist()
      [20.0, 4.0, 14.0, 8.0, 10.0]
      >>> total.roots(jnp.float32(2.0), forest).tolist()
      [20.0, 10.0]
      >>> @rj.recursive
      ... def depth(node):  # top-down: a node's output depends on its parent's
      ...     return jnp.int32(0) if node.is_root else depth(node.parent) + 1
      >>> depth.batch(forest).tolist()
      [0, 1, 1, 2, 0]
      >>> [int(depth(p)) for p in tree.walk()]
      [0, 1, 1, 2]
    """
    return Recursive(fn)


class Recursive:
    """A ``@recursive`` function: call it on a ``Tree``, or run it over a ``Forest`` with
    ``.batch`` (every node's output) or ``.roots`` (the roots' outputs)."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        try:
            self._signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some callables have no signature
            self._signature = None
        self._program_cache: dict = {}
        self._top_down = False  # learnt from the first trace or eager call that reads parent
        self._num_traces = 0  # executor traces, for recompilation tests
        self._jit_execute = jax.jit(self._execute, static_argnums=(0, 3))

    def __repr__(self):
        return f"<recjax.recursive {getattr(self.fn, '__qualname__', self.fn)}>"

    def _bind(self, args, kwargs):
        """The call's arguments by parameter name (defaults filled), so ``f(p, c, s)`` and
        ``f(p, c, scale=s)`` compare equal; positional and keyword as given otherwise."""
        if self._signature is None:
            return (args, kwargs)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return (args, kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    @property
    def _name(self):
        return getattr(self.fn, "__name__", "the recursive function")

    # ------------------------------------------------------------------ calls

    def _find_node(self, args, kwargs, allowed, how):
        found = [(i, a) for i, a in enumerate(args) if isinstance(a, allowed)]
        found += [(k, v) for k, v in kwargs.items() if isinstance(v, allowed)]
        if len(found) != 1:
            what = "no node argument" if not found else f"{len(found)} node arguments"
            raise TypeError(f"{self._name}(...) got {what}; {how}")
        return found[0]

    def __call__(self, *args, **kwargs):
        pos, node = self._find_node(
            args,
            kwargs,
            (Tree, Position, _EagerChild, _SymbolicChild, _Node, Forest),
            "pass exactly one node: an rj.Tree (or a child node inside the function).",
        )
        if isinstance(node, Forest):
            raise TypeError(
                f"{self._name}(...) got a Forest; use {self._name}.batch(...) to run over a "
                "Forest, or call it on one rj.Tree."
            )
        rest = _replace(args, kwargs, pos, None)
        frame = _frames.stack[-1] if _frames.stack else None
        if isinstance(node, (Tree, Position, _EagerChild, _EagerNode)):
            if isinstance(node, Tree):
                node = Position(node, None, 0)
            elif isinstance(node, _EagerChild):
                node = node.pos
            elif isinstance(node, _EagerNode):
                if frame is not None and node is frame.node and frame.rec is self:
                    raise _self_call(self)
                node = node._pos
            context = frame.context if isinstance(frame, _EagerFrame) else _EagerContext()
            return context.compute(self, node, args, kwargs, pos, rest)
        if not isinstance(frame, _TraceFrame) or (isinstance(node, _Node) and node is not frame.node):
            raise _UsageError(
                f"{self._name} was called on a node that belongs to no running call (a node "
                "kept from an earlier call); call it on an rj.Tree, or batch it over an "
                "rj.Forest."
            )
        if isinstance(node, _SymbolicParent):
            relation, row = "parent", node.row
        elif isinstance(node, _SymbolicChild):
            relation, row = "child", node.row
        else:
            relation, row = "self", frame.ctx["row"]
        if self is frame.rec:
            if relation == "self":
                raise _self_call(self)
            _check_same_args(self, frame.rest, rest)
            fid = frame.fid
        else:
            binding = _Binding.of(self, pos, rest, frame.dynamic)
            fid = frame.program.call(frame, self, binding, relation)
        return frame.program.read(fid, row)

    # ------------------------------------------------------------------ batch

    def batch(self, *args, **kwargs):
        """Runs the function over every node of a Forest in one compiled program.

        Equivalent to ``[fn(*args_with_node_i) for every node i of the forest]`` stacked
        leaf-wise on a new leading axis, where ``args_with_node_i`` has node ``i`` in place
        of the Forest: the output for node ``i`` is row ``i``. Differentiable with
        ``jax.grad``, and works under ``jax.jit``, ``jax.jvp`` and ``jax.vmap``. Array
        arguments are traced; other arguments are static.

        Raises:
          TypeError: no Forest among the arguments (for example a Tree), control flow
            on traced data, or outputs whose structure differs between node kinds.
          ValueError: a node whose arity the function cannot handle, or a top-down
            function over a node with several parents.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> import recjax as rj
          >>> @rj.recursive
          ... def depth(node):
          ...     if node.is_leaf:
          ...         return jnp.float32(0)
          ...     return 1 + node.children.map(depth).max()
          >>> f = rj.Forest.from_parents([-1, 0, 0, 2])
          >>> depth.batch(f).tolist()
          [2.0, 0.0, 1.0, 0.0]
        """
        prepared = self._prepare(args, kwargs)
        out = self._jit_execute(prepared.program, prepared.dynamic, prepared.forest._arrays)
        return jax.tree.map(lambda o: o[: prepared.forest.num_nodes], out)

    def roots(self, *args, **kwargs):
        """Like ``batch``, but returns the outputs at the forest's roots only.

        Equal to ``fn.batch(...)[forest.roots]`` leaf-wise (row ``k`` is root
        ``forest.roots[k]``, padding roots included), without first putting every node's
        output in node order: ``batch`` gathers every row of the state buffer, and under
        ``jax.grad`` scatters a cotangent into every row. Use it where a loss or a
        prediction reads the roots only (a label per tree). Raises what ``batch`` raises.

        Example:
          >>> import recjax as rj
          >>> @rj.recursive
          ... def size(node):
          ...     return 1 + node.children.map(size).sum()
          >>> f = rj.Forest.from_trees([rj.Tree(None, [rj.Tree(None), rj.Tree(None)]), rj.Tree(None)])
          >>> size.roots(f).tolist(), size.batch(f)[f.roots].tolist()
          ([3, 1], [3, 1])
        """
        prepared = self._prepare(args, kwargs, "roots")
        return self._jit_execute(prepared.program, prepared.dynamic, prepared.forest._arrays, True)

    def _prepare(self, args, kwargs, method="batch") -> _Prepared:
        """What ``batch`` computes on the host before it executes (also used by ``debug``)."""
        pos, forest = self._find_node(
            args,
            kwargs,
            (Forest, Tree),
            "pass exactly one rj.Forest (build one with rj.Forest.from_trees([...])).",
        )
        if isinstance(forest, Tree):
            raise TypeError(
                f"{self._name}.{method}(...) takes a Forest, not a Tree; use "
                f"rj.Forest.from_trees([tree]), or call {self._name}(...) on the Tree."
            )
        forest._check_not_stacked(f"{self._name}.{method}")
        rest = _replace(args, kwargs, pos, None)
        leaves, treedef = jax.tree.flatten(rest)
        dynamic = [x for x in leaves if _is_array(x)]
        it = iter(range(len(dynamic)))
        marked = [_Dyn(next(it)) if _is_array(x) else x for x in leaves]
        try:
            hash(tuple(marked))
        except TypeError:
            raise TypeError(
                f"{self._name}.{method}: non-array arguments must be hashable (they are "
                "compile-time constants); pass arrays for values that change."
            ) from None
        binding = _Binding.make(self, pos, treedef, marked)
        meta = forest._meta
        data_spec = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), forest._arrays["data"]
        )
        dyn_spec = tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in dynamic)
        # The program depends on the plan's bucketed sizes and the arities, never on the
        # exact node count, so batches in one bucket share its compiled program.
        cache_key = (binding, meta.key, meta.arities, meta.kinds, meta.kind_arities,
                     bool(meta.example_node), dyn_spec,
                     jax.tree.structure(data_spec), tuple(jax.tree.leaves(data_spec)))
        program = self._program_cache.get(cache_key)
        if program is None:
            program = _discover(self, binding, meta, dyn_spec, data_spec)
            self._program_cache[cache_key] = program
        if meta.shared_node >= 0 and any(d == "down" for d, _ in program.passes):
            names = ", ".join(f.rec._name for f in program.fns if f.direction == "down")
            raise ValueError(
                f"top-down function(s) {names} need one parent per node, but node "
                f"{meta.shared_node} of the forest has several (a DAG, or one Tree passed "
                "twice or also used as a child). Run top-down passes on trees, or unshare "
                "the node (copy.deepcopy: one copy per parent or use)."
            )
        if meta.shared_node >= 0 and program.uses_rows:
            raise ValueError(
                f"node.index (a node's position among its parent's children) needs one "
                f"parent per node, but node {meta.shared_node} of the forest has several (a "
                "DAG). Read child.index inside node.children.map (one per edge) instead, or "
                "unshare the node (one copy per parent)."
            )
        return _Prepared(pos, forest, rest, dynamic, program)

    def _execute(self, program, dynamic, arrays, at_roots=False):
        self._num_traces += 1
        key = program.key
        dynamic = _executor.varying_like(dynamic, arrays["node_mask"])
        rows = _executor.row_tables(arrays, key) if program.uses_rows else None
        runtime = _Runtime(program)
        env: dict = {}
        for direction, fids in program.passes:
            fns = [
                _executor.PassFn(fid, {s: program.template(fid, s, runtime) for s in program.fns[fid].signatures},
                                 program.fns[fid].spec)
                for fid in fids
            ]
            run = _executor.run_up if direction == "up" else _executor.run_down
            env.update(run(fns, dynamic, env, arrays, key, rows))
        out = env[program.result]
        index = arrays["row_of_node"][arrays["roots"]] if at_roots else arrays["row_of_node"]
        return jax.tree.map(lambda a: a[index], out)


# ---------------------------------------------------------------------- bindings


class _Dyn(NamedTuple):
    """Marks an array argument: the i-th array leaf of the batched call's arguments."""

    i: int


class _Binding(NamedTuple):
    """How to rebuild a function's arguments from the batched call's array arguments.

    ``leaves`` holds static values and ``_Dyn`` marks; ``key`` is the same with the
    arguments bound by parameter name, so positional and keyword calls compare equal.
    """

    pos: int | str
    treedef: Any
    leaves: tuple
    key: Any

    @classmethod
    def make(cls, rec, pos, treedef, leaves):
        args, kwargs = jax.tree.unflatten(treedef, leaves)
        k_leaves, k_tree = jax.tree.flatten(rec._bind(args, kwargs))
        return cls(pos, treedef, tuple(leaves), (k_tree, tuple(k_leaves)))

    @classmethod
    def of(cls, rec, pos, rest, dynamic):
        """The binding of a call made inside a trace, whose arrays are ``dynamic``'s."""
        leaves, treedef = jax.tree.flatten(rest)
        marked = []
        for x in leaves:
            if _is_array(x):
                found = [i for i, d in enumerate(dynamic) if x is d]
                if not found:
                    raise _UsageError(
                        f"{rec._name} is called inside another recursive function with an "
                        "array argument computed there. recjax computes every function once "
                        "per node with one set of arguments, taken from the batched call: "
                        f"pass {rec._name} the caller's arguments or parts of them as they "
                        "are (for example params['cell']), not values computed from them."
                    )
                marked.append(_Dyn(found[0]))
            else:
                marked.append(x)
        return cls.make(rec, pos, treedef, marked)

    def rebuild(self, dynamic, node):
        leaves = [dynamic[x.i] if isinstance(x, _Dyn) else x for x in self.leaves]
        args, kwargs = jax.tree.unflatten(self.treedef, leaves)
        return _replace(args, kwargs, self.pos, node), (args, kwargs)


# ---------------------------------------------------------------------- programs


class _FnSpec(NamedTuple):
    """One function of a program (hashable: part of the executor's jit static argument)."""

    rec: Recursive
    binding: _Binding
    direction: str  # "up" (children first) or "down" (parents first)
    signatures: tuple  # templates to run: see _executor.PassFn
    out_flat: tuple  # (treedef, leaf ShapeDtypeStructs) of one node's output

    @property
    def spec(self):
        return jax.tree.unflatten(*self.out_flat)


class _Program(NamedTuple):
    """A batched call, resolved: its functions, the passes that compute them, the plan key."""

    fns: tuple[_FnSpec, ...]
    passes: tuple  # ((direction, (fid, ...)), ...) in execution order
    result: int  # the fid of the batched function
    key: Any  # the plan key
    uses_rows: bool  # some template reads node.index, or a pass runs top-down
    kinds: tuple | None  # the forest's kind vocabulary

    def template(self, fid, signature, resolver):
        """Function ``fid``'s template for ``signature``; calls resolve through ``resolver``."""
        f = self.fns[fid]
        return _template(f.rec, fid, f.binding, f.direction, signature, resolver)


class _Runtime:
    """Resolves calls while the executor traces templates: reads the functions' buffers."""

    def __init__(self, program: _Program):
        self.program = program
        self.uses_rows = program.uses_rows
        self.kinds = program.kinds
        self.fid = {f.rec: i for i, f in enumerate(program.fns)}
        self.env: dict = {}

    def call(self, frame, rec, binding, relation):
        fid = self.fid[rec]
        _check_binding(rec, self.program.fns[fid].binding, binding)
        return fid

    def read(self, fid, row):
        return jax.tree.map(lambda b: b[row], _current_env()[fid])


def _current_env():
    return _frames.stack[-1].env


def _template(rec, fid, binding, direction, signature, resolver):
    """The pure function ``(dynamic, env, data, ctx, edges) -> output`` of one signature.

    Calls of recursive functions inside resolve through ``resolver``: a ``_Discovery``
    (abstract traces) or a ``_Runtime`` (the executor's traces). ``ctx`` holds the row's own buffer ``row`` and, as needed, ``children`` (rows, fixed
    arity), ``parent`` (row) and ``index``; ``env`` maps function ids to buffers;
    ``edges`` are the step's child slots for a ``"map"`` signature.
    """

    def template(dynamic, env, data, ctx, edges):
        frame = _TraceFrame(rec, fid, signature, direction, dynamic, env, ctx, edges, resolver)
        node = _TraceNode(data, frame)
        frame.node = node
        (args, kwargs), frame.rest = binding.rebuild(dynamic, node)
        where = _describe(signature, resolver.kinds)
        out = _call_user(frame, rec.fn, args, kwargs, where)
        for leaf in jax.tree.leaves(out):
            if not (_is_array(leaf) or isinstance(leaf, (bool, int, float, complex))):
                raise _UsageError(
                    f"{rec._name} must return a pytree of arrays; at {where} it returned a "
                    f"leaf {leaf!r} of type {type(leaf).__name__}. Return jnp arrays (or "
                    "Python numbers)."
                )
        return out

    return template


class _Discovery:
    """Traces a batched call abstractly: which functions run, their signatures and outputs.

    Every function is registered with its base signature traced first (a leaf for a
    bottom-up function, a root for a top-down one): its output structure is what its
    children's (or parent's) outputs look like in its other signatures. Reads of any
    function's output return zeros of that structure; the calls between functions are
    recorded to schedule the passes.
    """

    uses_rows = False

    def __init__(self, meta, dyn_spec, data_spec, top_down):
        self.meta = meta
        self.kinds = meta.kinds
        self.dyn_spec = list(dyn_spec)
        self.data1 = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1,) + s.shape, s.dtype), data_spec)
        self.top_down = top_down  # functions known to be top-down
        self.fns: list[dict] = []
        self.fid: dict = {}
        self.calls: set = set()  # (caller fid, callee fid, relation)
        self.in_base: set = set()
        self.weak_reads = False  # reads keep a Python scalar's weak type (see check_weak)

    def call(self, frame, rec, binding, relation):
        fid = self.register(rec, binding)
        self.calls.add((frame.fid, fid, relation))
        return fid

    def read(self, fid, row):
        spec = self.fns[fid]["spec"]
        if spec is None:  # this function's own base signature is being traced
            raise _UsageError(
                f"{self.fns[fid]['rec']._name} reads its own output at a "
                f"{'leaf' if self.fns[fid]['direction'] == 'up' else 'root'} through another "
                "function it calls there: functions that call each other on the same node, "
                "which recurses forever; one of them must call the other on children (or "
                "the parent) instead."
            )
        if self.weak_reads:  # weak where some signature of the function returns a scalar
            leaves = jax.tree.leaves(spec)
            weak = self.fns[fid].get("weak", (False,) * len(leaves))
            return jax.tree.unflatten(jax.tree.structure(spec), [
                _zeros_keeping_weak_type(jax.ShapeDtypeStruct(s.shape, s.dtype, weak_type=w))
                for s, w in zip(leaves, weak)
            ])
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)

    def register(self, rec, binding) -> int:
        if rec in self.fid:
            fid = self.fid[rec]
            _check_binding(rec, self.fns[fid]["binding"], binding)
            return fid
        fid = len(self.fns)
        self.fid[rec] = fid
        direction = "down" if rec in self.top_down else "up"
        entry = {"rec": rec, "binding": binding, "direction": direction, "spec": None, "sigs": {}}
        self.fns.append(entry)
        if direction == "up":
            try:
                try:
                    entry["spec"] = self.trace(fid, 0)
                    entry["sigs"][0] = entry["spec"]
                except _NeedsKind:  # one leaf template per kind (the leaf rows' blocks)
                    for kind, _ in self.meta.key.leaf_blocks:
                        entry["sigs"][("kind", kind, 0)] = self.trace(fid, ("kind", kind, 0))
                    entry["spec"] = next(iter(entry["sigs"].values()))
                return fid
            except _IsTopDown as e:
                if e.rec is not rec:
                    raise
                entry["direction"] = "down"
                rec._top_down = True
        try:
            base = self.trace(fid, (True, None))
            entry["sigs"][(True, None)] = base
        except _NeedsLeaf:
            base = self.trace(fid, (True, True))
            entry["sigs"][(True, True)] = base
        entry["spec"] = base
        return fid

    def trace(self, fid, signature):
        """The output structure of one signature (a ShapeDtypeStruct pytree)."""
        entry = self.fns[fid]
        direction = "down" if _is_down(signature) else "up"
        template = _template(entry["rec"], fid, entry["binding"], direction, signature, self)
        scalar = jax.ShapeDtypeStruct((1,), jnp.int32)
        ctx = {"row": scalar, "parent": scalar, "index": scalar}
        edges = None
        plain = _plain(signature)
        if isinstance(plain, int) and plain > 0:
            ctx["children"] = jax.ShapeDtypeStruct((1, plain), jnp.int32)
        if plain == "map":
            edge = jax.ShapeDtypeStruct((1,), jnp.int32)
            edges = _executor.Edges(edge, edge, edge)

        def run(dynamic, data, ctx, edges):
            return _executor.apply_template(template, dynamic, {}, data, ctx, edges)

        out = jax.eval_shape(run, self.dyn_spec, self.data1, ctx, edges)
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype, weak_type=s.weak_type), out
        )

    def analyse(self, fid):
        """Traces every signature the forest needs and checks it returns the base structure."""
        entry = self.fns[fid]
        rec, sigs, meta = entry["rec"], entry["sigs"], self.meta
        if entry["direction"] == "up":
            if meta.example_node:  # the forest has internal nodes
                try:
                    sigs.update(self._internal(fid, ()))
                except _NeedsKind:
                    for kind in sorted({k for k, _ in meta.kind_arities}):
                        sigs.update(self._internal(fid, ("kind", kind)))
        else:
            if (True, True) in sigs:
                sigs[(True, False)] = self.trace(fid, (True, False))
            try:
                sigs[(False, None)] = self.trace(fid, (False, None))
            except _NeedsLeaf:
                sigs[(False, True)] = self.trace(fid, (False, True))
                sigs[(False, False)] = self.trace(fid, (False, False))
        for sig, spec in sigs.items():
            if not _same_spec(spec, entry["spec"]):
                base = self._base(fid)
                raise TypeError(
                    f"{rec._name} returns {_show(spec)} at {_describe(sig, self.kinds)} but "
                    f"{_show(entry['spec'])} at {base}. Every node must return the same "
                    "structure, shapes and dtypes (the children's and parent's outputs have "
                    f"that structure); make {base.split()[-1]} branch return what the others return."
                )

    def _base(self, fid) -> str:
        entry = self.fns[fid]
        return "a leaf" if entry["direction"] == "up" else _describe(next(iter(entry["sigs"])), self.kinds)

    def check_weak(self):
        """Refuses outputs whose dtype depends on whether the values read are Python scalars.

        The state buffers hold every node's output as an array of its base signature's
        dtype. Plain recursion passes a Python scalar returned at some signature (weakly
        typed: a leaf's ``return 0.5``) up as it is, and ``scalar * float16_array`` is
        float16 where ``float32_array * float16_array`` is float32: the nodes above would
        get another dtype than ``.batch`` gives them. Every signature is traced again
        with reads weakly typed where some signature returns a scalar; a dtype that moves
        is an error (also where no node reads such a scalar: the check does not follow
        which nodes read which).
        """
        where = {}  # function name -> the signatures where it returns a Python scalar
        for entry in self.fns:
            flags = [
                [s.weak_type for s in jax.tree.leaves(spec)] for spec in entry["sigs"].values()
            ]
            entry["weak"] = tuple(map(any, zip(*flags)))
            for sig, f in zip(entry["sigs"], flags):
                if any(f):
                    where.setdefault(entry["rec"]._name, []).append(_describe(sig, self.kinds))
        if not where:
            return
        names = " and ".join(where)
        bases = " and ".join(sorted({w for ws in where.values() for w in ws}))
        self.weak_reads = True
        try:
            for fid, entry in enumerate(self.fns):
                for sig, spec in entry["sigs"].items():
                    loose = self.trace(fid, sig)
                    if _same_spec(loose, spec):
                        continue
                    moved = next(
                        a.dtype for a, b in zip(jax.tree.leaves(loose), jax.tree.leaves(spec))
                        if a.dtype != b.dtype
                    )
                    raise TypeError(
                        f"{entry['rec']._name} returns {_show(loose)} at "
                        f"{_describe(sig, self.kinds)} when the outputs it reads are Python "
                        f"scalars ({names} returns one at {bases}: weakly typed) but "
                        f"{_show(spec)} when they are arrays, so plain recursion and .batch "
                        f"would disagree on its dtype. Give the scalar returned at {bases} a "
                        f"dtype, e.g. jnp.asarray(value, jnp.{moved})."
                    )
        finally:
            self.weak_reads = False

    def _internal(self, fid, prefix):
        """The internal nodes' templates: one ``"map"``, or one per arity (of one kind)."""
        meta, rec = self.meta, self.fns[fid]["rec"]
        sig = lambda base: prefix + (base,) if prefix else base
        try:
            return {sig("map"): self.trace(fid, sig("map"))}
        except _NeedsArity:
            if prefix:
                arities = [a for k, a in meta.kind_arities if k == prefix[1]]
            elif meta.arities is None:
                raise ValueError(
                    f"{rec._name} iterates, indexes or measures node.children, which "
                    f"specialises it per arity, but this forest has more than "
                    f"{MAX_SPECIALISED_ARITIES} distinct arities. Use "
                    "node.children.map(...) for variable-arity nodes."
                ) from None
            else:
                arities = meta.arities
            return {sig(k): self._trace_arity(fid, k, prefix) for k in arities}

    def _trace_arity(self, fid, k, prefix=()):
        rec = self.fns[fid]["rec"]
        try:
            return self.trace(fid, prefix + (k,) if prefix else k)
        except (TypeError, ValueError, IndexError) as e:
            if isinstance(e, _UsageError) or "branches on traced data" in str(e):
                raise
            node = self.meta.example_node[k]
            where = (
                f"node {node} of the forest has them"
                if node >= 0
                else "a forest padded together with this one has such a node"
            )
            kids = "1 child" if k == 1 else f"{k} children"
            raise ValueError(
                f"{rec._name} cannot handle a node with {kids} ({where}); "
                f"tracing it raised {type(e).__name__}: {str(e).rstrip('.')}. "
                "Handle this arity, or use node.children.map(...) for any "
                "number of children."
            ) from e


def _discover(rec, binding, meta, dyn_spec, data_spec) -> _Program:
    """Resolves a batched call of ``rec`` into a ``_Program`` (abstract traces only)."""
    top_down: set = set()
    while True:
        disc = _Discovery(meta, dyn_spec, data_spec, top_down)
        try:
            disc.register(rec, binding)
            i = 0
            while i < len(disc.fns):
                disc.analyse(i)
                i += 1
            disc.check_weak()
            break
        except _IsTopDown as e:
            # A function read node.parent in a signature after its leaf: it is top-down.
            if e.rec in top_down:
                raise
            e.rec._top_down = True
            top_down.add(e.rec)
    fns = tuple(
        _FnSpec(
            e["rec"], e["binding"], e["direction"], tuple(e["sigs"]),
            (jax.tree.structure(e["spec"]), tuple(_strong(s) for s in jax.tree.leaves(e["spec"]))),
        )
        for e in disc.fns
    )
    passes = _schedule(fns, disc.calls)
    uses_rows = disc.uses_rows or any(f.direction == "down" for f in fns)
    return _Program(fns, passes, 0, meta.key, uses_rows, meta.kinds)


def _schedule(fns, calls) -> tuple:
    """Orders the functions into passes: callees first, one direction per pass.

    Functions that call each other (a strongly connected component of the call graph)
    run in one pass, so they must share a direction. Within a pass, a function that
    reads another's output on the same node comes after it.
    """
    n = len(fns)
    callees = {i: set() for i in range(n)}
    same_node = {i: set() for i in range(n)}
    for a, b, rel in calls:
        callees[a].add(b)
        if rel == "self":
            same_node[a].add(b)
    comps = _strongly_connected(n, callees)  # callees' components first
    comp_of = {f: c for c, members in enumerate(comps) for f in members}
    passes: list = []
    for members in comps:
        directions = {fns[f].direction for f in members}
        if len(directions) > 1:
            names = ", ".join(fns[f].rec._name for f in sorted(members))
            raise TypeError(
                f"recursive functions {names} call each other but some run bottom-up "
                "(they call themselves on children) and some top-down (they read "
                "node.parent): no order of levels computes them together. Compute the "
                "bottom-up part first and let the top-down one call it on its node."
            )
        order = _same_node_order(members, same_node, comp_of, fns)
        direction = directions.pop()
        if passes and passes[-1][0] == direction:
            passes[-1] = (direction, passes[-1][1] + tuple(order))
        else:
            passes.append((direction, tuple(order)))
    return tuple(passes)


def _strongly_connected(n, edges) -> list[list[int]]:
    """Tarjan's algorithm (iterative); components come out callees first."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in range(n):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on_stack.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(sorted(edges[w]))))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
    return out


def _same_node_order(members, same_node, comp_of, fns) -> list[int]:
    """Members ordered so that a same-node callee comes before its caller."""
    members = set(members)
    order, state = [], {}
    for start in sorted(members):
        stack = [(start, iter(sorted(same_node[start] & members)))]
        if start in state:
            continue
        state[start] = "open"
        while stack:
            v, it = stack[-1]
            w = next(it, None)
            if w is None:
                stack.pop()
                state[v] = "done"
                order.append(v)
            elif state.get(w) == "open":
                raise TypeError(
                    f"recursive functions {fns[v].rec._name} and {fns[w].rec._name} are "
                    "functions that call each other on the same node, which recurses "
                    "forever; one of them must call the other on children (or the parent) "
                    "instead."
                )
            elif w not in state:
                state[w] = "open"
                stack.append((w, iter(sorted(same_node[w] & members))))
    return order


# ---------------------------------------------------------------------- frames


class _TraceFrame:
    """One template being traced: its function, signature, row context and resolver."""

    def __init__(self, rec, fid, signature, direction, dynamic, env, ctx, edges, program):
        self.rec = rec
        self.fid = fid
        self.signature = signature
        self.direction = direction
        self.dynamic = dynamic
        self.env = env
        self.ctx = ctx
        self.edges = edges
        self.program = program
        self.node = None
        self.rest = None
        self.empty_reduction = False


class _EagerContext:
    """One plain-Python evaluation: memoised outputs and each function's arguments."""

    def __init__(self):
        self.memo: dict = {}
        self.args: dict = {}
        self.running: set = set()

    def compute(self, rec, pos: Position, args, kwargs, node_pos, rest):
        if rec in self.args:
            _check_same_args(rec, self.args[rec], rest)
        else:
            self.args[rec] = rest
        key = (rec, id(pos) if rec._top_down else id(pos.tree))
        hit = self.memo.get(key)
        if hit is not None:
            return hit[1]
        if key in self.running:
            raise _UsageError(
                f"{rec._name} is called on a node where it is already being computed: "
                "functions that call each other on the same node, which recurses forever; "
                "one of them must call the other on children (or the parent) instead."
            )
        self.running.add(key)
        try:
            node = _EagerNode(pos, rec)
            frame = _EagerFrame(rec, node, self)  # one frame per node: empty reductions
            a, k = _replace(args, kwargs, node_pos, node)
            tree = pos.tree
            where = "a leaf" if tree.is_leaf else f"a node with {len(tree.children)} children"
            out = _call_user(frame, rec.fn, a, k, where)
        finally:
            self.running.discard(key)
        # Keep pos alive with the value: the key holds ids.
        self.memo[(rec, id(pos) if rec._top_down else id(pos.tree))] = (pos, out)
        return out


class _EagerFrame:
    def __init__(self, rec, node, context):
        self.rec = rec
        self.node = node
        self.context = context
        self.empty_reduction = False


def _self_call(rec):
    return TypeError(
        f"{rec._name} calls itself on its own node, which recurses forever; call it on the "
        "children (`for c in node.children` or `node.children.map`) or, top-down, on "
        "`node.parent`."
    )


def _check_binding(rec, expected: _Binding, got: _Binding):
    if expected.key != got.key:
        raise _UsageError(
            f"every call of {rec._name} in one batched program must pass the same non-node "
            "arguments (recjax computes it once per node); two calls differ."
        )


def _check_same_args(rec, expected, got):
    """Raises unless two calls bind the same non-node arguments (by position or keyword)."""
    e_leaves, e_tree = jax.tree.flatten(rec._bind(*expected))
    g_leaves, g_tree = jax.tree.flatten(rec._bind(*got))
    same = e_tree == g_tree and all(
        a is b or (not _is_array(a) and not _is_array(b) and a == b)
        for a, b in zip(e_leaves, g_leaves)
    )
    if not same:
        raise _UsageError(
            f"a recursive call of {rec._name} must pass the same non-node arguments as its "
            "caller (recjax computes every node once, with one set of arguments). To pass a "
            "value down the tree, such as f(params, child, depth + 1), write a top-down "
            "function that reads its parent's output: `def depth(node): return 0 if "
            "node.is_root else depth(node.parent) + 1`; to vary a value per node otherwise, "
            "store it in the node data or compute it from the children's outputs."
        )


# ---------------------------------------------------------------------- helpers


class _Prepared(NamedTuple):
    """A batched call resolved on the host: everything but the device work."""

    pos: int | str
    forest: Forest
    rest: tuple  # (args, kwargs) with the node replaced by None
    dynamic: list  # the traced (array) leaves of ``rest``
    program: _Program  # the executor's jit static argument

    @property
    def out_spec(self):
        return self.program.fns[self.program.result].spec


def _replace(args, kwargs, pos, value):
    if isinstance(pos, int):
        args = args[:pos] + (value,) + args[pos + 1 :]
    else:
        kwargs = {**kwargs, pos: value}
    return args, kwargs


def _is_down(signature) -> bool:
    """Top-down signatures are ``(is_root, is_leaf)`` pairs."""
    return isinstance(signature, tuple) and len(signature) == 2


def _is_kinded(signature) -> bool:
    return isinstance(signature, tuple) and len(signature) == 3


def _plain(signature):
    """A bottom-up signature without its kind: ``0``, ``"map"`` or an arity."""
    return signature[2] if _is_kinded(signature) else signature


def _describe(signature, kinds=None) -> str:
    """Where a signature applies, in words; ``kinds`` (the vocabulary) names the kind."""
    if _is_kinded(signature):
        name = repr(kinds[signature[1]]) if kinds and signature[1] < len(kinds) else signature[1]
        return f"{_describe(signature[2])} of kind {name}"
    if _is_down(signature):
        is_root, is_leaf = signature
        where = "a root" if is_root else "a non-root node"
        return where + {None: "", True: " that is a leaf", False: " with children"}[is_leaf]
    if signature == 0:
        return "a leaf"
    if signature == "map":
        return "an internal node"
    return "an internal node with 1 child" if signature == 1 else f"an internal node with {signature} children"


def _zeros_keeping_weak_type(s):
    if s.weak_type:  # what a Python scalar of this kind traces as
        return jax.lax.full(s.shape, np.zeros((), s.dtype).item())
    return jnp.zeros(s.shape, s.dtype)


def _strong(s):
    return jax.ShapeDtypeStruct(s.shape, s.dtype)


def _same_spec(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape and x.dtype == y.dtype
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _show(spec) -> str:
    return str(jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", spec))
