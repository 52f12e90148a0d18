"""Pins the public surface so that it changes on purpose."""

import recjax as rj


def test_exported_names():
    assert sorted(rj.__all__) == ["Children", "Forest", "Ragged", "Recursive", "Tree", "recursive"]
    for name in rj.__all__:
        assert getattr(rj, name).__doc__, f"{name} needs a docstring"
    assert isinstance(rj.__version__, str)
