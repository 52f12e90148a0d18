"""Readers that turn the tree data users have into ``rj.Tree`` objects.

Every reader and converter here is iterative (an explicit stack, no Python recursion),
so a 100,000-deep input converts without ``RecursionError``. Every node of the trees
one reader returns has the same data schema (the same dict keys, shapes and dtypes),
so ``rj.Forest.from_trees`` takes them as they are.

- Stanford Sentiment Treebank (PTB bracket format): ``read_sst``, ``parse_sst``,
  ``load_sst``, ``sst_sentences``, ``to_sst_string``; vocabularies and word vectors:
  ``Vocab``, ``build_vocab``, ``load_glove``. Node data ``{"token", "label"}``.
- Python source code: ``python_functions`` (one tree per function definition),
  ``function_name_task`` (predict the first word of a function's name), ``from_ast``.
  Node data ``{"kind"}``, an id into the fixed table ``AST_KINDS``.
- The calculator task of ``recjax.demo``: ``calculator``.
- Generic conversions: ``from_nested`` / ``to_nested`` (nested lists), ``from_nltk``
  (nltk-style trees and ``(label, [children])`` tuples).

Example:
  >>> from recjax import data
  >>> import recjax as rj
  >>> splits = data.load_sst(data.SST_SAMPLE_DIR)
  >>> forest = rj.Forest.from_trees(splits.train)
  >>> len(splits.train), sorted(forest.data)
  (40, ['label', 'token'])
"""

from __future__ import annotations

import ast
import collections
import os
import pathlib
import re
import types
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, Union

import numpy as np

from ._tree import Tree

__all__ = [
    "AST_KINDS",
    "NameTask",
    "SSTSplits",
    "SST_SAMPLE_DIR",
    "Vocab",
    "build_vocab",
    "calculator",
    "from_ast",
    "from_nested",
    "from_nltk",
    "function_name_task",
    "load_glove",
    "load_sst",
    "parse_sst",
    "python_functions",
    "read_sst",
    "sst_sentences",
    "to_nested",
    "to_sst_string",
    "with_ast_kinds",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The synthetic SST-format sample shipped with recjax (``train.txt``, ``dev.txt``,
#: ``test.txt``: 40/10/10 made-up sentences; not SST data, see its ``README.txt``).
SST_SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "data" / "sst_sample"

_END = object()


# ====================================================================== iterative building


class _BadInput(Exception):
    """Raised by an ``expand`` function; ``_build`` adds where in the input it happened."""

    def __init__(self, message: str, error: type[Exception] = TypeError):
        super().__init__(message)
        self.error = error


def _where(name: str, path: Sequence[int]) -> str:
    if len(path) > 8:
        return f"{name}" + "".join(f"[{i}]" for i in path[:3]) + f"...(depth {len(path)})"
    return name + "".join(f"[{i}]" for i in path)


def _build(root: Any, expand: Callable[[Any], tuple[Any, list]], name: str) -> Tree:
    """Builds an ``rj.Tree`` from any tree-shaped object, iteratively (post-order).

    ``expand(obj)`` returns ``(data, children)`` for one input node. Every occurrence of
    an input object becomes its own ``Tree`` (the result is a tree even where the input
    shares a subobject, such as CPython's shared ``ast.Load()``); an object that is its
    own descendant raises ``ValueError``.
    """
    try:
        data, kids = expand(root)
    except _BadInput as e:
        raise e.error(f"{name}: {e}") from None
    if not kids:
        return Tree(data)
    stack = [(data, iter(kids), [], root)]
    on_path = {id(root)}
    while True:
        data, it, built, obj = stack[-1]
        child = next(it, _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(obj))
            tree = Tree(data, built)
            if not stack:
                return tree
            stack[-1][2].append(tree)
            continue
        try:
            cdata, ckids = expand(child)
        except _BadInput as e:
            path = [len(frame[2]) for frame in stack]
            raise e.error(f"{_where(name, path)}: {e}") from None
        if not ckids:
            built.append(Tree(cdata))
            continue
        if id(child) in on_path:
            path = [len(frame[2]) for frame in stack]
            raise ValueError(
                f"{_where(name, path)} contains itself (a cycle); a tree must not be its "
                "own descendant."
            )
        stack.append((cdata, iter(ckids), [], child))
        on_path.add(id(child))


# ====================================================================== vocabularies


class Vocab:
    """A fixed word -> id table with reserved ids 0 (unknown) and 1 (padding).

    ``vocab[word]`` is the word's id, or ``Vocab.UNK`` (0) for a word not in the table
    (``"<pad>"`` included: the padding id stands for "no word" and is never looked up);
    ``vocab.words[i]`` is the word with id ``i``: ``"<unk>"`` for 0, ``"<pad>"`` for 1,
    then ``words`` in the given order (ids 2, 3, ...). The SST readers also give
    internal nodes (which have no word) token 0.

    Args:
      words: the vocabulary words, distinct, without the reserved ``"<unk>"`` and
        ``"<pad>"``.

    Raises:
      ValueError: a repeated or reserved word, or a word that is not a ``str``.

    Example:
      >>> v = Vocab(["good", "bad"])
      >>> v["good"], v["bad"], v["great"], len(v), v.words[:3]
      (2, 3, 0, 4, ('<unk>', '<pad>', 'good'))
    """

    UNK = 0
    PAD = 1
    RESERVED = ("<unk>", "<pad>")

    def __init__(self, words: Iterable[str]):
        words = tuple(words)
        index: dict[str, int] = {}
        problems = []
        for i, w in enumerate(words):
            if not isinstance(w, str):
                problems.append(f"word {i} is a {type(w).__name__}, not a str")
            elif w in self.RESERVED:
                problems.append(f"word {i} is the reserved {w!r}")
            elif w in index:
                problems.append(f"word {i} ({w!r}) repeats word {index[w] - 2}")
            else:
                index[w] = i + 2
        if problems:
            raise ValueError(
                "Vocab words must be distinct strs other than '<unk>' and '<pad>':\n  "
                + "\n  ".join(problems[:10])
                + "\nBuild the vocabulary with build_vocab(), which counts and deduplicates."
            )
        self.words = self.RESERVED + words
        self._index = index

    def __getitem__(self, word: str) -> int:
        return self._index.get(word, self.UNK)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(w) for w in self.words[:6])
        more = ", ..." if len(self.words) > 6 else ""
        return f"Vocab({len(self.words)} ids: {head}{more})"

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """The ids of ``tokens`` as an ``int32`` array (0 for unknown words).

        Example:
          >>> Vocab(["a", "b"]).encode(["b", "a", "zzz"]).tolist()
          [3, 2, 0]
        """
        if isinstance(tokens, str):
            raise TypeError(
                f"Vocab.encode takes a list of words; got the str {tokens[:40]!r}. Split it "
                "first (text.split())."
            )
        return np.asarray([self[t] for t in tokens], dtype=np.int32)


def _lookup_fn(vocab: Vocab | Mapping[str, int] | None) -> Callable[[str], int]:
    if vocab is None:
        return lambda word: Vocab.UNK
    if isinstance(vocab, Vocab):
        return vocab.__getitem__
    if isinstance(vocab, Mapping):
        def lookup(word):
            i = vocab.get(word, Vocab.UNK)
            if not (isinstance(i, (int, np.integer)) and 0 <= i <= np.iinfo(np.int32).max):
                raise ValueError(
                    f"vocab maps {word!r} to {i!r}; word ids must be integers in 0 .. 2**31 - 1."
                )
            return i

        return lookup
    raise TypeError(f"vocab must be a Vocab or a dict of word ids; got a {type(vocab).__name__}.")


def _is_nltk_node(obj: Any) -> bool:
    return callable(getattr(obj, "label", None)) or (
        isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], (list, tuple))
    )


