"""The data module: corpora (default: the standard library, no network), tokens, windows inside one document,
packed rows whose positions restart per document and whose labels never cross a boundary."""
import os
import random

import pytest
import torch

from posenc.data import Corpus, encode_documents, load_corpus, pack, split_documents, windows


def _random_docs(n=7, lo=0, hi=60):
    """Documents whose token ids encode (document, offset), so every window can be traced back."""
    lengths = [random.randint(lo, hi) for _ in range(n)]
    return [torch.arange(length) + 1000 * (i + 1) for i, length in enumerate(lengths)]


@pytest.mark.parametrize("length", [1, 5, 16])
@pytest.mark.parametrize("cap", [None, 1, 4, 1000])
def test_windows_stay_inside_one_document(length, cap):
    docs = _random_docs()
    w = windows(docs, length, max_windows=cap)
    expected = sum(d.numel() // length for d in docs)
    assert w.shape == (expected if cap is None else min(cap, expected), length) and w.dtype == torch.int64
    seen = set()
    for row in w.tolist():
        doc, off = row[0] // 1000, row[0] % 1000
        assert row == list(range(row[0], row[0] + length)), "a window spans two documents"
        assert off % length == 0  # non-overlapping tiles from the document's start
        assert off + length <= docs[doc - 1].numel()
        seen.add((doc, off))
    assert len(seen) == w.shape[0]  # no window twice


def test_windows_cap_spreads_over_documents():
    docs = [torch.arange(100) + 1000 * (i + 1) for i in range(5)]
    w = windows(docs, 10, max_windows=5)
    assert sorted(r // 1000 for r in w[:, 0].tolist()) == [1, 2, 3, 4, 5]


def test_windows_none_reach():
    w = windows([torch.arange(5), torch.arange(3)], 8)
    assert w.shape == (0, 8)
    with pytest.raises(ValueError, match="length"):
        windows([torch.arange(5)], 0)
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        windows([torch.arange(5), torch.zeros(2, 2, dtype=torch.long)], 2)


@pytest.mark.parametrize("seq_len", [1, 3, 8, 25])
def test_pack_positions_and_labels(seq_len):
    docs = _random_docs(n=6, lo=1, hi=30)
    out = pack(docs, seq_len)
    ids, pos, labels = out["input_ids"], out["position_ids"], out["labels"]
    total = sum(d.numel() for d in docs)
    assert ids.shape == pos.shape == labels.shape == (total // seq_len, seq_len)
    assert torch.equal(ids.flatten(), torch.cat(docs)[:ids.numel()])  # concatenated in order, tail dropped
    # Check each token against an independent walk over the documents.
    flat = [(d, j) for d, doc in enumerate(docs) for j in range(doc.numel())][:ids.numel()]
    for k, (d, j) in enumerate(flat):
        r, c = divmod(k, seq_len)
        doc_start = k - j  # flat index where this document started
        assert pos[r, c] == k - max(doc_start, r * seq_len), "position must count from the document or row start"
        assert labels[r, c] == (-100 if j == 0 else ids[r, c]), "first token of a document must be masked"
    # Consequently no prediction (label at c predicted from c-1) crosses a document boundary.
    for r in range(ids.shape[0]):
        for c in range(1, seq_len):
            if labels[r, c] != -100:
                assert ids[r, c] // 1000 == ids[r, c - 1] // 1000


def test_pack_empty_and_errors():
    out = pack([torch.arange(3)], 8)
    assert out["input_ids"].shape == (0, 8)
    with pytest.raises(ValueError, match="seq_len"):
        pack([torch.arange(3)], -1)


def test_split_documents_by_document_and_deterministic():
    docs = [torch.tensor([i]) for i in range(20)]
    train, held = split_documents(docs, held_out=0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(int(d) for d in train + held) == list(range(20))
    again = split_documents(docs, held_out=0.25, seed=3)
    assert [int(d) for d in again[1]] == [int(d) for d in held]
    other = split_documents(docs, held_out=0.25, seed=4)
    assert [int(d) for d in other[1]] != [int(d) for d in held]
    assert len(split_documents(docs[:2], held_out=0.01)[1]) == 1  # at least one held out
    assert split_documents(docs, held_out=0)[1] == []
    with pytest.raises(ValueError, match="held_out"):
        split_documents(docs, held_out=1.0)


def test_default_corpus_is_the_stdlib_and_stable():
    corpus = load_corpus(max_documents=50)
    d = corpus.describe()
    assert d["source"].startswith("python-stdlib 3.") and d["documents"] == 50
    assert all(n.endswith(".py") and "/test/" not in f"/{n}" for n in corpus.names)
    assert corpus.names == sorted(corpus.names)
    assert d == load_corpus(max_documents=50).describe()  # same digest on a second read
    # The digest covers names and contents, independently recomputed here.
    import hashlib
    h = hashlib.sha256()
    for name, text in zip(corpus.names, corpus.documents):
        for part in (name.encode(), text.encode()):
            h.update(len(part).to_bytes(8, "little") + part)
    assert d["sha256"] == h.hexdigest() and d["chars"] == sum(map(len, corpus.documents))
    changed = Corpus(corpus.documents[:-1] + [corpus.documents[-1] + " "], corpus.names, corpus.source)
    assert changed.describe()["sha256"] != d["sha256"]
    renamed = Corpus(corpus.documents, corpus.names[:-1] + ["x.py"], corpus.source)
    assert renamed.describe()["sha256"] != d["sha256"]


def test_whole_default_corpus_loads_fast():
    corpus = load_corpus()
    assert corpus.describe()["documents"] > 100 and "typing.py" in corpus.names


def test_corpus_from_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second book")
    (tmp_path / "a.md").write_text("first book")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "empty.txt").write_text("   ")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    corpus = load_corpus(str(tmp_path))
    assert corpus.names == ["a.md", "b.txt", "sub/c.txt"]
    assert corpus.documents == ["first book", "second book", "third"]
    one = load_corpus(str(tmp_path / "b.txt"))
    assert one.documents == ["second book"] and one.source == str(tmp_path / "b.txt")
    assert load_corpus(str(tmp_path), max_documents=2).names == ["a.md", "b.txt"]
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no text read"):
        load_corpus(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="max_documents"):
        load_corpus(max_documents=0)


def test_encode_documents_bytes_and_tokenizer():
    corpus = Corpus(["héllo", "ab"], ["x", "y"], "test")
    docs = encode_documents(corpus, None, vocab_size=100)
    assert [d.tolist() for d in docs] == [[b % 100 for b in "héllo".encode()], [97 % 100, 98 % 100]]
    assert all(d.dtype == torch.int64 for d in docs)
    assert len(encode_documents(corpus, None, 100, max_tokens=3)) == 1  # stops once enough tokens are read

    class Tok:  # what a transformers tokenizer returns, recording how it was called
        calls = []

        def __call__(self, text, **kw):
            self.calls.append(kw)
            return {"input_ids": [len(w) for w in text.split()]}

    tok = Tok()
    docs = encode_documents(Corpus(["a bb ccc"], ["x"], "t"), tok, vocab_size=10)
    assert docs[0].tolist() == [1, 2, 3] and tok.calls[0]["add_special_tokens"] is False
    with pytest.raises(ValueError, match="vocab_size"):
        encode_documents(corpus, None, 0)
