"""Concrete trees: the Python objects a user builds by hand or from a parser."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Tree:
    """A concrete node: per-node data and an ordered tuple of child nodes.

    Calling a ``@recursive`` function on a ``Tree`` is plain Python recursion, the
    reference meaning of the program. The same ``Tree`` object may be the child of
    several nodes (a DAG); ``Forest.from_trees`` then numbers it once.

    Args:
      data: a pytree of scalars or arrays; every node of one forest must have the
        same structure, shapes and dtypes.
      children: the child nodes, in order.
      kind: optional static tag (a string from a vocabulary declared to
        ``Forest.from_trees(..., kinds=...)``); ``node.kind`` reads it and specialises
        the trace per kind, like ``node.is_leaf``.

    Example:
      >>> import recjax as rj
      >>> t = rj.Tree({"x": 1.0}, [rj.Tree({"x": 2.0}), rj.Tree({"x": 3.0})])
      >>> len(t.children), t.children[0].data["x"], t.is_leaf
      (2, 2.0, False)
    """

    __slots__ = ("children", "data", "kind")

    def __init__(self, data: Any, children: Iterable[Tree] = (), kind: Any = None):
        if not isinstance(children, (tuple, list)) and (
            isinstance(children, Tree) or not isinstance(children, Iterable)
        ):
            raise TypeError(
                f"Tree children must be a list of Tree objects; got a "
                f"{type(children).__name__}. Write rj.Tree(data, [child]) for one child and "
                "rj.Tree(data) for a leaf."
            )
        children = tuple(children)
        for i, child in enumerate(children):
            if not isinstance(child, Tree):
                raise TypeError(
                    f"Tree children must be Tree objects; child {i} is a "
                    f"{type(child).__name__}. Wrap leaves as rj.Tree(data)."
                )
        try:
            kind is None or hash(kind)
        except TypeError:
            raise TypeError(
                f"Tree kind must be hashable, a str such as 'Call' (or None); got a "
                f"{type(kind).__name__}."
            ) from None
        self.data = data
        self.children = children
        self.kind = kind

    @property
    def is_leaf(self) -> bool:
        """True when the node has no children."""
        return not self.children

    def walk(self) -> list[Position]:
        """Every node of this tree with its position (parent and index), in pre-order.

        Pre-order is the order in which ``Forest.from_trees([tree])`` numbers the nodes
        of a tree without shared subtrees, so ``f(tree.walk()[i])`` is the plain-Python
        meaning of row ``i`` of ``f.batch(Forest.from_trees([tree]))``. A ``Position``
        can be passed to a ``@recursive`` function in place of a ``Tree``; a top-down
        function (one that reads ``node.parent``) needs it, because a ``Tree`` does not
        know its parent.

        Example:
          >>> import recjax as rj
          >>> t = rj.Tree(1.0, [rj.Tree(2.0), rj.Tree(3.0, [rj.Tree(4.0)])])
          >>> [(p.tree.data, p.index, p.parent and p.parent.tree.data) for p in t.walk()]
          [(1.0, 0, None), (2.0, 0, 1.0), (3.0, 1, 1.0), (4.0, 0, 3.0)]
        """
        out: list[Position] = []
        stack = [Position(self, None, 0)]
        while stack:  # iterative: no recursion limit on deep trees
            pos = stack.pop()
            out.append(pos)
            stack.extend(
                Position(c, pos, i) for i, c in reversed(list(enumerate(pos.tree.children)))
            )
        return out

    def __repr__(self) -> str:
        if not self.children:
            return f"Tree({self.data!r})"
        return f"Tree({self.data!r}, <{len(self.children)} children>)"


class Position:
    """A node of a concrete tree seen from its root: the subtree, its parent and index.

    ``Tree.walk()`` returns them; the eager (plain Python) evaluation of a top-down
    function walks ``parent`` links.

    Attributes:
      tree: the node's subtree (a ``Tree``).
      parent: the parent's ``Position``, or ``None`` at the root.
      index: the node's position among its parent's children (0 at the root).
    """

    __slots__ = ("index", "parent", "tree")

    def __init__(self, tree: Tree, parent: Position | None, index: int):
        self.tree = tree
        self.parent = parent
        self.index = index

    def __repr__(self) -> str:
        return f"Position({self.tree!r}, index={self.index})"
