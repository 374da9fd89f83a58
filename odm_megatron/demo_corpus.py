"""A small multi-domain corpus from text every Python installation ships, for ``odm-megatron demo``.

No download: the domains are cut from this interpreter's own files.

``code``        the standard library's Python source (tests excluded), one document per file chunk
``docstrings``  the docstrings of the standard library's modules, classes and functions
``reference``   the language reference topics that ``help()`` shows (``pydoc_data.topics``)
``licenses``    licence and notice texts of Python and of the installed distributions

The domains differ the way real pre-training domains do: licences are repetitive and quickly
learnt, the reference is clean prose, code is large and structured, docstrings are short mixed
prose. Output is Pile-format JSONL (``{"text": ..., "meta": {"pile_set_name": domain}}``), a
training and a held-out file, deterministic for a given installation.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)

DOMAINS = ("code", "docstrings", "reference", "licenses")
MAX_DOC_CHARS = 12_000  # longer texts are cut into documents of about this size (at line breaks)
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "COPYRIGHT", "AUTHORS")


@dataclass
class CorpusSummary:
    train_path: str
    valid_path: str
    documents: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # domain -> (train docs, valid docs)
    chars: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # domain -> (train chars, valid chars)


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_sources() -> List[str]:
    """The standard library's .py files, tests and third-party packages excluded, sorted."""
    root = _stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        paths += [os.path.join(directory, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(paths)


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _chunks(text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Cut ``text`` at line breaks into pieces of at most ~max_chars (a long line stays whole)."""
    piece: List[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > max_chars and piece:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield "".join(piece)


def code_documents() -> Iterator[str]:
    for path in _stdlib_sources():
        text = _read(path)
        if text and text.strip():
            yield from _chunks(text)


def docstring_documents() -> Iterator[str]:
    """One document per module: its docstrings, each headed by the object's dotted name."""
    root = _stdlib_dir()
    for path in _stdlib_sources():
        text = _read(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        parts = []
        doc = ast.get_docstring(tree)
        if doc:
            parts.append(f"{module}\n\n{doc}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(f"{module}.{node.name}\n\n{doc}")
        if parts:
            yield from _chunks("\n\n".join(parts))


def reference_documents() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        logger.warning("pydoc_data is not installed: the 'reference' domain is empty")
        return
    for name in sorted(topics):
        text = topics[name]
        if text.strip():
            yield from _chunks(text)


def license_documents() -> Iterator[str]:
    """Python's LICENSE.txt and every installed distribution's licence/notice files."""
    from importlib import metadata

    seen_paths = set()
    candidates = [os.path.join(_stdlib_dir(), "LICENSE.txt")]
    distributions = sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower())
    for dist in distributions:
        for f in dist.files or []:
            if os.path.basename(str(f)).upper().startswith(_LICENSE_PREFIXES):
                candidates.append(str(dist.locate_file(f)))
    for path in candidates:
        real = os.path.realpath(path)
        if real in seen_paths or not os.path.isfile(real):
            continue
        seen_paths.add(real)
        text = _read(real)
        if text and len(text.strip()) > 200:
            yield from _chunks(text)


SOURCES: Dict[str, Callable[[], Iterator[str]]] = {
    "code": code_documents,
    "docstrings": docstring_documents,
    "reference": reference_documents,
    "licenses": license_documents,
}


def _shuffled(docs: List[str], domain: str) -> List[str]:
    """A deterministic order that does not depend on file names (so a byte budget samples the
    whole library, not its first letters)."""
    key = lambda d: hashlib.sha1((domain + "\0" + d).encode("utf-8", "replace")).hexdigest()  # noqa: E731
    return sorted(docs, key=key)


def split_domain(docs: List[str], domain: str, max_chars: int, valid_fraction: float,
                 min_valid_chars: int) -> Tuple[List[str], List[str]]:
    """(train, valid) documents of one domain within a budget of ``max_chars`` characters; the
    held-out part gets ``valid_fraction`` of it, but at least ``min_valid_chars`` (if the domain
    has four times that) so every domain has enough validation windows."""
    docs = _shuffled(docs, domain)
    total = 0
    kept: List[str] = []
    for d in docs:
        if total >= max_chars:
            break
        kept.append(d)
        total += len(d)
    want = max(valid_fraction * total, min(min_valid_chars, total / 4))
    valid: List[str] = []
    size = 0
    while kept and size < want and len(kept) > 1:
        d = kept.pop()
        valid.append(d)
        size += len(d)
    return kept, valid


def build_corpus(output_dir: str, max_chars_per_domain: int = 1_500_000, valid_fraction: float = 0.05,
                 min_valid_chars: int = 40_000, domains: Tuple[str, ...] = DOMAINS) -> CorpusSummary:
    """Write ``output_dir/train.jsonl`` and ``output_dir/valid.jsonl``; returns what went in."""
    os.makedirs(output_dir, exist_ok=True)
    summary = CorpusSummary(os.path.join(output_dir, "train.jsonl"), os.path.join(output_dir, "valid.jsonl"))
    with open(summary.train_path, "w", encoding="utf-8") as ftrain, \
            open(summary.valid_path, "w", encoding="utf-8") as fvalid:
        for domain in domains:
            docs = list(SOURCES[domain]())
            if not docs:
                continue
            train, valid = split_domain(docs, domain, max_chars_per_domain, valid_fraction, min_valid_chars)
            for f, part in ((ftrain, train), (fvalid, valid)):
                for text in part:
                    f.write(json.dumps({"text": text, "meta": {"pile_set_name": domain}}, ensure_ascii=False) + "\n")
            summary.documents[domain] = (len(train), len(valid))
            summary.chars[domain] = (sum(map(len, train)), sum(map(len, valid)))
            logger.info("corpus: %-10s %5d train documents (%.2f MB), %4d held out (%.2f MB)", domain, len(train),
                        summary.chars[domain][0] / 1e6, len(valid), summary.chars[domain][1] / 1e6)
    if len(summary.documents) < 2:
        raise RuntimeError(f"only {len(summary.documents)} domain(s) could be built from this Python installation "
                           f"({sys.executable}); the demo needs at least two")
    return summary