def build_vocab(
    sentences: Iterable[Sequence[str] | Any], min_count: int = 1, max_size: int | None = None
) -> Vocab:
    """Counts words and keeps those seen at least ``min_count`` times, most frequent first.

    Equivalent to::

        counts = collections.Counter(w for s in sentences for w in words_of(s))
        kept = [w for w, c in counts.most_common() if c >= min_count][:max_size]
        return Vocab(kept)

    ``most_common`` orders equal counts by first appearance, so the ids are reproducible.
    A literal ``"<unk>"`` or ``"<pad>"`` in the data is not counted; both map to
    ``Vocab.UNK`` (the padding id is never a word's).

    Args:
      sentences: each item is a sequence of word strings (a token list), or an
        nltk-style tree (an object with a ``.label()`` method whose children are
        iterated, or a ``(label, [children])`` tuple) whose string leaves are its words.
        ``sst_sentences(path)`` gives the token lists of an SST file.
      min_count: the fewest occurrences a kept word needs.
      max_size: keep at most this many words (the reserved ids come on top).

    Raises:
      TypeError: an item is a plain ``str`` (split it into tokens first) or holds
        something other than strings.

    Example:
      >>> v = build_vocab([["a", "good", "film"], ["a", "bad", "film"]], min_count=2)
      >>> v.words
      ('<unk>', '<pad>', 'a', 'film')
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1; got {min_count}.")
    if max_size is not None and max_size < 0:
        raise ValueError(f"max_size must be at least 0 (or None); got {max_size}.")
    counts: collections.Counter[str] = collections.Counter()
    for i, item in enumerate(sentences):
        if isinstance(item, str):
            raise TypeError(
                f"build_vocab: sentence {i} is a str ({item[:40]!r}); pass token lists, "
                "e.g. [line.split() for line in lines]."
            )
        words = _nltk_words(item) if _is_nltk_node(item) else item
        for w in words:
            if not isinstance(w, str):
                raise TypeError(
                    f"build_vocab: sentence {i} holds a {type(w).__name__} ({w!r}); words "
                    "must be strs."
                )
            counts[w] += 1
    kept = [w for w, c in counts.most_common() if c >= min_count and w not in Vocab.RESERVED]
    return Vocab(kept if max_size is None else kept[:max_size])


# ====================================================================== SST


class SSTSplits(NamedTuple):
    """The three splits of the Stanford Sentiment Treebank and the vocabulary they use.

    Example:
      >>> splits = load_sst(SST_SAMPLE_DIR)
      >>> [len(s) for s in splits[:3]], splits.vocab.words[:2]
      ([40, 10, 10], ('<unk>', '<pad>'))
    """

    train: list[Tree]
    dev: list[Tree]
    test: list[Tree]
    vocab: Vocab


_SST_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_SST_LABELS = {str(i): np.int32(i) for i in range(5)}
_ZERO = np.int32(0)


def _snippet(line: str, col: int) -> str:
    start = max(0, col - 30)
    text = line[start : col + 30]
    return ("..." if start else "") + text + ("..." if col + 30 < len(line) else "")


def _parse_sst_line(line: str, lineno: int, source: str, leaves: list, words: list) -> Tree:
    """One SST line -> Tree; leaf data get the word as a placeholder token (set later)."""

    def fail(col: int, why: str, fix: str = "") -> None:
        raise ValueError(
            f"{source}, line {lineno}, column {col}: {why}. {fix}".rstrip()
            + f"\n  near: {_snippet(line, col - 1)!r}"
        )

    # Open brackets: [label, word, children, column of its '('].
    stack: list[list] = []
    root = None
    for m in _SST_TOKEN.finditer(line):
        tok, col = m.group(), m.start() + 1
        if root is not None and tok != ")":
            fail(col, f"text {tok!r} after the end of the tree", "Put one tree per line.")
        if tok == "(":
            if stack:
                top = stack[-1]
                if top[0] is None:
                    fail(top[3], "a bracket has no label (expected 0-4 after '(')")
                if top[1] is not None:
                    fail(col, f"the leaf '({top[0]} {top[1]}' opened at column {top[3]} "
                         "also has a subtree", "A leaf is '(label word)'.")
                if len(top[2]) == 2:
                    fail(col, f"the node opened at column {top[3]} has a 3rd child; SST trees "
                         "are binary (an internal node has exactly two subtrees)")
            stack.append([None, None, [], col])
        elif tok == ")":
            if not stack:
                fail(col, "unbalanced brackets: this ')' closes no '('")
            label, word, kids, start = stack.pop()
            if label is None:
                fail(start, "a bracket has no label (expected 0-4 after '(')")
            if word is not None:
                data = {"token": word, "label": label}
                leaves.append(data)
                words.append(word)
                tree = Tree(data)
            elif not kids:
                fail(start, f"the leaf '({label}' has no word", "A leaf is '(label word)'.")
            elif len(kids) == 1:
                fail(start, "the node has only one child; SST trees are binary (an internal "
                     "node has exactly two subtrees)")
            else:
                tree = Tree({"token": _ZERO, "label": label}, kids)
            if stack:
                stack[-1][2].append(tree)
            else:
                root = tree
        else:
            if not stack:
                fail(col, f"{tok!r} is outside brackets", "Each line is one tree '(label ...)'.")
            top = stack[-1]
            if top[0] is None:
                label = _SST_LABELS.get(tok)
                if label is None:
                    fail(col, f"label {tok!r} is not a sentiment label 0-4")
                top[0] = label
            elif top[2]:
                fail(col, f"word {tok!r} follows a subtree in the node opened at column "
                     f"{top[3]}", "A leaf is '(label word)'.")
            elif top[1] is not None:
                fail(col, f"the leaf opened at column {top[3]} has a second word {tok!r}",
                     "A leaf holds one word.")
            else:
                top[1] = tok
    if stack:
        fail(stack[0][3], f"unbalanced brackets: {len(stack)} '(' not closed by the end of "
             "the line (the outermost opened here)")
    assert root is not None, "an empty line reached the SST line parser: a bug in recjax"
    return root


def _parse_sst_text(text: str, source: str) -> tuple[list[Tree], list[dict], list[list[str]]]:
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()  # blank lines at the end of a file are fine
    trees, leaves, sentences = [], [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(
                f"{source}, line {lineno}: the line is empty; SST files hold one tree per line "
                "with no blank lines in between. Remove the blank line."
            )
        words: list[str] = []
        trees.append(_parse_sst_line(line.rstrip("\r"), lineno, source, leaves, words))
        sentences.append(words)
    return trees, leaves, sentences


def parse_sst(
    text: str, vocab: Vocab | Mapping[str, int] | None = None, source: str = "<string>"
) -> list[Tree]:
    """Parses SST trees in PTB bracket form, one tree per line (what ``read_sst`` reads).

    A line is ``(label word)`` for a leaf or ``(label left right)`` for an internal node,
    labels 0-4 (very negative .. very positive), e.g. ``(3 (2 It) (4 (2 's) (3 good)))``.
    Every node's data is ``{"token": int32, "label": int32}``: a leaf's token is
    ``vocab[word]`` (0 for a word not in ``vocab``), an internal node's token is 0.
    Trailing blank lines are ignored. Iterative: any depth.

    Args:
      text: the file contents.
      vocab: a ``Vocab`` (or a dict of ids); ``None`` builds one from this text with
        ``build_vocab`` (then rebuild it the same way to decode the ids).
      source: the name used in error messages (``read_sst`` passes the file path).

    Raises:
      ValueError: a malformed line, naming the source, line and column: unbalanced
        brackets, a label that is not 0-4, an empty line between trees, a leaf without
        a word, a node with one or three children, text after the tree.

    Example:
      >>> vocab = Vocab(["It", "'s", "good"])
      >>> [tree] = parse_sst("(3 (2 It) (4 (2 's) (3 good)))", vocab)
      >>> [(int(t.data["label"]), int(t.data["token"])) for t in tree.children[1].children]
      [(2, 3), (3, 4)]
    """
    trees, leaves, sentences = _parse_sst_text(text, source)
    if vocab is None:
        vocab = build_vocab(sentences)
    lookup = _lookup_fn(vocab)
    for data in leaves:
        data["token"] = np.int32(lookup(data["token"]))
    return trees


def _read_text(path: PathLike) -> str:
    """A UTF-8 file's text (a leading byte-order mark dropped); a file that is not UTF-8
    is refused naming the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}, line {line}: byte {raw[e.start]:#04x} is not UTF-8 ({e.reason}). "
            "Convert the file to UTF-8 (for example iconv -f latin1 -t utf-8)."
        ) from None


def read_sst(path: PathLike, vocab: Vocab | Mapping[str, int] | None = None) -> list[Tree]:
    """Reads an SST file (PTB bracket trees, one per line) into ``rj.Tree`` objects.

    ``read_sst(path, vocab)`` is ``parse_sst(open(path).read(), vocab, source=path)``;
    see ``parse_sst`` for the format and the node data ``{"token", "label"}``.

    Args:
      path: a file such as ``trees/train.txt`` of the official distribution.
      vocab: a ``Vocab``; ``None`` builds one from this file (``build_vocab(
        sst_sentences(path))`` rebuilds the same one). Use ``load_sst`` to read all three
        splits with the training vocabulary.

    Raises:
      ValueError: a malformed line, naming the file, the line number and what is wrong.

    Example:
      >>> vocab = build_vocab(sst_sentences(SST_SAMPLE_DIR / "dev.txt"))
      >>> trees = read_sst(SST_SAMPLE_DIR / "dev.txt", vocab)
      >>> first_line = (SST_SAMPLE_DIR / "dev.txt").read_text().split("\\n")[0]
      >>> len(trees), to_sst_string(trees[0], vocab) == first_line
      (10, True)
    """
    return parse_sst(_read_text(path), vocab, source=str(path))


def sst_sentences(path: PathLike) -> list[list[str]]:
    """The words (leaves, left to right) of every tree of an SST file; checks the format.

    Example:
      >>> sst_sentences(SST_SAMPLE_DIR / "test.txt")[0][:4]
      ['The', 'cast', 'is', 'wonderful']
    """
    return _parse_sst_text(_read_text(path), str(path))[2]


def to_sst_string(tree: Tree, vocab: Vocab) -> str:
    """The PTB bracket line of a tree with ``{"token", "label"}`` data (inverse of parsing).

    A leaf prints as ``(label word)`` with ``word = vocab.words[token]`` (``<unk>`` for
    id 0), an internal node as ``(label child child ...)``. Iterative: any depth.

    Example:
      >>> vocab = Vocab(["It", "'s", "good"])
      >>> line = "(3 (2 It) (4 (2 's) (3 good)))"
      >>> to_sst_string(parse_sst(line, vocab)[0], vocab) == line
      True
    """
    out: list[str] = []
    stack: list[Any] = [tree]
    while stack:
        t = stack.pop()
        if isinstance(t, str):
            out.append(t)
        elif t.is_leaf:
            token = int(t.data["token"])
            if not 0 <= token < len(vocab):
                raise ValueError(
                    f"to_sst_string: a leaf has token {token}, outside the vocabulary's "
                    f"{len(vocab)} ids; pass the Vocab the trees were encoded with."
                )
            out.append(f"({int(t.data['label'])} {vocab.words[token]})")
        else:
            out.append(f"({int(t.data['label'])} ")
            stack.append(")")
            for i, child in enumerate(reversed(t.children)):
                if i:
                    stack.append(" ")
                stack.append(child)
    return "".join(out)


_SST_SPLITS = ("train.txt", "dev.txt", "test.txt")


def load_sst(
    directory: PathLike, vocab: Vocab | None = None, min_count: int = 1
) -> SSTSplits:
    """Reads ``train.txt``, ``dev.txt`` and ``test.txt`` of the Stanford Sentiment Treebank.

    The files are looked for in ``directory`` and then in ``directory/trees`` (the layout
    of the official ``trainDevTestTrees_PTB.zip``, https://nlp.stanford.edu/sentiment/).
    Unless ``vocab`` is given, the vocabulary is ``build_vocab`` over the training
    sentences (dev and test words not in it get token 0).

    Args:
      directory: the folder holding the three files, or the folder holding ``trees/``.
      vocab: a fixed vocabulary (for example one made from pretrained word vectors).
      min_count: passed to ``build_vocab`` when the vocabulary is built here.

    Returns:
      ``SSTSplits(train, dev, test, vocab)``.

    Raises:
      FileNotFoundError: the files are in neither place.
      ValueError: a malformed line (naming the file and line).

    Example:
      >>> splits = load_sst(SST_SAMPLE_DIR)
      >>> len(splits.train), len(splits.dev), len(splits.test), len(splits.vocab) > 100
      (40, 10, 10, True)
    """
    directory = pathlib.Path(directory)
    for folder in (directory, directory / "trees"):
        if all((folder / name).is_file() for name in _SST_SPLITS):
            break
    else:
        raise FileNotFoundError(
            f"no SST files {', '.join(_SST_SPLITS)} in {directory} or {directory / 'trees'}. "
            "Download trainDevTestTrees_PTB.zip from https://nlp.stanford.edu/sentiment/ and "
            "unzip it, then pass the folder that holds trees/."
        )
    texts = {name: _read_text(folder / name) for name in _SST_SPLITS}
    parsed = {name: _parse_sst_text(texts[name], str(folder / name)) for name in _SST_SPLITS}
    if vocab is None:
        vocab = build_vocab(parsed["train.txt"][2], min_count=min_count)
    lookup = _lookup_fn(vocab)
    for _, leaves, _ in parsed.values():
        for data in leaves:
            data["token"] = np.int32(lookup(data["token"]))
    return SSTSplits(*(parsed[name][0] for name in _SST_SPLITS), vocab)


def load_glove(
    path: PathLike, vocab: Vocab, dim: int, seed: int = 0, scale: float | None = None
) -> np.ndarray:
    """An embedding matrix for ``vocab`` from word vectors in GloVe's text format.

    Each line of the file is ``word v1 v2 ... vdim`` (single spaces; a word may itself
    contain spaces, as in ``glove.840B``: the last ``dim`` fields are the vector; trailing
    whitespace, as in fastText's ``.vec`` files, is ignored). A
    word2vec-style header line ``"<count> <dim>"`` is skipped. Row ``i`` of the result is
    the vector of ``vocab.words[i]`` (the first occurrence in the file); words not in the
    file get ``scale * N(0, 1)`` draws from ``np.random.default_rng(seed)`` (drawn for
    every row before reading, so a row depends only on ``seed`` and its id); the padding
    row ``Vocab.PAD`` is zeros. The file is streamed (read as UTF-8, undecodable bytes
    replaced): only ``vocab``'s rows are kept.

    Args:
      path: the vectors file (for example ``glove.840B.300d.txt``).
      vocab: the vocabulary whose rows to fill.
      dim: the vector size in the file.
      seed: seed of the random rows.
      scale: standard deviation of the random rows; ``None`` uses the standard
        deviation of the vectors found (1.0 when none is found).

    Returns:
      A ``float32`` array of shape ``[len(vocab), dim]``.

    Raises:
      ValueError: a line without ``dim`` numbers, naming the file and line.

    Example:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = pathlib.Path(d) / "vectors.txt"
      ...     _ = path.write_text("good 0.5 1.0\\nbad -0.5 -1.0\\n")
      ...     emb = load_glove(path, Vocab(["good", "film"]), dim=2)
      >>> emb.shape, emb[2].tolist(), emb[Vocab.PAD].tolist()
      ((4, 2), [0.5, 1.0], [0.0, 0.0])
    """
    if not isinstance(vocab, Vocab):
        raise TypeError(f"load_glove takes a Vocab; got a {type(vocab).__name__}.")
    if dim < 1:
        raise ValueError(f"dim must be at least 1; got {dim}.")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(vocab), dim)).astype(np.float32)
    found = np.zeros(len(vocab), dtype=bool)
    emb = np.zeros((len(vocab), dim), dtype=np.float32)
    with open(path, encoding="utf-8", errors="replace") as f:
        first = True
        for lineno, line in enumerate(f, 1):
            line = line.rstrip()  # fastText's .vec files end each line with a space
            if not line:
                continue
            if first:
                first = False
                fields = line.split()
                if len(fields) == 2 and all(x.isdigit() for x in fields):
                    continue  # word2vec header "<count> <dim>"
                if len(fields) != dim + 1:
                    raise ValueError(
                        f"{path}, line {lineno}: expected a word and {dim} numbers, found "
                        f"{len(fields)} fields. Is dim={dim} the size of these vectors?"
                    )
            parts = line.rsplit(" ", dim)
            if len(parts) != dim + 1 or not parts[0]:
                raise ValueError(
                    f"{path}, line {lineno}: expected a word and {dim} numbers separated by "
                    f"single spaces, found {len(parts) - 1} numbers."
                )
            i = vocab[parts[0]]
            if i == Vocab.UNK or found[i]:
                continue
            try:
                emb[i] = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise ValueError(
                    f"{path}, line {lineno}: the vector of {parts[0]!r} holds a field that "
                    "is not a number."
                ) from None
            found[i] = True
    if scale is None:
        scale = float(emb[found].std()) if found.any() else 1.0
    missing = ~found
    missing[Vocab.PAD] = False
    emb[missing] = scale * noise[missing]
    return emb


