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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from . import _executor
from ._forest import MAX_SPECIALISED_ARITIES, Forest
from ._tree import Tree

_DATA_FLOW_ERRORS = (
    jax.errors.TracerBoolConversionError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


class _UsageError(TypeError):
    """A rule of recjax broken by the user's code: raised as is, never wrapped."""


class _NeedsArity(Exception):
    """Internal: the trace of a variable-arity node read the arity; retrace per arity."""


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
    except (_NeedsArity, _EmptyReductionError, _UsageError):
        raise
    except _DATA_FLOW_ERRORS as e:
        raise TypeError(
            f"{frame.rec._name} branches on traced data at {where}: {type(e).__name__}. "
            "Python `if`/`for` may only test structure such as `node.is_leaf` or "
            "`len(node.children)`; use `jnp.where` or `lax.cond` to branch on data."
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

    Inside the template the node axis is ``vmap``-ed away; ``fn`` runs once per edge.
    The reduction is a ``custom_vmap`` whose rule sees the whole batch of nodes: it
    gathers the node-level values ``fn`` closes over onto the edges, evaluates ``fn``
    vectorised over the edges and reduces per node with ``jax.ops.segment_*``.
    """

    def __init__(self, fn, edges: _executor.Edges, row):
        child_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), edges.outputs)
        # make_jaxpr exposes every value fn closes over (node-level tracers included)
        # as a constant, which we pass explicitly so the vmap rule can gather them.
        closed, out_shape = jax.make_jaxpr(
            lambda out: fn(_SymbolicChild(out)), return_shape=True
        )(child_spec)
        self._jaxpr = closed.jaxpr
        self._consts = list(closed.consts)
        self._out_tree = jax.tree.structure(out_shape)
        self._edges = edges
        self._row = row

    def _apply(self, outputs, consts):
        leaves = jax.tree.leaves(outputs)
        flat = jaxpr_as_fun(ClosedJaxpr(self._jaxpr, list(consts)))(*leaves)
        return jax.tree.unflatten(self._out_tree, flat)

    def _reduce(self, op, initial):
        edges = self._edges

        @custom_vmap
        def reduce_one(row, outputs, segment, consts):
            # Unbatched meaning (used only for shapes): one node owning every edge.
            values = jax.vmap(self._apply, in_axes=(0, None))(outputs, consts)
            return jax.tree.map(lambda v: _dense_reduce(op, v), values)

        @reduce_one.def_vmap
        def rule(axis_size, in_batched, row, outputs, segment, consts):
            consts_batched = in_batched[3]
            # Unused edge slots (segment == axis_size) borrow the last row's values;
            # the segment op drops them. Every row, padding included, owns >= 1 edge.
            owner = jnp.minimum(segment, axis_size - 1)
            edge_consts = [c[owner] if b else c for c, b in zip(consts, consts_batched)]
            axes = [0 if b else None for b in consts_batched]
            values = jax.vmap(self._apply, in_axes=(0, axes))(outputs, edge_consts)
            out = jax.tree.map(
                lambda v: _segment_reduce(op, v, segment, axis_size), values
            )
            return out, jax.tree.map(lambda _: True, out)

        reduced = reduce_one(self._row, edges.outputs, edges.segment, self._consts)
        return _combine(op, reduced, initial)


def _dense_reduce(op, v):
    return {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max, "min": jnp.min}[op](v, axis=0)


def _segment_reduce(op, v, segment, n):
    count = jax.ops.segment_sum(jnp.ones(segment.shape, v.dtype), segment, n)
    count = count.reshape(count.shape + (1,) * (v.ndim - 1))
    if op in ("sum", "mean"):
        s = jax.ops.segment_sum(v, segment, n, indices_are_sorted=True)
        return s if op == "sum" else s / jnp.maximum(count, 1)
    seg = jax.ops.segment_max if op == "max" else jax.ops.segment_min
    r = seg(v, segment, n, indices_are_sorted=True)
    # Every row owns at least one edge (see the planner); this guard only keeps an
    # empty segment at 0 rather than -inf should that ever change.
    return jnp.where(count > 0, r, jnp.zeros_like(r))


# ---------------------------------------------------------------------- nodes


class Children:
    """``node.children``: iterate, index or ``len()`` (specialises per arity), or ``map``.

    Iterating, indexing or taking ``len()`` makes the trace specialise per arity: the
    function is traced once for every arity found in the forest (right for N-ary cells
    with a weight per child position). ``map(fn)`` instead calls ``fn(child)`` on a
    symbolic child and returns a ``Ragged`` value: one template for every arity,
    executed with segment ops (right for child-sum cells over nodes with many children).
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

        ``fn`` may call the recursive function on the child and compute on its output,
        closing over node-level values.
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
    """A child inside a template: passing it to the recursive function returns ``output``."""

    def __init__(self, output):
        self.output = output

    def __getattr__(self, name):
        raise AttributeError(
            f"a child node inside a @recursive function supports only the recursive call "
            f"(f(..., child, ...)); `child.{name}` is not available. Read data on the "
            "child's own call instead (its `node.data`)."
        )


class _Node:
    """The node a @recursive function receives: ``data``, ``is_leaf``, ``children``."""

    def __init__(self, data, is_leaf: bool, children: Children):
        self.data = data
        self.is_leaf = is_leaf
        self.children = children


class _EagerNode(_Node):
    def __init__(self, tree: Tree):
        data = jax.tree.map(
            lambda x: jnp.asarray(np.asarray(x), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)),
            tree.data,
        )
        super().__init__(data, tree.is_leaf, Children([_EagerChild(c) for c in tree.children]))


class _EagerChild:
    def __init__(self, tree: Tree):
        self.tree = tree


# ---------------------------------------------------------------------- the decorator


def recursive(fn: Callable) -> Recursive:
    """Makes ``fn`` a recursive function over trees that recjax can batch and compile.

    ``fn`` takes exactly one node argument among its arguments. Called with a concrete
    ``Tree`` it is plain Python recursion (the reference meaning); ``fn.batch`` takes
    the same arguments with a ``Forest`` in place of the node and returns ``fn``'s
    output for every node, stacked on a leading node axis, in one compiled program.

    Inside ``fn``: ``node.data`` (the node's data, arrays), ``node.is_leaf`` (a Python
    bool), ``node.children`` (see ``Children``). Python ``if``/``for`` may test
    structure only; branch on data with ``jnp.where`` or ``lax.cond``. A recursive call
    must pass the same non-node arguments as its caller.

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
    """
    return Recursive(fn)


class Recursive:
    """A ``@recursive`` function: call it on a ``Tree``, or ``.batch`` it over a ``Forest``."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        try:
            self._signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some callables have no signature
            self._signature = None
        self._signature_cache: dict = {}
        self._num_traces = 0  # executor traces, for recompilation tests
        self._jit_execute = jax.jit(self._execute, static_argnums=0)

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
            (Tree, _EagerChild, _SymbolicChild, _Node, Forest),
            "pass exactly one node: an rj.Tree (or a child node inside the function).",
        )
        if isinstance(node, Forest):
            raise TypeError(
                f"{self._name}(...) got a Forest; use {self._name}.batch(...) to run over a "
                "Forest, or call it on one rj.Tree."
            )
        if isinstance(node, _Node):
            raise TypeError(
                f"{self._name} calls itself on its own node, which recurses forever; call it "
                "on the children (`for c in node.children` or `node.children.map`)."
            )
        rest = _replace(args, kwargs, pos, None)
        if isinstance(node, Tree):
            return _EagerFrame(self, rest).compute(node, args, kwargs, pos)
        frame = _frames.stack[-1] if _frames.stack else None
        if frame is None or frame.rec is not self:
            raise _UsageError(
                f"{self._name} was called on a child node of another @recursive function; "
                "mutual recursion between recursive functions is not supported yet."
            )
        frame.check_args(rest)
        if isinstance(node, _SymbolicChild):
            return node.output
        return frame.compute(node.tree, args, kwargs, pos)

    # ------------------------------------------------------------------ batch

    def batch(self, *args, **kwargs):
        """Runs the function over every node of a Forest in one compiled program.

        Equivalent to ``[fn(*args_with_tree_i) for every node i of the forest]`` stacked
        leaf-wise on a new leading axis, where ``args_with_tree_i`` has node ``i``'s
        subtree in place of the Forest: the output for node ``i`` is row ``i``.
        Differentiable with ``jax.grad``, and works under ``jax.jit``, ``jax.jvp`` and
        ``jax.vmap``. Array arguments are traced; other arguments are static.

        Raises:
          TypeError: no Forest among the arguments (for example a Tree), control flow
            on traced data, or outputs whose structure differs between node kinds.
          ValueError: a node whose arity the function cannot handle.

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
        out = self._jit_execute(prepared.static, prepared.dynamic, prepared.forest._arrays)
        return jax.tree.map(lambda o: o[: prepared.forest.num_nodes], out)

    def _prepare(self, args, kwargs) -> _Prepared:
        """What ``batch`` computes on the host before it executes (also used by ``debug``)."""
        pos, forest = self._find_node(
            args,
            kwargs,
            (Forest, Tree),
            "pass exactly one rj.Forest (build one with rj.Forest.from_trees([...])).",
        )
        if isinstance(forest, Tree):
            raise TypeError(
                f"{self._name}.batch(...) takes a Forest, not a Tree; use "
                f"rj.Forest.from_trees([tree]), or call {self._name}(...) on the Tree."
            )
        rest = _replace(args, kwargs, pos, None)
        leaves, treedef = jax.tree.flatten(rest)
        dynamic = [x for x in leaves if _is_array(x)]
        static_leaves = tuple(None if _is_array(x) else x for x in leaves)
        try:
            hash(static_leaves)
        except TypeError:
            raise TypeError(
                f"{self._name}.batch: non-array arguments must be hashable (they are "
                "compile-time constants); pass arrays for values that change."
            ) from None
        meta = forest._meta
        data_spec = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), forest._arrays["data"]
        )
        dyn_spec = tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in dynamic)
        # The executor depends on the plan's bucketed sizes and the arities, never on the
        # exact node count, so batches in one bucket share its compiled program.
        static = _Static(pos, treedef, static_leaves, (meta.key, meta.arities), None, None)
        mode, out_spec = self._signatures(static, meta, dyn_spec, data_spec)
        flat_spec = (jax.tree.structure(out_spec), tuple(jax.tree.leaves(out_spec)))  # hashable
        static = static._replace(mode=mode, out_spec=flat_spec)
        return _Prepared(pos, forest, rest, dynamic, static, out_spec)

    # ------------------------------------------------------------------ templates

    def _rebuild(self, static, dynamic, node):
        it = iter(dynamic)
        leaves = [next(it) if s is None else s for s in static.static_leaves]
        args, kwargs = jax.tree.unflatten(static.treedef, leaves)
        return _replace(args, kwargs, static.pos, node), (args, kwargs)

    def _template(self, static, signature):
        """The pure function ``(dynamic, data, children) -> output`` of one signature.

        ``signature`` is ``0`` (a leaf: ``children`` unused), ``k > 0`` (``children`` is
        a tuple of k output pytrees) or ``"map"`` (``children`` is ``(edges, row)``).
        """

        def template(dynamic, data, children):
            if signature == 0:
                kids = Children([])
            elif signature == "map":
                kids = _RaggedChildren(*children)
            else:
                kids = Children([_SymbolicChild(c) for c in children])
            node = _Node(data, signature == 0, kids)
            (args, kwargs), rest = self._rebuild(static, dynamic, node)
            frame = _TraceFrame(self, rest, signature)
            out = _call_user(frame, self.fn, args, kwargs, _describe(signature))
            for leaf in jax.tree.leaves(out):
                if not (_is_array(leaf) or isinstance(leaf, (bool, int, float, complex))):
                    raise _UsageError(
                        f"{self._name} must return a pytree of arrays; at "
                        f"{_describe(signature)} it returned a leaf {leaf!r} of type "
                        f"{type(leaf).__name__}. Return jnp arrays (or Python numbers)."
                    )
            return out

        return template

    def _signatures(self, static, meta, dyn_spec, data_spec):
        """Traces the signatures abstractly: which templates run, and the output structure."""
        has_internal = bool(meta.example_node)
        cache_key = (static, has_internal, dyn_spec, jax.tree.structure(data_spec), tuple(jax.tree.leaves(data_spec)))
        hit = self._signature_cache.get(cache_key)
        if hit is not None:
            return hit
        one = lambda s: jax.ShapeDtypeStruct((1,) + s.shape, s.dtype)  # noqa: E731
        data1 = jax.tree.map(one, data_spec)

        def shape_of(signature, children_spec):
            template = self._template(static, signature)
            run = lambda d, x, c: _executor.apply_template(template, signature, d, x, c, 1)  # noqa: E731
            out = jax.eval_shape(run, list(dyn_spec), data1, children_spec)
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), out)

        out_spec = shape_of(0, None)
        if not meta.example_node:  # every node is a leaf
            mode = ()
        else:
            edges = _executor.Edges(jax.tree.map(one, out_spec), jax.ShapeDtypeStruct((1,), jnp.int32))
            try:
                mode = "map"
                got = {"map": shape_of("map", edges)}
            except _NeedsArity:
                if meta.arities is None:
                    raise ValueError(
                        f"{self._name} iterates, indexes or measures node.children, which "
                        f"specialises it per arity, but this forest has more than "
                        f"{MAX_SPECIALISED_ARITIES} distinct arities. Use "
                        "node.children.map(...) for variable-arity nodes."
                    ) from None
                mode = meta.arities
                got = {}
                for k in mode:
                    try:
                        got[k] = shape_of(k, tuple(jax.tree.map(one, out_spec) for _ in range(k)))
                    except (TypeError, ValueError, IndexError) as e:
                        if isinstance(e, _UsageError) or "branches on traced data" in str(e):
                            raise
                        node = meta.example_node[k]
                        where = (
                            f"node {node} of the forest has them"
                            if node >= 0
                            else "a forest padded together with this one has such a node"
                        )
                        kids = "1 child" if k == 1 else f"{k} children"
                        raise ValueError(
                            f"{self._name} cannot handle a node with {kids} ({where}); "
                            f"tracing it raised {type(e).__name__}: {str(e).rstrip('.')}. "
                            "Handle this arity, or use node.children.map(...) for any "
                            "number of children."
                        ) from e
            for sig, spec in got.items():
                if not _same_spec(spec, out_spec):
                    raise TypeError(
                        f"{self._name} returns {_show(spec)} at {_describe(sig)} but "
                        f"{_show(out_spec)} at a leaf. Every node must return the same "
                        "structure, shapes and dtypes (the children's outputs have the leaf's "
                        "structure); make the leaf branch return what internal nodes return."
                    )
        result = (mode, out_spec)
        self._signature_cache[cache_key] = result
        return result

    def _execute(self, static, dynamic, arrays):
        self._num_traces += 1
        templates = {0: self._template(static, 0)}
        if static.mode == "map":
            templates["map"] = self._template(static, "map")
        else:
            for k in static.mode:
                templates[k] = self._template(static, k)
        out_spec = jax.tree.unflatten(*static.out_spec)
        plan_key, _ = static.meta
        return _executor.execute(templates, dynamic, arrays, plan_key, out_spec)


