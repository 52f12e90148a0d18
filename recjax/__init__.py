"""recjax: compile recursive Python functions over trees into depth-batched JAX programs."""

from importlib.metadata import PackageNotFoundError, version

from ._forest import Forest as Forest
from ._tracer import Children as Children
from ._tracer import Ragged as Ragged
from ._tracer import Recursive as Recursive
from ._tracer import recursive as recursive
from ._tree import Tree as Tree

try:
    __version__ = version("recjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["Children", "Forest", "Ragged", "Recursive", "Tree", "recursive"]
