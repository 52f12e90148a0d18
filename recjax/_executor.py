"""Execute: run the templates over a plan in one program, bottom-up or top-down.

A program is a list of passes. A pass computes one or more functions at every node,
either bottom-up (leaves in one batched op, run in blocks of ``LEAF_BLOCK`` rows, then a
``lax.scan`` per phase) or top-down (roots in one batched op, the phases' scans in
reverse, then the leaves). Each function owns a buffer of ``PlanKey.num_buffer_rows``
rows laid out as the plan says; templates read any buffer (their own children's or
parent's rows, another function's rows) through ``env``, a dict from function id to
buffer, and every row of a buffer is written once.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._planner import PlanKey

#: Rows per block of the leaves' batched op (see ``_in_blocks``).
LEAF_BLOCK = 2048


class Edges(NamedTuple):
    """The child slots of one step, for ``children.map``: ``[E]`` arrays, not per row."""

    rows: jax.Array  # int32, the buffer row of the child on each slot
    segment: jax.Array  # int32, the row (0..K-1) owning each slot; K for unused slots
    position: jax.Array  # int32, the child's index among its parent's children


class PassFn(NamedTuple):
    """One function of a pass: its id, templates by signature, and output structure.

    Bottom-up signatures: ``0`` (leaf), ``"map"`` (any arity) or ``k`` (k children), or
    ``("kind", kind id, one of those)`` for a function specialised per node kind.
    Top-down signatures: ``(is_root, is_leaf)`` with ``is_leaf`` ``None`` when the
    function does not read it.
    """

    fid: int
    templates: dict
    out_spec: Any


class RowTables(NamedTuple):
    """Per-buffer-row facts a template may read through its ``ctx``: ``[num_buffer_rows]``."""

    node: jax.Array  # node whose data the row reads
    parent: jax.Array  # the parent's row; a root's own row; padding: its real row's
    index: jax.Array  # position among the parent's children (0 for roots)
    source: jax.Array  # the row whose inputs a top-down pass's non-root template reads


def apply_template(template, dynamic, env, data, ctx, edges=None):
    """Evaluates a template on a batch of rows: ``data`` and ``ctx`` have a row axis.

    ``ctx`` always holds the rows' own buffer ``row`` (so this works for forests
    without data); ``dynamic``, ``env`` and ``edges`` are shared by every row.
    """
    return jax.vmap(lambda d, c: template(dynamic, env, d, c, edges))(data, ctx)


def varying_like(tree, anchor):
    """``tree``'s float leaves typed as varying over the manual mesh axes ``anchor`` varies
    over (inside ``shard_map``), by adding a zero; elsewhere ``tree`` unchanged.

    Inside ``shard_map``, a replicated parameter that meets per-device data becomes
    per-device (an implicit ``pvary``) where they meet, and the transpose of that is a
    ``psum`` across devices. Where they meet inside a ``lax.cond`` or ``lax.switch``
    whose branch differs between devices (a step's arity or kind), the ``psum`` would
    run on some devices only and hang. Meeting once here, before any branch, puts it in
    straight-line code that every device runs.
    """
    axes = _varying_axes(anchor)
    if not axes:
        return tree

    def vary(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact) or axes <= _varying_axes(x):
            return x
        return x + jnp.zeros_like(anchor, shape=jnp.shape(x), dtype=jnp.result_type(x))

    return jax.tree.map(vary, tree)


def _buffer(arrays, key: PlanKey, s):
    """A zero state buffer for output leaf ``s``, per-device where the forest is (inside
    ``shard_map``; its rows become per-device as the level loop writes them)."""
    return jnp.zeros_like(arrays["node_mask"], shape=(key.num_buffer_rows,) + s.shape, dtype=s.dtype)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; older versions: ``vma``
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def row_tables(arrays: dict, key: PlanKey) -> RowTables:
    """Each row's node, parent row and child index, from the plan's edge tables (in jax).

    Only top-down passes and ``node.index`` need these; a forest whose nodes have several
    parents is rejected before (a row would have several parents).
    """
    num_rows = key.num_buffer_rows
    node = jnp.concatenate(
        [arrays["leaf_node"]] + [t["node"].reshape(-1) for t in arrays["phases"]]
    )
    # Roots: their own row; other rows get theirs from the edges below (padding rows
    # then take the parent and index of the real row they copy).
    parent = arrays["row_of_node"][arrays["roots"][arrays["tree_of"][node]]]
    index = jnp.zeros(num_rows, jnp.int32)
    base = key.num_leaf_rows
    for phase, t in zip(key.phases, arrays["phases"]):
        steps = jnp.arange(phase.steps, dtype=jnp.int32)[:, None]
        seg = t["edge_segment"]
        owner = jnp.minimum(seg, phase.width - 1)
        # A slot is real when its row is its node's row (padding rows copy a real row's
        # node and children: their slots must not claim the children).
        own_row = base + steps * phase.width + owner
        owner_node = jnp.take_along_axis(t["node"], owner, 1)
        real = (seg < phase.width) & (arrays["row_of_node"][owner_node] == own_row)
        child = jnp.where(real, t["edge_child"], num_rows)  # out of range: dropped
        position = edge_positions(t, phase.edges)
        parent = parent.at[child].set(base + steps * phase.width + owner, mode="drop")
        index = index.at[child].set(position, mode="drop")
        base += phase.steps * phase.width
    # A padding row copies a real row (its node's): that row's parent and index too.
    donor = arrays["row_of_node"][node]
    parent, index = parent[donor], index[donor]
    return RowTables(node, parent, index, _sources(parent, donor, key))


def _sources(parent, donor, key: PlanKey):
    """Where a top-down pass's non-root template reads its inputs, row by row.

    That template runs on every row of a step (and on all leaf rows), roots and padding
    included, whose results are then dropped; but a ``0 * inf`` in their backward would
    still be NaN. So a root or padding row reads the inputs (data, parent, index, row)
    of a real non-root row: one of its own step when there is one (its parent is a
    later step, done before), else a child of a root (roots are in the buffer from the
    start), for leaf rows any non-root leaf; a real non-root row reads its own.
    """
    rows = jnp.arange(key.num_buffer_rows, dtype=jnp.int32)
    fit = (donor == rows) & (parent != rows)  # real (holds its node) and not a root
    is_root_row = (donor == rows) & (parent == rows)
    first_fit = lambda mask, where: jnp.where(mask.any(), where[jnp.argmax(mask)], -1)
    inner = rows >= key.num_leaf_rows
    any_child_of_root = first_fit(fit & inner & is_root_row[parent], rows)
    any_leaf = first_fit(fit & ~inner, rows)
    source = jnp.where(fit, rows, jnp.where(inner, any_child_of_root, any_leaf))
    base = key.num_leaf_rows
    for phase in key.phases:
        size = phase.steps * phase.width
        block = lambda a: lax.dynamic_slice_in_dim(a, base, size).reshape(phase.steps, phase.width)
        ok = block(fit)  # [steps, width]
        own = base + jnp.arange(phase.steps, dtype=jnp.int32) * phase.width + jnp.argmax(ok, 1)
        step_donor = jnp.where(ok.any(1)[:, None], own[:, None], block(source))
        replaced = jnp.where(ok, block(rows), step_donor)
        source = lax.dynamic_update_slice_in_dim(source, replaced.reshape(-1), base, 0)
        base += size
    return jnp.where(source >= 0, source, rows)  # no donor anywhere: the row itself


def edge_positions(tables: dict, num_edges: int) -> jax.Array:
    """``[S, E]`` index of each edge slot's child among its row's children: the slot's
    distance from its row's first slot (segment ids ascend; a padding row's
    ``edge_start`` points at the slots of the node it copies, not at its own)."""
    seg = tables["edge_segment"]
    first = jax.vmap(lambda s: jnp.searchsorted(s, s, side="left"))(seg).astype(jnp.int32)
    return jnp.arange(num_edges, dtype=jnp.int32)[None, :] - first


def run_up(fns: list[PassFn], dynamic, env: dict, arrays: dict, key: PlanKey, rows: RowTables | None):
    """Computes a bottom-up pass; returns ``{fid: buffer}`` for the pass's functions.

    Equivalent program::

      for f in fns: buffer_f[leaf rows] = vmap(f.templates[0])(data[leaf nodes])
      for each phase, for each step t (a lax.scan):
        for f in fns (in order, so f may read g's rows of this step when g comes first):
          buffer_f[rows of t] = vmap(f's template)(data[nodes of t], children's rows)
    """
    data = arrays["data"]
    take = lambda tree, idx: jax.tree.map(lambda a: a[idx], tree)
    state = {
        f.fid: jax.tree.map(lambda s: _buffer(arrays, key, s), f.out_spec)
        for f in fns
    }

    def leaves(template, fid):
        def compute(state, first, size):
            leaf_rows = first + jnp.arange(size, dtype=jnp.int32)
            leaf_data = take(data, arrays["leaf_node"][leaf_rows])
            ctx = _ctx(leaf_rows, rows)
            out = apply_template(template, dynamic, {**env, **state}, leaf_data, ctx)
            return {**state, fid: _write_all(state[fid], out, first)}

        return compute

    for f in fns:
        if 0 in f.templates:
            state = _in_blocks(leaves(f.templates[0], f.fid), state, 0, key.num_leaf_rows)
            continue
        # Specialised per kind: the leaf rows are one block per kind (static slices).
        start = 0
        for kind, size in key.leaf_blocks:
            state = _in_blocks(leaves(f.templates[("kind", kind, 0)], f.fid), state, start, size)
            start += size

    base = key.num_leaf_rows
    for phase, tables in zip(key.phases, arrays["phases"]):
        xs = (
            take(data, tables["node"]),  # [S, K, ...], gathered once, outside the loop
            tables["degree"],
            tables["edge_start"],
            tables["edge_child"],
            tables["edge_segment"],
            edge_positions(tables, phase.edges),
            tables["step_kind"],
            jnp.arange(phase.steps, dtype=jnp.int32),
        )

        def step(state, x, base=base, width=phase.width):
            data_t, degree, start, edge_child, segment, position, kind_t, t = x
            first = base + t * width
            own = first + jnp.arange(width, dtype=jnp.int32)
            edges = Edges(edge_child, segment, position)
            for f in fns:
                ctx = _ctx(own, rows)
                if any(isinstance(s, tuple) and s[0] == "kind" and s[2] != 0 for s in f.templates):
                    # Every row of a step has one kind (see the planner): run that kind's
                    # templates only, under a switch. The rows a template may read (its
                    # children's and its own) are gathered first, outside the switch, and
                    # the templates read them by local index: the switch's transpose then
                    # returns cotangents for these rows, not for whole buffers.
                    num_edges = edge_child.shape[0]
                    local = jnp.concatenate([edge_child, own])
                    local_env = {
                        i: jax.tree.map(lambda b: b[local], buf) for i, buf in {**env, **state}.items()
                    }
                    ctx = {**ctx, "row": num_edges + jnp.arange(width, dtype=jnp.int32)}
                    local_edges = Edges(jnp.arange(num_edges, dtype=jnp.int32), segment, position)
                    branches = [
                        functools.partial(_compute_up, _kind_templates(f.templates, k))
                        for k in key.kinds
                    ]
                    out = _switch(
                        kind_t, branches, (dynamic, local_env, data_t, ctx, degree, start, local_edges), kind_t
                    )
                else:
                    out = _compute_up(
                        f.templates, dynamic, {**env, **state}, data_t, ctx, degree, start, edges
                    )
                state = {**state, f.fid: _write_all(state[f.fid], out, first)}
            return state, None

        state, _ = lax.scan(step, state, xs)
        base += phase.steps * phase.width
    return state


def run_down(fns: list[PassFn], dynamic, env: dict, arrays: dict, key: PlanKey, rows: RowTables):
    """Computes a top-down pass; returns ``{fid: buffer}`` for the pass's functions.

    Equivalent program::

      for f in fns: root_f[root rows] = vmap(f's root template)(data[roots])
      for each phase in reverse, for each step t in reverse (a lax.scan):
        for f in fns:
          out = vmap(f's inner template)(data[nodes of t], parents' rows)
          buffer_f[rows of t] = where(row is a root, root_f[rows of t], out)
      for f in fns: the same on the leaf rows (one batched op)

    Roots live in a separate buffer so that every row of ``buffer_f`` is written once.
    """
    data = arrays["data"]
    take = lambda tree, idx: jax.tree.map(lambda a: a[idx], tree)
    zeros = lambda f: jax.tree.map(
        lambda s: _buffer(arrays, key, s), f.out_spec
    )
    num_leaf_rows = key.num_leaf_rows

    # Roots: one batched op. A root reads its own row for "the parent" (never used).
    root_rows = arrays["row_of_node"][arrays["roots"]]
    ctx = _ctx(root_rows, rows)
    root_data = take(data, arrays["roots"])
    is_leaf = root_rows < num_leaf_rows
    # Padding root slots write nowhere (a duplicate row would double its gradient).
    write_rows = jnp.where(arrays["root_mask"], root_rows, key.num_buffer_rows)
    roots = {}
    for f in fns:
        out = _select_leaf(f, (True,), dynamic, {**env, **roots}, root_data, ctx, is_leaf)
        roots[f.fid] = jax.tree.map(
            lambda z, o: z.at[write_rows].set(o.astype(z.dtype), mode="drop"), zeros(f), out
        )

    def compute(state, rows_t, data_t, leaf):
        # Roots and padding rows read a real non-root row's inputs (``RowTables.source``).
        ctx = _ctx(rows.source[rows_t], rows)
        is_root = rows.parent[rows_t] == rows_t
        for f in fns:
            o = _select_leaf(f, (False,), dynamic, {**env, **state}, data_t, ctx, leaf)
            # The roots' rows hold their values from the start, without a tangent (see
            # below); written again here with it, so that each row's tangent is added
            # once, at the root's step, before any real row reads it.
            kept = jax.tree.map(lambda r: r[rows_t], roots[f.fid])
            o = jax.tree.map(lambda a, b: jnp.where(_rows_mask(is_root, a), b, a.astype(b.dtype)), o, kept)
            state = {**state, f.fid: _write_all(state[f.fid], o, rows_t[0])}
        return state

    # Every root's row holds its value from the start: a row that reads a real non-root
    # row's inputs (``_sources``) may read a root parent whose step comes later. Those
    # rows' results are dropped, so the value carries no tangent: the root's own step
    # writes it again with its tangent (``_write_rows`` adds tangents, so a tangent both
    # here and there would count twice, at every order of differentiation).
    state = jax.tree.map(lax.stop_gradient, roots)
    source_node = rows.node[rows.source]
    base = key.num_buffer_rows
    for phase, tables in reversed(list(zip(key.phases, arrays["phases"]))):
        base -= phase.steps * phase.width
        nodes = lax.dynamic_slice_in_dim(source_node, base, phase.steps * phase.width)
        xs = (take(data, nodes.reshape(phase.steps, phase.width)), jnp.arange(phase.steps, dtype=jnp.int32))

        def step(state, x, base=base, width=phase.width):
            data_t, t = x
            rows_t = base + t * width + jnp.arange(width, dtype=jnp.int32)
            return compute(state, rows_t, data_t, False), None

        state, _ = lax.scan(step, state, xs, reverse=True)

    def leaves(state, first, size):
        leaf_rows = first + jnp.arange(size, dtype=jnp.int32)
        leaf_data = take(data, source_node[leaf_rows])
        return compute(state, leaf_rows, leaf_data, True)

    return _in_blocks(leaves, state, 0, num_leaf_rows)


def _in_blocks(compute, state, start: int, size: int):
    """``compute(state, first, n)`` over the rows ``start..start + size - 1``, in blocks.

    The leaves are one batched op in meaning, but a batch-256 forest has tens of
    thousands of leaf rows, and one op over all of them writes its temporaries (a
    Tree-LSTM leaf's gates: 3 KB a row) to memory and reads them back: on the CPU a
    ``[32768, 256] @ [256, 768]`` product runs at ~70 GFLOP/s and ``[4096, 256] @ [256,
    768]`` at ~110-140. So the rows go in blocks of ``LEAF_BLOCK`` (``n`` rows from row
    ``first``; each block's temporaries stay in cache): the first block, a
    ``lax.scan`` over the middle ones, then the rest. The first block is written at a
    constant row, so XLA fuses that write with the creation of the zero-filled buffers
    (into one ``pad``); a write at a traced row leaves the zeros a separate pass, one
    buffer for all functions, copied once per buffer.

    Up to two blocks' worth of rows run as one op instead: every unrolled block's
    backward makes its own zero-filled cotangent for each table the leaves gather from
    (an embedding) and adds them, and one op of at most ``2 * LEAF_BLOCK`` rows still
    runs at the blocks' speed. (A TreeFC training step over 32 trees of 255 nodes, 4,096
    leaf rows: 32.7 -> 31.2 MiB of temporaries, under glibc's 32 MiB ``mmap``
    threshold, 1.33x faster with glibc's allocator; benchmarks/RESULTS.md.)
    """
    if size <= 2 * LEAF_BLOCK:
        return compute(state, start, size) if size else state
    full, rest = divmod(size, LEAF_BLOCK)  # full >= 2
    state = compute(state, start, LEAF_BLOCK)
    if full > 2:

        def step(state, i):
            return compute(state, start + i * LEAF_BLOCK, LEAF_BLOCK), None

        state, _ = lax.scan(step, state, jnp.arange(1, full, dtype=jnp.int32))
    else:
        state = compute(state, start + LEAF_BLOCK, LEAF_BLOCK)
    if rest:
        state = compute(state, start + full * LEAF_BLOCK, rest)
    return state


def _ctx(own, rows: RowTables | None) -> dict:
    """The per-row context templates receive: own row, and parent/index when planned."""
    ctx = {"row": own}
    if rows is not None:
        ctx["parent"] = rows.parent[own]
        ctx["index"] = rows.index[own]
    return ctx


def _rows_mask(mask, a):
    return mask.reshape(mask.shape + (1,) * (a.ndim - 1))


def _select_leaf(f: PassFn, prefix: tuple, dynamic, env, data, ctx, is_leaf):
    """A top-down function's output: one template, or two selected by ``is_leaf`` (a
    Python bool when every row is a leaf, or none is: then one template runs)."""
    if prefix + (None,) in f.templates:
        return apply_template(f.templates[prefix + (None,)], dynamic, env, data, ctx)
    if isinstance(is_leaf, bool):
        return apply_template(f.templates[prefix + (is_leaf,)], dynamic, env, data, ctx)
    run = lambda leaf: lambda data, ctx: apply_template(f.templates[prefix + (leaf,)], dynamic, env, data, ctx)
    leaf = _on_own_rows(is_leaf, run(True), data, ctx)
    inner = _on_own_rows(~is_leaf, run(False), data, ctx)
    return jax.tree.map(lambda a, b: jnp.where(_rows_mask(is_leaf, a), a, b), leaf, inner)


def _on_own_rows(mine, fn, data, ctx):
    """``fn(data, ctx)`` for the rows where ``mine`` holds; the others' results are dropped.

    The other rows read the first ``mine`` row's inputs, so ``fn`` only ever sees a real
    node of its kind (a leaf template never sees an internal node's data, a binary cell
    never a unary node's missing child): a dropped row's zero cotangent times an
    infinite derivative there (``log(0)``, ``sqrt(0)``) would make the gradient NaN.
    With no ``mine`` row, ``fn`` is skipped (``lax.cond``) and the rows are zeros.
    """
    src = jnp.where(mine, jnp.arange(mine.shape[0], dtype=jnp.int32), jnp.argmax(mine).astype(jnp.int32))
    take = lambda tree: jax.tree.map(lambda a: a[src], tree)
    spec = jax.eval_shape(fn, data, ctx)  # zeros_like keeps its type (shard_map's axes too)
    skip = lambda data, ctx: jax.tree.map(jnp.zeros_like, spec)
    return _switch(jnp.any(mine).astype(jnp.int32), [skip, fn], (take(data), take(ctx)), mine)


def _switch(index, branches, operands, anchor):
    """``lax.switch(index, branches, *operands)``, whose branch may differ between the
    devices of ``shard_map`` (``anchor`` varies over its axes there). The arguments are
    already per-device (``varying_like``); a replicated float array that a branch closes
    over is refused, since its gradient's ``psum`` would run inside the branch."""
    axes = _varying_axes(anchor)
    for branch in branches if axes else ():
        for c in jax.closure_convert(branch, *operands)[1]:
            if jnp.issubdtype(c.dtype, jnp.inexact) and not axes <= _varying_axes(c):
                raise TypeError(
                    f"a @rj.recursive function closes over a traced {c.dtype}{list(c.shape)} "
                    "array that is the same on every device of shard_map (a parameter it "
                    "reads without taking it as an argument). Its gradient would be summed "
                    "across devices inside a branch that only some devices take, and they "
                    "would wait for each other forever. Pass the array to the function as an "
                    "argument (f(params, node)); recjax makes arguments per-device before "
                    "its level loop."
                )
    return lax.switch(index, branches, *operands)


def _write_all(buffer, rows, first):
    return jax.tree.map(lambda b, o: _write_rows(b, o.astype(b.dtype), first), buffer, rows)


@jax.custom_jvp
def _write_rows(buffer, rows, first):
    """``buffer[first:first + len(rows)] = rows``: a contiguous, in-place write.

    The plan writes every row exactly once, into rows that still hold the buffer's
    initial zeros, so the write equals an add, and so does its tangent. The custom JVP
    states the tangent as that add: its transpose (reverse mode) passes the cotangent
    buffer through and gathers the rows' cotangents. The transpose of the plain write
    would also zero those rows, and XLA:CPU then copies the whole cotangent buffer at
    every backward step, because it cannot order the rows' read before their zeroing.
    """
    return lax.dynamic_update_slice_in_dim(buffer, rows, first, 0)


@_write_rows.defjvp
def _write_rows_jvp(primals, tangents):
    buffer, rows, first = primals
    t_buffer, t_rows, _ = tangents
    index = first + jnp.arange(rows.shape[0], dtype=jnp.int32)
    t_out = t_buffer.at[index].add(t_rows, indices_are_sorted=True, unique_indices=True)
    return _write_rows(buffer, rows, first), t_out


def _kind_templates(templates: dict, kind: int) -> dict:
    """One kind's templates of a function specialised per kind, by their plain signature."""
    return {s[2]: t for s, t in templates.items() if isinstance(s, tuple) and s[1] == kind and s[2] != 0}


def _compute_up(templates: dict, dynamic, env, data, ctx, degree, start, edges: Edges):
    """Outputs of one step's ``K`` rows (internal nodes and padding) for one function."""
    if "map" in templates:
        return apply_template(templates["map"], dynamic, env, data, ctx, edges)
    num_edges = edges.rows.shape[0]
    arities = sorted(k for k in templates if isinstance(k, int) and k != 0)

    def run(k):
        def fn(data, ctx):
            j = jnp.arange(k)[None, :]
            slot = jnp.minimum(ctx["start"][:, None] + j, num_edges - 1)
            # A missing child (a step without real rows, whose copied node's degree
            # does not divide the width) reads the row's own first child.
            own_first = edges.rows[ctx["start"]][:, None]
            kids = jnp.where(j < ctx["degree"][:, None], edges.rows[slot], own_first)
            inputs = {n: v for n, v in ctx.items() if n not in ("start", "degree")}
            return apply_template(templates[k], dynamic, env, data, {**inputs, "children": kids})

        return fn

    ctx = {**ctx, "start": start, "degree": degree}
    if len(arities) == 1:  # every row has this arity (padding rows copy a real row)
        return run(arities[0])(data, ctx)
    # Each arity's template runs on the rows of that arity, the others reading such a
    # row's inputs (``_on_own_rows``); a padding row has its real row's degree.
    out = None
    for k in arities:
        out_k = _on_own_rows(degree == k, run(k), data, ctx)
        pick = degree == k
        out = out_k if out is None else jax.tree.map(
            lambda a, b, m=pick: jnp.where(_rows_mask(m, a), a, b), out_k, out
        )
    return out