# ====================================================================== Python source

#: Names of the ``ast`` node types; ``"kind"`` ids index this table. Fixed for good (new
#: node types are appended, never inserted) so ids are stable across files and Python
#: versions; id 0 is a node type not in the table. Covers Python 3.10-3.14.
AST_KINDS: tuple[str, ...] = (
    "<unknown>",
    "Add", "And", "AnnAssign", "Assert", "Assign", "AsyncFor", "AsyncFunctionDef",
    "AsyncWith", "Attribute", "AugAssign", "Await", "BinOp", "BitAnd", "BitOr", "BitXor",
    "BoolOp", "Break", "Call", "ClassDef", "Compare", "Constant", "Continue", "Del",
    "Delete", "Dict", "DictComp", "Div", "Eq", "ExceptHandler", "Expr", "Expression",
    "FloorDiv", "For", "FormattedValue", "FunctionDef", "FunctionType", "GeneratorExp",
    "Global", "Gt", "GtE", "If", "IfExp", "Import", "ImportFrom", "In", "Interactive",
    "Invert", "Is", "IsNot", "JoinedStr", "LShift", "Lambda", "List", "ListComp", "Load",
    "Lt", "LtE", "MatMult", "Match", "MatchAs", "MatchClass", "MatchMapping", "MatchOr",
    "MatchSequence", "MatchSingleton", "MatchStar", "MatchValue", "Mod", "Module", "Mult",
    "Name", "NamedExpr", "Nonlocal", "Not", "NotEq", "NotIn", "Or", "Pass", "Pow",
    "RShift", "Raise", "Return", "Set", "SetComp", "Slice", "Starred", "Store", "Sub",
    "Subscript", "Try", "TryStar", "Tuple", "TypeIgnore", "UAdd", "USub", "UnaryOp",
    "While", "With", "Yield", "YieldFrom", "alias", "arg", "arguments", "comprehension",
    "keyword", "match_case", "withitem",
    # Python 3.12 (type parameters) and 3.14 (template strings)
    "ParamSpec", "TypeAlias", "TypeVar", "TypeVarTuple", "Interpolation", "TemplateStr",
)
_KIND_ID = {name: np.int32(i) for i, name in enumerate(AST_KINDS)}


