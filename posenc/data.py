"""Text for evaluation and fine-tuning: documents -> tokens -> fixed-length rows, never mixing two documents
in one prediction.

    corpus = load_corpus()                           # the Python standard library's sources (no network)
    corpus = load_corpus("books/")                   # or a text file, or a directory of text files
    docs = encode_documents(corpus, tokenizer, model.config.vocab_size)   # one 1-D int64 tensor per document
    train, held = split_documents(docs, held_out=0.1)
    x = windows(held, 4096, max_windows=16)         # [n, 4096], each window inside one document
    batch = pack(train, 2048)                        # rows with positions restarting per document

Only torch is imported; tokenizers are passed in (a transformers tokenizer, or None for random models, whose
tokens are the UTF-8 bytes folded into the vocabulary).
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["Corpus", "load_corpus", "stdlib_files", "encode_documents", "iter_encoded", "encode_text",
           "split_documents", "windows", "pack", "TEXT_SUFFIXES"]

# Files read from a directory. Anything else (binaries, images, caches) is skipped.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex", ".html", ".htm", ".json", ".jsonl", ".csv", ".c", ".h",
                 ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".toml", ".yaml", ".yml", ".xml", ".ini", ".cfg")
# Parts of the standard library left out of the default corpus: tests (some distributions ship them apart,
# so leaving them out keeps the corpus the same for a Python version everywhere), installed packages,
# caches, and files generated for one machine.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                     "lib-dynload"}


@dataclass
class Corpus:
    """Documents with their names (relative paths) and where they came from."""
    documents: list[str]
    names: list[str]
    source: str

    def describe(self) -> dict:
        """What was read: source, number of documents, characters, and a sha256 of the names and contents."""
        h = hashlib.sha256()
        for name, text in zip(self.names, self.documents):
            for part in (name.encode("utf-8"), text.encode("utf-8")):
                h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two corpora hash alike
                h.update(part)
        return {"source": self.source, "documents": len(self.documents),
                "chars": sum(len(d) for d in self.documents), "sha256": h.hexdigest()}


def stdlib_files() -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the standard library's own .py sources (no tests, no site-packages,
    nothing generated for this machine)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                found.append(os.path.normpath(os.path.join(rel_dir, f)))
    return root, sorted(found, key=lambda p: p.replace(os.sep, "/"))


def _read_utf8(path: str) -> str | None:
    """The file's text, or None if it is not UTF-8 text (binary files are skipped, not mangled)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(path: str | None = None, *, max_documents: int | None = None) -> Corpus:
    """Documents from a text file, a directory of text files (recursively, sorted by path; files with a
    suffix in TEXT_SUFFIXES that read as UTF-8), or None: the Python standard library's .py sources.
    Empty files are left out. ValueError if nothing is read, or if path does not exist."""
    if max_documents is not None and (not isinstance(max_documents, int) or isinstance(max_documents, bool)
                                      or max_documents <= 0):
        raise ValueError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    if path is None:
        root, rel = stdlib_files()
        v = sys.version_info
        source = f"python-stdlib {v.major}.{v.minor}.{v.micro}"
    elif not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or directory path or None, got {type(path).__name__}")
    elif os.path.isfile(path):
        root, rel, source = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)], str(path)
    elif os.path.isdir(path):
        root, source, rel = str(path), str(path), []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            for f in filenames:
                if f.lower().endswith(TEXT_SUFFIXES) and not f.startswith("."):
                    rel.append(os.path.relpath(os.path.join(dirpath, f), root))
        rel.sort(key=lambda p: p.replace(os.sep, "/"))
    else:
        raise ValueError(f"text path {path!s} does not exist (give a text file or a directory of text files)")
    documents, names = [], []
    for name in rel:
        if max_documents is not None and len(documents) >= max_documents:
            break
        text = _read_utf8(os.path.join(root, name))
        if text and text.strip():
            documents.append(text)
            names.append(name.replace(os.sep, "/"))
    if not documents:
        what = "the standard library" if path is None else str(path)
        raise ValueError(f"no text read from {what} (expected non-empty UTF-8 files ending in "
                         f"{', '.join(TEXT_SUFFIXES[:5])}, ...)")
    return Corpus(documents, names, source)


