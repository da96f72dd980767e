"""posenc finetune (posenc.training): packed rows keep documents apart, the schedule and data order, a run
saves a model that reloads patched, resume equals an uninterrupted run, two gloo processes (DDP and FSDP2)
equal one, LoRA, torch.compile with the rotary op in the graph, and user errors (exit 2, nothing written)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
import posenc  # noqa: E402
from posenc import cli, training  # noqa: E402
from posenc.analysis.models import load_model  # noqa: E402
from posenc.training import FinetuneArgs, FinetuneError, finetune  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the light keeper climbed stairs every evening harbour boats storm rose sea pier town children "
         "counted gulls winter waves roof old man ferries water colour night march flood shore").split()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small corpus of documents of different lengths (seeded, so that every test reads the same rows)."""
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(1234)
    for i in range(24):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(40, 160))]
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    return str(root)


def args_for(text_dir, output, **kw):
    base = dict(model="tiny-llama", encoding="hope:32", output=str(output), text_file=text_dir, seq_len=64,
                steps=4, batch_size=4, warmup=1, lr=3e-3, dtype="float32", save_every=0, eval_rows=4, quiet=True,
                device="cpu")
    base.update(kw)
    return FinetuneArgs(**base)


def losses(log_path):
    with open(log_path) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


# ------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("encoding", [None, "hope"])
def test_packed_rows_keep_documents_apart(attn, encoding):
    """In a packed row, a document's logits equal those of the document alone: nothing of the document
    before it in the row reaches it (attention mask from the restarting positions), in training mode."""
    model, _, _ = load_model("tiny-llama", attn_implementation=attn)
    if encoding:
        posenc.patch(model, encoding, context_length=16)
    model.train()  # training mode: where transformers would otherwise build a cache and attend across documents
    a, b = torch.randint(0, 512, (1, 23)), torch.randint(0, 512, (1, 41))
    row = {"input_ids": torch.cat([a, b], 1),
           "position_ids": torch.cat([torch.arange(23), torch.arange(41)])[None]}
    alone = {"input_ids": b, "position_ids": torch.arange(41)[None]}
    with torch.no_grad():
        packed = training.packed_logits(model, row)[0, 23:]
        single = training.packed_logits(model, alone)[0]
        other = dict(row, input_ids=torch.cat([torch.randint(0, 512, (1, 23)), b], 1))
        packed_other = training.packed_logits(model, other)[0, 23:]
        # Control: the same row with positions that do not restart is one document, and the first part matters.
        joined = training.packed_logits(model, dict(row, position_ids=torch.arange(64)[None]))[0, 23:]
        joined_other = training.packed_logits(model, dict(other, position_ids=torch.arange(64)[None]))[0, 23:]
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_other, packed, rtol=1e-5, atol=1e-5)
    assert (joined - joined_other).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- schedule, order
def test_lr_schedule():
    f = lambda s: training.lr_factor(s, warmup=4, steps=20, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(19), 0.1)
    # Halfway through the cosine (step 4 + 7.5) the factor is halfway between 1 and 0.1.
    assert math.isclose(training.lr_factor(11, 4, 20, 0.1) + training.lr_factor(12, 4, 20, 0.1), 2 * 0.55, rel_tol=0.02)
    tail = [f(s) for s in range(4, 20)]
    assert all(x > y for x, y in zip(tail, tail[1:]))


def test_step_rows_walk_seeded_permutations():
    n, g = 10, 4
    seen = torch.cat([training.step_rows(s, g, n, seed=3) for s in range(5)])  # 20 rows: two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(training.step_rows(3, g, n, seed=3), seen[12:16])  # from the step alone
    assert not torch.equal(seen[:10], seen[10:])
    assert not torch.equal(training.step_rows(0, g, n, seed=4), seen[:4])