def _expand_ast(node: Any) -> tuple[dict, list]:
    if not isinstance(node, ast.AST):
        raise _BadInput(f"is a {type(node).__name__}, not an ast.AST node")
    kind = _KIND_ID.get(type(node).__name__, _KIND_ID["<unknown>"])
    return {"kind": kind}, list(ast.iter_child_nodes(node))


def with_ast_kinds(tree: Tree) -> Tree:
    """A copy of a ``from_ast`` tree whose nodes carry their AST kind as a static tag.

    ``kind`` is the name ``AST_KINDS[data["kind"]]``, so a ``@recursive`` function can
    branch on ``node.kind == "Call"``; build the forest with
    ``Forest.from_trees(trees, kinds=AST_KINDS)``. Shared subtrees stay shared.
    Iterative: no recursion limit.

    Example:
      >>> import ast, recjax as rj
      >>> tree = with_ast_kinds(from_ast(ast.parse("x + 1", mode="eval")))
      >>> tree.kind, [c.kind for c in tree.children[0].children]
      ('Expression', ['Name', 'Add', 'Constant'])
      >>> rj.Forest.from_trees([tree], kinds=AST_KINDS).num_nodes
      6
    """
    order, stack, seen = [], [tree], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        order.append(t)
        stack.extend(t.children)
    copies: dict[int, Tree] = {}
    for t in reversed(order):  # children are copied before their parents
        if not (isinstance(t.data, Mapping) and "kind" in t.data):
            raise ValueError(
                "with_ast_kinds takes trees made by from_ast (or python_functions), whose "
                f"nodes hold {{'kind': id}}; a node holds {t.data!r:.80}."
            )
        kind = AST_KINDS[int(np.asarray(t.data["kind"]))]
        copies[id(t)] = Tree(t.data, [copies[id(c)] for c in t.children], kind=kind)
    return copies[id(tree)]


