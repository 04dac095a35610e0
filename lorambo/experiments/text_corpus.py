"""Real English text that ships with Python: the docstrings of standard-library modules.

No download and no generated sentences: paragraphs written by the CPython authors, read from
the interpreter that runs lorambo. The module list is fixed so the corpus is reproducible for a
given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

STDLIB_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "mailbox",
    "multiprocessing", "optparse", "pathlib", "pickle", "pydoc", "queue", "random", "sched",
    "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "typing", "unittest", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)
_CODE_LIKE = re.compile(r"[{}\[\]=<>|]|>>>|::|\(\)|\w+\(")


def _docstrings(module) -> list[str]:
    with warnings.catch_warnings():  # touching e.g. typing.io's __doc__ warns about deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        docs = [inspect.getdoc(module) or ""]
        for _, obj in sorted(vars(module).items()):
            if getattr(obj, "__module__", None) == module.__name__ and (inspect.isclass(obj) or inspect.isfunction(obj)):
                docs.append(inspect.getdoc(obj) or "")
    return docs


def _prose_paragraphs(doc: str, min_words: int) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", doc):
        text = " ".join(block.split())
        if len(text.split()) >= min_words and not _CODE_LIKE.search(text) and text[0].isupper():
            out.append(text)
    return out


def stdlib_paragraphs(min_words: int = 16, modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """Distinct prose paragraphs (no code samples) from standard-library docstrings, in a fixed order."""
    seen, paragraphs = set(), []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python may lack e.g. sqlite3; the rest still counts
            continue
        for doc in _docstrings(module):
            for text in _prose_paragraphs(doc, min_words):
                if text not in seen:
                    seen.add(text)
                    paragraphs.append(text)
    if not paragraphs:
        raise RuntimeError("found no prose paragraphs in the standard library's docstrings")
    return paragraphs


def split_halves(paragraph: str) -> tuple[str, str]:
    """First and second half of a paragraph by words: a positive pair for contrastive training."""
    words = paragraph.split()
    mid = len(words) // 2
    return " ".join(words[:mid]), " ".join(words[mid:])