# ---------------------------------------------------------------------- frames


class _TraceFrame:
    def __init__(self, rec, rest, signature):
        self.rec = rec
        self.rest = rest
        self.signature = signature
        self.empty_reduction = False

    def check_args(self, rest):
        _check_same_args(self.rec, self.rest, rest)


class _EagerFrame(_TraceFrame):
    def __init__(self, rec, rest, memo=None):
        super().__init__(rec, rest, None)
        self.memo: dict[int, Any] = {} if memo is None else memo

    def compute(self, tree, args, kwargs, pos):
        key = id(tree)
        if key not in self.memo:
            a, k = _replace(args, kwargs, pos, _EagerNode(tree))
            # One frame per node, sharing the memo, so empty reductions are tracked per node.
            frame = _EagerFrame(self.rec, self.rest, self.memo)
            where = "a leaf" if tree.is_leaf else f"a node with {len(tree.children)} children"
            self.memo[key] = _call_user(frame, self.rec.fn, a, k, where)
        return self.memo[key]


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
            "caller (recjax computes every node once, with one set of arguments). To vary a "
            "value per node, store it in the node data, or compute it from the children's "
            "outputs."
        )


# ---------------------------------------------------------------------- helpers


class _Static(NamedTuple):
    """Hashable static description of a batched call (the executor's jit static argument)."""

    pos: int | str  # where the node argument sits: a position or a keyword
    treedef: Any  # structure of the non-node arguments
    static_leaves: tuple  # non-array leaves (None where an array is traced)
    meta: tuple  # (plan key, arities): the bucket, never the exact node count
    mode: Any  # "map" or the tuple of arities traced separately
    out_spec: Any  # (treedef, leaf ShapeDtypeStructs) of one node's output


class _Prepared(NamedTuple):
    """A batched call resolved on the host: everything but the device work."""

    pos: int | str
    forest: Forest
    rest: tuple  # (args, kwargs) with the node replaced by None
    dynamic: list  # the traced (array) leaves of ``rest``
    static: _Static  # the executor's jit static argument, signatures resolved
    out_spec: Any  # one node's output structure (ShapeDtypeStructs)


def _replace(args, kwargs, pos, value):
    if isinstance(pos, int):
        args = args[:pos] + (value,) + args[pos + 1 :]
    else:
        kwargs = {**kwargs, pos: value}
    return args, kwargs


def _describe(signature) -> str:
    if signature == 0:
        return "a leaf"
    if signature == "map":
        return "an internal node"
    return f"an internal node with {signature} children"


def _same_spec(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape and x.dtype == y.dtype
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _show(spec) -> str:
    return str(jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", spec))