def from_ast(node: ast.AST) -> Tree:
    """Converts a Python AST into an ``rj.Tree`` of node kinds (iterative: any depth).

    Equivalent to::

        def from_ast(node):
            kind = AST_KINDS.index(type(node).__name__)  # 0 if absent
            return rj.Tree({"kind": np.int32(kind)},
                           [from_ast(c) for c in ast.iter_child_nodes(node)])

    Only the node type is kept: identifiers (``Name.id``, ``FunctionDef.name``,
    ``Attribute.attr``, ``arg.arg``, ...) and constants (``Constant.value``) are fields,
    not child nodes, so they never reach the tree; operators and contexts (``Add``,
    ``Load``) are nodes of their own, so they appear as kinds. CPython shares one
    ``Load()`` object among many parents; each occurrence becomes its own node.

    Example:
      >>> t = from_ast(ast.parse("x + 1", mode="eval"))
      >>> [AST_KINDS[int(n.data["kind"])] for n in [t, *t.children, *t.children[0].children]]
      ['Expression', 'BinOp', 'Name', 'Add', 'Constant']
    """
    if not isinstance(node, ast.AST):
        raise TypeError(f"from_ast takes an ast.AST node; got a {type(node).__name__}.")
    return _build(node, _expand_ast, "node")


def _python_files(paths_or_modules: Any) -> list[pathlib.Path]:
    if isinstance(paths_or_modules, (str, bytes, os.PathLike, types.ModuleType)):
        items = [paths_or_modules]
    else:
        try:
            items = list(paths_or_modules)
        except TypeError:
            items = [paths_or_modules]  # not iterable: refused below, by its type
    files: list[pathlib.Path] = []
    for item in items:
        if isinstance(item, types.ModuleType):
            origin = getattr(item, "__file__", None)
            if not origin or not origin.endswith(".py"):
                raise ValueError(
                    f"module {item.__name__} has no Python source file (__file__ = {origin!r})."
                )
            if getattr(item, "__path__", None) is not None:  # a package: all of its folder
                files.extend(sorted(pathlib.Path(origin).parent.rglob("*.py")))
                continue
            files.append(pathlib.Path(origin))
            continue
        if isinstance(item, bytes):  # a path given as bytes
            item = os.fsdecode(item)
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(
                f"expected paths of .py files or folders, or modules; got a {type(item).__name__}."
            )
        path = pathlib.Path(item)
        if path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(
                f"{path} is neither a file nor a folder. To read an installed module, pass the "
                "module object (import json; python_functions([json]))."
            )
    return files