def encode_text(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """One document's tokens, 1-D int64, without special tokens (windows start mid-document anyway).
    tokenizer None: the UTF-8 bytes folded into the vocabulary (as posenc.analysis.tokenize does)."""
    if tokenizer is None:
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
        return data % vocab_size
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def iter_encoded(corpus: Corpus, tokenizer, vocab_size: int, order: list[int] | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """(document index, tokens) one document at a time, in `order` (default: corpus order), so callers can
    stop as soon as they have enough."""
    _check_vocab(vocab_size)
    for i in (range(len(corpus.documents)) if order is None else order):
        yield i, encode_text(corpus.documents[i], tokenizer, vocab_size)


def encode_documents(corpus: Corpus, tokenizer, vocab_size: int, *, max_tokens: int | None = None
                     ) -> list[torch.Tensor]:
    """One 1-D int64 tensor per document, in corpus order. max_tokens: stop after the document that brings
    the total to at least this many tokens (tokenizing a whole large corpus is slow)."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a posenc.data.Corpus, got {type(corpus).__name__}")
    docs, total = [], 0
    for _, ids in iter_encoded(corpus, tokenizer, vocab_size):
        docs.append(ids)
        total += ids.numel()
        if max_tokens is not None and total >= max_tokens:
            break
    return docs


def _check_vocab(vocab_size):
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")


def _check_docs(docs, what="docs"):
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"{what} must be a list of 1-D token tensors, got {type(docs).__name__}")
    for i, d in enumerate(docs):
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.dtype.is_floating_point or d.dtype == torch.bool:
            raise TypeError(f"{what}[{i}] must be a 1-D integer tensor, got "
                            f"{type(d).__name__ if not isinstance(d, torch.Tensor) else (d.dtype, tuple(d.shape))}")


def _check_positive(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def split_documents(docs: list, held_out: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, held_out) split by whole documents: a seeded shuffle, then the last round(held_out * n)
    (at least one when held_out > 0 and there are two or more documents). Each part keeps corpus order."""
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"docs must be a list, got {type(docs).__name__}")
    if not isinstance(held_out, (int, float)) or isinstance(held_out, bool) or not 0 <= held_out < 1:
        raise ValueError(f"held_out must be a fraction in [0, 1), got {held_out!r}")
    n = len(docs)
    k = 0 if held_out == 0 or n < 2 else min(n - 1, max(1, round(held_out * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[n - k:])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def windows(docs: list[torch.Tensor], length: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, length] int64: non-overlapping windows of `length` tokens, each inside one document (a document
    gives len // length of them, from its start; the rest of it is not used). With max_windows, windows are
    taken round-robin over the documents (each document's first window, then each one's second, ...) so that
    a cap still spreads over many documents. n may be 0 (no document reaches `length`)."""
    _check_docs(docs)
    _check_positive(length, "length")
    if max_windows is not None:
        _check_positive(max_windows, "max_windows")
    per_doc = [d.numel() // length for d in docs]
    if max_windows is None:
        picks = [(i, j) for i, n in enumerate(per_doc) for j in range(n)]
    else:  # round-robin: (document, window index) by window index first
        picks, depth = [], 0
        while len(picks) < max_windows:
            row = [(i, depth) for i, n in enumerate(per_doc) if n > depth]
            if not row:
                break
            picks.extend(row[:max_windows - len(picks)])
            depth += 1
    if not picks:
        return torch.empty(0, length, dtype=torch.int64)
    return torch.stack([docs[i][j * length:(j + 1) * length].to(torch.int64) for i, j in picks])


def pack(docs: list[torch.Tensor], seq_len: int) -> dict:
    """Rows of seq_len tokens, the documents concatenated in order (the incomplete last row is dropped).

    {"input_ids": [n, seq_len], "position_ids": [n, seq_len] (0 at each document start and at each row
    start: a row is its own context, so a document carried over from the previous row counts from 0 again),
    "labels": [n, seq_len] (the input ids, -100 at each document's first token so that no prediction
    crosses a document boundary; transformers shifts labels inside the model)}."""
    _check_docs(docs)
    _check_positive(seq_len, "seq_len")
    docs = [d.to(torch.int64) for d in docs if d.numel()]
    if not docs:
        empty = torch.empty(0, seq_len, dtype=torch.int64)
        return {"input_ids": empty, "position_ids": empty.clone(), "labels": empty.clone()}
    ids = torch.cat(docs)
    starts = torch.zeros(ids.numel(), dtype=torch.bool)
    offsets = torch.tensor([0] + [d.numel() for d in docs[:-1]]).cumsum(0)
    starts[offsets] = True
    n = ids.numel() // seq_len
    ids, starts = ids[:n * seq_len].view(n, seq_len), starts[:n * seq_len].view(n, seq_len)
    labels = ids.masked_fill(starts, -100)
    # Position = distance to the last document start or row start at or before each token.
    reset = starts.clone()
    reset[:, 0] = True
    col = torch.arange(seq_len).expand(n, seq_len)
    last_reset = torch.where(reset, col, torch.zeros_like(col)).cummax(dim=1).values
    return {"input_ids": ids, "position_ids": col - last_reset, "labels": labels}
