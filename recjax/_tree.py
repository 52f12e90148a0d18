"""Concrete trees: the Python objects a user builds by hand or from a parser."""

from __future__ import annotations

from typing import Any, Iterable


class Tree:
    """A concrete node: per-node data and an ordered tuple of child nodes.

    Calling a ``@recursive`` function on a ``Tree`` is plain Python recursion, the
    reference meaning of the program. The same ``Tree`` object may be the child of
    several nodes (a DAG); ``Forest.from_trees`` then numbers it once.

    Args:
      data: a pytree of scalars or arrays; every node of one forest must have the
        same structure, shapes and dtypes.
      children: the child nodes, in order.

    Example:
      >>> import recjax as rj
      >>> t = rj.Tree({"x": 1.0}, [rj.Tree({"x": 2.0}), rj.Tree({"x": 3.0})])
      >>> len(t.children), t.children[0].data["x"], t.is_leaf
      (2, 2.0, False)
    """

    __slots__ = ("data", "children")

    def __init__(self, data: Any, children: Iterable[Tree] = ()):
        children = tuple(children)
        for i, child in enumerate(children):
            if not isinstance(child, Tree):
                raise TypeError(
                    f"Tree children must be Tree objects; child {i} is a "
                    f"{type(child).__name__}. Wrap leaves as rj.Tree(data)."
                )
        self.data = data
        self.children = children

    @property
    def is_leaf(self) -> bool:
        """True when the node has no children."""
        return not self.children

    def __repr__(self) -> str:
        if not self.children:
            return f"Tree({self.data!r})"
        return f"Tree({self.data!r}, <{len(self.children)} children>)"