def _parse_python(path: pathlib.Path, skip_errors: bool) -> ast.AST | None:
    try:
        source = path.read_bytes()  # bytes: ast.parse honours coding cookies and BOMs
        with warnings.catch_warnings():  # invalid escapes etc. in other people's code
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        if skip_errors:
            return None
        line = getattr(e, "lineno", None)
        where = f"{path}, line {line}" if line else str(path)
        raise ValueError(
            f"{where}: cannot parse the file as Python ({type(e).__name__}: "
            f"{getattr(e, 'msg', e)}). Pass skip_errors=True to skip unparsable files."
        ) from e


def _function_defs(module: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every (async) function definition, nested ones included, in source order."""
    out, stack = [], [module]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(n)
        stack.extend(reversed(list(ast.iter_child_nodes(n))))
    return out


def _all_function_defs(paths_or_modules: Any, skip_errors: bool) -> list:
    defs = []
    for path in _python_files(paths_or_modules):
        module = _parse_python(path, skip_errors)
        if module is not None:
            defs.extend(_function_defs(module))
    return defs


def python_functions(paths_or_modules: Any, *, skip_errors: bool = False) -> list[Tree]:
    """One ``from_ast`` tree per function definition in some Python source files.

    Every ``def`` and ``async def`` counts (methods and nested functions too; a nested
    function is also part of its parent's tree), file after file, in source order.
    Node data is ``{"kind": int32}``, an index into ``AST_KINDS``; nodes have any
    number of children. Not jittable: the output depends on the files.

    Args:
      paths_or_modules: a path (``.py`` file, or a folder searched recursively for
        ``*.py`` in sorted order) or a module object, or a list of those.
      skip_errors: skip files that do not parse instead of raising.

    Raises:
      ValueError: a file does not parse (naming it and the line).
      FileNotFoundError: a path does not exist.

    Example:
      >>> import textwrap
      >>> trees = python_functions(textwrap)
      >>> AST_KINDS[int(trees[0].data["kind"])], len(trees) > 10
      ('FunctionDef', True)
    """
    return [from_ast(f) for f in _all_function_defs(paths_or_modules, skip_errors)]


class NameTask(NamedTuple):
    """A labelled data set: predict a function's name's first word from its AST.

    ``trees[i]`` is the ``from_ast`` tree of function ``names[i]``; ``labels[i]`` (int32)
    indexes ``classes``, the most frequent first words (most frequent first).

    Example:
      >>> import textwrap
      >>> task = function_name_task(textwrap, num_classes=2)
      >>> len(task.trees) == len(task.labels) == len(task.names), len(task.classes)
      (True, 2)
    """

    trees: list[Tree]
    labels: np.ndarray
    classes: tuple[str, ...]
    names: tuple[str, ...]


def _first_word(name: str) -> str | None:
    """``_getHTTPResponse_x`` -> ``get``: leading part before ``_`` or a camelCase break."""
    part = name.strip("_").split("_")[0]
    if not part:
        return None
    for i in range(1, len(part)):
        if part[i].isupper() and (
            not part[i - 1].isupper() or (i + 1 < len(part) and part[i + 1].islower())
        ):
            return part[:i].lower()
    return part.lower()


def function_name_task(
    files: Any, num_classes: int = 10, *, skip_errors: bool = False
) -> NameTask:
    """Functions labelled by the first word of their name (``get``, ``set``, ``is``, ...).

    The first word of a name: strip leading and trailing ``_``, take the part before the
    next ``_``, then cut it before its first camelCase break (an upper-case letter after
    a lower-case letter or digit, or the last capital of a run of capitals followed by a
    lower-case letter), lower-cased: ``__init__`` -> ``init``, ``getValue`` -> ``get``,
    ``HTTPServer`` -> ``http``, ``_is_dir`` -> ``is``. The classes are the
    ``num_classes`` most frequent first words (ties: alphabetical); functions whose
    first word is not a class are dropped. The name is hidden by construction: the
    trees hold node kinds only (see ``from_ast``).

    Args:
      files: what ``python_functions`` takes.
      num_classes: how many first words to keep (fewer if fewer exist).
      skip_errors: skip files that do not parse.

    Returns:
      ``NameTask(trees, labels, classes, names)``.

    Example:
      >>> import pathlib, tempfile
      >>> code = "def get_x(): pass\\ndef getY(): pass\\ndef is_ok(): pass\\ndef run(): pass\\n"
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = (pathlib.Path(d) / "m.py").write_text(code)
      ...     task = function_name_task(d, num_classes=2)
      >>> task.classes, task.names, task.labels.tolist()
      (('get', 'is'), ('get_x', 'getY', 'is_ok'), [0, 0, 1])
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes}.")
    defs = _all_function_defs(files, skip_errors)
    words = [_first_word(f.name) for f in defs]
    counts = collections.Counter(w for w in words if w)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_classes]
    classes = tuple(w for w, _ in ranked)
    class_id = {w: i for i, w in enumerate(classes)}
    kept = [(f, class_id[w]) for f, w in zip(defs, words) if w in class_id]
    return NameTask(
        trees=[from_ast(f) for f, _ in kept],
        labels=np.asarray([c for _, c in kept], dtype=np.int32),
        classes=classes,
        names=tuple(f.name for f, _ in kept),
    )


