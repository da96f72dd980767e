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
from posenc.analysis.loading import load_model  # noqa: E402
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


# ------------------------------------------------------------------------------------------- a run
def held_out_loss(model, run_dir, text_dir):
    """The held-out loss recomputed from the saved model, with the split finetune records (independent of
    the training loop's own evaluation)."""
    from posenc import data
    corpus = data.load_corpus(text_dir)
    _, held_idx = data.split_documents(list(range(len(corpus.documents))), held_out=0.1, seed=0)
    docs = [data.encode_text(corpus.documents[i], None, model.config.vocab_size) for i in held_idx]
    rows = data.pack(docs, 64)
    rows = {k: v[:4] for k, v in rows.items()}
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
    labels = rows["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100).item()


def test_run_saves_a_model_that_reloads_patched(text_dir, tmp_path):
    out = tmp_path / "run"
    record = finetune(args_for(text_dir, out, steps=8))
    log = losses(out / "log.jsonl")
    assert len(log) == 8 and log[-1] < log[0]
    assert record["final"]["eval_loss"] < record["final"]["eval_loss_before"]
    assert sorted(os.listdir(out)) == ["config.json", "finetune.json", "generation_config.json", "log.jsonl",
                                       "model.safetensors", "run.json"]
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["encoding"] == "hope:32" and saved["data"]["documents"] == 24 and saved["data"]["sha256"]
    assert saved["args"]["steps"] == 8 and saved["world_size"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert posenc.is_patched(model)
    assert model.config.rope_parameters["posenc"]["kwargs"] == {"context_length": 32}
    assert math.isclose(held_out_loss(model, out, text_dir), saved["final"]["eval_loss"], rel_tol=1e-5)
    # The log's per-step lines carry what a user plots.
    first = json.loads((out / "log.jsonl").read_text().splitlines()[1])
    assert set(first) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"} and first["step"] == 1


def test_resume_continues_the_same_run_exactly(text_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    finetune(args_for(text_dir, straight, steps=6, save_every=3))
    part = finetune(args_for(text_dir, split, steps=6, save_every=3), stop_after=3)
    assert part["stopped_at"] == 3 and os.listdir(split / "checkpoints") == ["step-00000003"]
    assert not (split / "model.safetensors").exists()
    finetune(args_for(text_dir, split, steps=6, save_every=3, resume=True))
    assert losses(split / "log.jsonl") == losses(straight / "log.jsonl")
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (split / "checkpoints").exists()  # a finished run keeps no checkpoint


def test_gradient_checkpointing_and_accumulation_change_nothing(text_dir, tmp_path):
    ref = finetune(args_for(text_dir, tmp_path / "ref", steps=3))
    other = finetune(args_for(text_dir, tmp_path / "gc", steps=3, batch_size=2, grad_accum=2,
                              gradient_checkpointing=True))
    assert other["global_batch"] == ref["global_batch"] == 4
    for x, y in zip(losses(tmp_path / "ref" / "log.jsonl"), losses(tmp_path / "gc" / "log.jsonl")):
        assert math.isclose(x, y, rel_tol=1e-5)


def test_lora_saves_merged_model_and_adapter(text_dir, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "lora"
    record = finetune(args_for(text_dir, out, steps=4, lora=4, lr=1e-2))
    assert record["model"]["trainable_parameters"] < record["model"]["parameters"] / 5
    assert record["model"]["adapter"] == "adapter" and (out / "adapter" / "adapter_config.json").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert posenc.is_patched(merged)
    base, _, _ = load_model("tiny-llama")  # the same seeded base, patched as the run did
    posenc.patch(base, "hope", context_length=32)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        untrained = base(input_ids=ids).logits
        adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert (merged(input_ids=ids).logits - untrained).abs().max() > 1e-2
    assert math.isclose(held_out_loss(merged, out, text_dir), record["final"]["eval_loss"], rel_tol=1e-4)


def test_progress_on_stderr_unless_quiet(text_dir, tmp_path, capsys):
    finetune(args_for(text_dir, tmp_path / "shown", steps=2, quiet=False))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("finetune [")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"] and "loss" in lines[-1] and "tok/s" in lines[-1]
    finetune(args_for(text_dir, tmp_path / "quiet", steps=2))
    assert "finetune [" not in capsys.readouterr().err


def test_compiled_layers_hold_the_rotary_op(text_dir, tmp_path):
    """With compile, each decoder layer is one graph (no break) with posenc's op inside, right after the patch
    (no eager call first), and the run's losses are the eager run's."""
    model, _, _ = load_model("tiny-llama", attn_implementation="sdpa")
    posenc.patch(model, "hope", context_length=32)
    x, pos = torch.randn(2, 16, 64), torch.arange(16).repeat(2, 1)
    explained = torch._dynamo.explain(model.model.layers[0])(
        x, attention_mask=None, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert "posenc.rotary" in str(explained.graphs[0].graph)
    eager = finetune(args_for(text_dir, tmp_path / "eager", steps=2))
    compiled = finetune(args_for(text_dir, tmp_path / "compiled", steps=2, compile="aot_eager"))
    assert compiled["args"]["compile"] == "aot_eager"
    for x, y in zip(losses(tmp_path / "eager" / "log.jsonl"), losses(tmp_path / "compiled" / "log.jsonl")):
        assert math.isclose(x, y, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------- 2 processes
def test_two_gloo_processes_equal_one(text_dir, tmp_path):
    """DDP (1 row x 2 accumulation steps per process) and FSDP2 (2 rows per process) on two gloo processes
    give one process's losses (4 rows per step) and save its weights; an FSDP2 run interrupted after its
    sharded checkpoint (torch.distributed.checkpoint) and resumed equals the uninterrupted one."""
    one = args_for(text_dir, tmp_path / "one", steps=4)
    finetune(one)
    fsdp = dict(vars(one), batch_size=2, fsdp=True, save_every=2)
    finetune(args_for(text_dir, tmp_path / "one-then-two", steps=4, save_every=2), stop_after=2)
    runs = {"ddp": dict(vars(one), output=str(tmp_path / "ddp"), batch_size=1, grad_accum=2),
            "fsdp": dict(fsdp, output=str(tmp_path / "fsdp")),
            # Begun on one process, resumed on two (the checkpoint resharded by torch.distributed.checkpoint).
            "one-then-two": dict(fsdp, output=str(tmp_path / "one-then-two"), resume=True)}
    resumed = [dict(fsdp, output=str(tmp_path / "fsdp-resumed"), stop_after=2),
               dict(fsdp, output=str(tmp_path / "fsdp-resumed"), resume=True)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(HERE, "finetune_worker.py"), json.dumps(list(runs.values()) + resumed)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "fsdp-resumed" / "log.jsonl") == losses(tmp_path / "fsdp" / "log.jsonl")
    a, b = weights(tmp_path / "fsdp"), weights(tmp_path / "fsdp-resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref, ref_w = losses(tmp_path / "one" / "log.jsonl"), weights(tmp_path / "one")
    for name in runs:
        record = json.loads((tmp_path / name / "finetune.json").read_text())
        assert record["world_size"] == 2 and record["parallel"] == ("ddp" if name == "ddp" else "fsdp2")
        got = losses(tmp_path / name / "log.jsonl")
        worst = max(abs(x - y) / abs(y) for x, y in zip(got, ref))
        print(f"{name}: losses {got} vs one process {ref}: max relative difference {worst:.2e}")
        assert len(got) == len(ref) and worst <= 1e-5
        w = weights(tmp_path / name)
        assert w.keys() == ref_w.keys()
        # Adam divides by the gradient's running rms, so where a gradient is ~0 a rounding difference of the
        # reduction order moves an element by up to ~lr per step: allow 1% of one step (lr 3e-3) absolute.
        diff = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
        print(f"{name}: max weight difference {diff:.2e}")
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=3e-5)


# ------------------------------------------------------------------------------------------- user errors
def cli_args(text_dir, output, *extra):
    return ["finetune", "tiny-llama", "--output", str(output), "--text-file", text_dir, "--seq-len", "64",
            "--steps", "2", "--batch-size", "2", "--warmup", "1", "--dtype", "float32", "--device", "cpu",
            "--quiet", *extra]


def run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("spec", ["bogus", "hope:x", "prope:2", "original@0-1"])
def test_bad_spec_exits_2_writing_nothing(spec, text_dir, tmp_path, capsys):
    code, err = run_cli(cli_args(text_dir, tmp_path / "out", "--encoding", spec), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("posenc finetune: error: bad encoding spec")
    assert not (tmp_path / "out").exists()


def test_unusable_output_exits_2(text_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for target, words in ((tmp_path / "file" / "run", "is not a directory"), (tmp_path / "file", "not a directory"),
                          (tmp_path / "full", "not empty")):
        code, err = run_cli(cli_args(text_dir, target, "--encoding", "nope"), capsys)
        assert code == 2 and len(err) == 1 and words in err[0], err
    assert os.listdir(tmp_path / "full") == ["notes.txt"]


def test_out_of_memory_says_what_to_do_and_leaves_nothing(text_dir, tmp_path, capsys, monkeypatch):
    def oom(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(training._Run, "train_step", oom)
    code, err = run_cli(cli_args(text_dir, tmp_path / "out", "--encoding", "hope:32"), capsys)
    assert code == 2 and len(err) == 1
    assert "out of memory at step 1" in err[0] and "--batch-size" in err[0] and "--gradient-checkpointing" in err[0]
    assert not (tmp_path / "out").exists()


def test_resume_checks_it_is_the_same_run(text_dir, tmp_path, capsys):
    out = tmp_path / "run"
    finetune(args_for(text_dir, out, steps=4, save_every=2), stop_after=2)
    before = sorted(os.listdir(out)), (out / "log.jsonl").read_text()
    code, err = run_cli(cli_args(text_dir, out, "--encoding", "hope:32", "--steps", "4", "--resume"), capsys)
    assert code == 2 and len(err) == 1 and "holds a different run" in err[0] and "lr" in err[0], err
    code, err = run_cli(cli_args(text_dir, out, "--encoding", "nope", "--resume", "--lr", "3e-3", "--steps", "4",
                                 "--save-every", "2", "--eval-rows", "4", "--batch-size", "4"), capsys)
    assert code == 2 and "encoding: 'hope:32' there, 'nope' now" in err[0], err
    code, err = run_cli(cli_args(text_dir, tmp_path / "none", "--encoding", "nope", "--resume"), capsys)
    assert code == 2 and "holds no run" in err[0]
    assert (sorted(os.listdir(out)), (out / "log.jsonl").read_text()) == before
    # The same run resumes, from the command line, with another split of the same global batch.
    code, err = run_cli(cli_args(text_dir, out, "--encoding", "hope:32", "--resume", "--lr", "3e-3", "--steps", "4",
                                 "--save-every", "2", "--eval-rows", "4", "--batch-size", "2", "--grad-accum", "2"),
                        capsys)
    assert code == 0, err
    assert len(losses(out / "log.jsonl")) == 4 and (out / "finetune.json").exists()
