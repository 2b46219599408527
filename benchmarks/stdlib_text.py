"""Real English text available offline: the docstrings of Python's standard library.

``paragraphs(split)`` returns the prose paragraphs of the docstrings of a fixed list of modules
(the module, its public classes and functions, their public methods), de-duplicated. The modules
are split in two disjoint halves by name, "calibration" and "evaluation", so that what a HiRE
site is calibrated on and what it is measured on share no text. The text depends on the Python
version; the result files record it.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

# Pure-Python modules present in every CPython 3.10+ build.
MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "json", "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "pathlib", "pdb", "pickle", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)
SPLITS = ("calibration", "evaluation")
_MIN_CHARS = 60
_CODE = re.compile(r"(>>>|\.\.\. |^\s*[$%]|[{}\[\]=]{2,}|\w+\(.*\)\s*->)", re.M)


def _docstrings(module) -> list[str]:
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and inspect.isfunction(member):
                    docs.append(inspect.getdoc(member))
    return [d for d in docs if d]


def _prose(doc: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", doc):
        text = " ".join(line.strip() for line in block.splitlines())
        if len(text) >= _MIN_CHARS and not _CODE.search(block) and sum(c.isalpha() for c in text) > 0.7 * len(text):
            out.append(text)
    return out


def paragraphs(split: str) -> list[str]:
    """Prose paragraphs of the modules of one half ("calibration": even positions of MODULES,
    "evaluation": odd), in a fixed order, each once."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    seen, out = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(MODULES):
            if i % 2 != SPLITS.index(split):
                continue
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for doc in _docstrings(module):
                for text in _prose(doc):
                    if text not in seen:
                        seen.add(text)
                        out.append(text)
    return out