# ====================================================================== calculator


def calculator(
    n: int, max_depth: int, seed: int, operators: Sequence[str] = ("+", "-", "*")
) -> tuple[list[Tree], list[int]]:
    """``n`` distinct random arithmetic expressions as trees, and their exact values.

    The expressions of ``recjax.demo.generate_expressions(n, max_depth, seed,
    operators)`` parsed with ``recjax.demo.parse_expression``: digits are leaves with
    data ``{"token": digit}``, operators internal nodes with two children and tokens 10
    (``+``), 11 (``-``), 12 (``*``). The values are exact Python ints (a product of
    depth 5 or more can exceed int64); the demo's class label is ``value % 10``.

    Example:
      >>> trees, values = calculator(2, max_depth=2, seed=0)
      >>> from recjax.demo import expression_to_string
      >>> values, [expression_to_string(t) for t in trees]
      ([-5, -8], ['(* 5 (- 4 5))', '(- (- 9 8) 9)'])
    """
    from . import demo as _demo  # imported here: the demo pulls in optax

    trees, values = [], []
    for line in _demo.generate_expressions(n, max_depth, seed, operators):
        value, _, expr = line.partition("\t")
        trees.append(_demo.parse_expression(expr))
        values.append(int(value))
    return trees, values


# ====================================================================== nested lists


def _fits(value, cast, dtype: np.dtype) -> bool:
    """Whether ``cast`` (``value`` converted to ``dtype``; None: it overflowed) holds
    ``value``: numpy scalars wrap around (``np.int64`` to int32) or become inf quietly."""
    if cast is None:
        return False
    if np.issubdtype(dtype, np.integer) and not isinstance(value, (bool, np.bool_)):
        return not float(value).is_integer() or int(cast) == value  # 2.5 -> 2 is rounding
    if np.issubdtype(dtype, np.floating):
        return not np.isfinite(value) or bool(np.isfinite(cast))
    return True


def from_nested(obj: Any, dtype: Any = None, fill: Any = None) -> Tree:
    """Converts nested lists/tuples of numbers into an ``rj.Tree`` (iterative: any depth).

    A list or tuple is an internal node whose children are its elements, in order; any
    other object must be a real number (``bool``, ``int``, ``float``, a numpy scalar or
    0-d array) and becomes a leaf. Every node's data is ``{"value": v}`` with ``v`` a
    numpy scalar of one dtype: a leaf's number, or ``fill`` (default 0) at an internal
    node. An empty list has no children, so it is a leaf holding ``fill``. Equivalent
    to::

        def from_nested(obj):
            if isinstance(obj, (list, tuple)):
                return rj.Tree({"value": dtype(fill)}, [from_nested(x) for x in obj])
            return rj.Tree({"value": dtype(obj)})

    Args:
      obj: the nested lists.
      dtype: the dtype of every ``value``; ``None`` picks ``float32`` if any leaf (or
        ``fill``) is a float, else ``int32`` if any is an int, else ``bool`` (JAX's
        default widths).
      fill: the value of internal nodes; ``None`` is 0 (``False`` for bools).

    Raises:
      TypeError: a leaf that is not a real number (naming where it is, e.g.
        ``obj[1][0]``).
      ValueError: a list that contains itself.

    Example:
      >>> t = from_nested([1, [2, 3]])
      >>> t.data, [c.data for c in t.children[1].children], to_nested(t)
      ({'value': np.int32(0)}, [{'value': np.int32(2)}, {'value': np.int32(3)}], [1, [2, 3]])
    """
    internal: list[dict] = []
    leaves: list[dict] = []
    kinds: set[str] = set()

    def kind_of(x) -> str | None:
        if isinstance(x, (bool, int, float)):
            return "b" if isinstance(x, bool) else "i" if isinstance(x, int) else "f"
        if isinstance(x, (np.generic, np.ndarray)) and np.ndim(x) == 0:
            kind = np.asarray(x).dtype.kind
            return {"b": "b", "i": "i", "u": "i", "f": "f"}.get(kind)
        return None

    def expand(x):
        if isinstance(x, (list, tuple)):
            data = {"value": fill}
            internal.append(data)
            return data, list(x)
        kind = kind_of(x)
        if kind is not None:
            kinds.add(kind)
            data = {"value": x}
            leaves.append(data)
            return data, []
        raise _BadInput(
            f"is a {type(x).__name__} ({x!r:.40}); a leaf must be a real number (lists and "
            "tuples are internal nodes). Map words to ids first, e.g. with build_vocab."
        )

    if fill is not None:
        if kind_of(fill) is None:
            raise TypeError(f"from_nested: fill must be a real number; got {fill!r:.40}.")
        kinds.add(kind_of(fill))
    tree = _build(obj, expand, "obj")
    if dtype is None:
        dtype = np.float32 if "f" in kinds else np.bool_ if kinds == {"b"} else np.int32
    scalar = np.dtype(dtype).type

    def convert(value, what):
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                cast = scalar(value)
        except (OverflowError, ValueError):  # a Python int out of range; NaN or inf to an int
            cast = None
        if not _fits(value, cast, np.dtype(dtype)):
            raise ValueError(
                f"from_nested: {what} {value} does not fit {np.dtype(dtype)}; pass a "
                "wider dtype (a float dtype for NaN or inf)."
            ) from None
        return cast

    for d in leaves:
        d["value"] = convert(d["value"], "leaf value")
    fill_value = convert(0 if fill is None else fill, "fill")
    for d in internal:
        d["value"] = fill_value
    return tree


def to_nested(tree: Tree) -> Any:
    """The nested lists of a ``{"value": v}`` tree: the inverse of ``from_nested``.

    A leaf gives its value as a Python number (``.item()``), an internal node the list
    of its children's results (its own value is dropped). Iterative: any depth.

    Example:
      >>> to_nested(from_nested((1.5, [2, (3,)])))
      [1.5, [2.0, [3.0]]]
    """

    def leaf(t):
        v = t.data["value"]
        return v.item() if hasattr(v, "item") else v

    if tree.is_leaf:
        return leaf(tree)
    result: list = []
    stack = [(tree, 0, result)]
    while stack:
        t, k, out = stack[-1]
        if k == len(t.children):
            stack.pop()
            continue
        stack[-1] = (t, k + 1, out)
        c = t.children[k]
        if c.is_leaf:
            out.append(leaf(c))
        else:
            sub: list = []
            out.append(sub)
            stack.append((c, 0, sub))
    return result


# ====================================================================== nltk-style trees


def _nltk_parts(obj: Any) -> tuple[Any, list]:
    if callable(getattr(obj, "label", None)):
        return obj.label(), list(obj)
    if isinstance(obj, tuple) and len(obj) == 2:
        label, kids = obj
        if isinstance(kids, str):
            return label, [kids]
        if isinstance(kids, (list, tuple)):
            return label, list(kids)
    raise _BadInput(
        f"is a {type(obj).__name__} ({obj!r:.40}); expected a tree with .label() (nltk), a "
        "(label, [children]) tuple or a word (str)"
    )


def _nltk_words(tree: Any) -> list[str]:
    words, stack = [], [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            words.append(x)
            continue
        try:
            _, kids = _nltk_parts(x)
        except _BadInput as e:
            raise TypeError(f"tree node {e}") from None
        stack.extend(reversed(kids))
    return words


def from_nltk(
    tree: Any,
    vocab: Vocab | Mapping[str, int] | None = None,
    labels: Mapping[Any, int] | Callable[[Any], int] | None = None,
) -> Tree:
    """Converts an nltk-style tree into an ``rj.Tree`` with ``{"token", "label"}`` data.

    A node is an object with a ``.label()`` method whose iteration gives its children
    (``nltk.Tree``), or a plain ``(label, [children])`` tuple (``(label, "word")`` is
    short for ``(label, ["word"])``); a child that is a ``str`` is a word. Then:

    - a node whose only child is a word (a preterminal such as ``(NN dog)`` or SST's
      ``(3 good)``) becomes one leaf: ``{"token": vocab[word], "label": label_id}``;
    - another node becomes ``{"token": 0, "label": label_id}`` with its children;
    - a word next to other children becomes a leaf ``{"token": vocab[word], "label": -1}``.

    ``label_id`` is ``int(label)`` when ``labels`` is None (SST's labels ``"0"``-``"4"``),
    ``labels[label]`` for a mapping, ``labels(label)`` for a callable. So for an SST
    line, ``from_nltk(nltk.Tree.fromstring(line), vocab)`` equals ``parse_sst(line,
    vocab)[0]``. Iterative: any depth.

    Args:
      tree: the root.
      vocab: word ids (a ``Vocab`` or a dict); ``None`` gives every word token 0.
      labels: how to turn a label into an int (see above).

    Raises:
      TypeError: a node of another form (naming where it is, e.g. ``tree[0][1]``).
      ValueError: a label that cannot be converted, or a cycle.

    Example:
      >>> vocab = Vocab(["It", "good"])
      >>> t = from_nltk(("3", [("2", "It"), ("4", ["good"])]), vocab)
      >>> [(int(n.data["label"]), int(n.data["token"])) for n in [t, *t.children]]
      [(3, 0), (2, 2), (4, 3)]
    """
    lookup = _lookup_fn(vocab)
    if labels is None:
        convert: Callable[[Any], int] = int
    elif isinstance(labels, Mapping):
        convert = labels.__getitem__
    elif callable(labels):
        convert = labels
    else:
        raise TypeError(f"labels must be a mapping or a callable; got a {type(labels).__name__}.")

    def label_id(label):
        try:
            return np.int32(convert(label))
        except (KeyError, ValueError, TypeError, OverflowError) as e:
            raise _BadInput(
                f"has label {label!r}, which cannot be converted to an int ({type(e).__name__}: "
                f"{e}). Pass labels={{...}} (a dict of label ids) or a callable.",
                ValueError,
            ) from None

    def expand(x):
        if isinstance(x, str):
            return {"token": np.int32(lookup(x)), "label": np.int32(-1)}, []
        label, kids = _nltk_parts(x)
        if len(kids) == 1 and isinstance(kids[0], str):
            return {"token": np.int32(lookup(kids[0])), "label": label_id(label)}, []
        return {"token": _ZERO, "label": label_id(label)}, kids

    return _build(tree, expand, "tree")
