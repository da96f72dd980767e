"""`posenc eval` and posenc.evaluation on tiny random models: perplexity against an independent computation from
the model's own logits, position buckets, passkey scoring with stub models that answer right or wrong, several
encodings in one run against separate runs, the model left unpatched, PEFT adapters, and the command's outputs
and clean errors."""
import json
import math
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
import posenc  # noqa: E402
from posenc import evaluation as E  # noqa: E402
from posenc.cli import main  # noqa: E402
from posenc.data import windows as make_windows  # noqa: E402
from posenc.specs import parse_specs  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = E.load_eval_model("tiny-llama")
    assert tok is None and model.config._attn_implementation == "sdpa"
    return model


def _docs(vocab, lengths):
    return [torch.randint(0, vocab, (n,)) for n in lengths]


def _independent_losses(model, windows):
    """Per-token NLL of each window, one window at a time, with plain torch cross_entropy in float64."""
    rows = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()
            rows.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return torch.stack(rows)  # [n, L-1]


# ------------------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("length, batch, ce_tokens", [(40, 2, 32_768), (97, 3, 50), (16, 64, 7)])
def test_perplexity_equals_independent_exp_mean_loss(tiny, monkeypatch, length, batch, ce_tokens):
    monkeypatch.setattr(E, "_CE_TOKENS", ce_tokens)  # small values: the loss is taken in several chunks
    windows = make_windows(_docs(tiny.config.vocab_size, [300, 57, 131, 260]), length, max_windows=7)
    assert windows.shape[0] >= 2
    got = E.perplexity(tiny, windows, batch_size=batch, buckets=5)
    ref = _independent_losses(tiny, windows)
    assert got["windows"] == windows.shape[0] and got["tokens"] == ref.numel()
    assert got["loss"] == pytest.approx(ref.mean().item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)
    assert got["window_losses"] == pytest.approx(ref.mean(1).tolist(), rel=1e-5)
    # Buckets partition the predicted positions 1..L-1, equal the per-position means, and average back.
    edges = [(b["start"], b["end"]) for b in got["buckets"]]
    assert edges[0][0] == 1 and edges[-1][1] == length and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    for b in got["buckets"]:
        assert b["loss"] == pytest.approx(ref[:, b["start"] - 1:b["end"] - 1].mean().item(), rel=1e-5)
    weighted = sum(b["loss"] * b["tokens"] for b in got["buckets"]) / sum(b["tokens"] for b in got["buckets"])
    assert weighted == pytest.approx(got["loss"], rel=1e-12)


def test_evaluate_perplexity_is_on_the_models_own_logits(tiny):
    docs = _docs(tiny.config.vocab_size, [200, 90, 400])
    lengths = [32, 64, 512]
    windows = {L: make_windows(docs, L, max_windows=4) for L in lengths}
    result = E.evaluate(tiny, None, parse_specs("original"), lengths, windows=windows)
    rows = {r["length"]: r for r in result["results"][0]["perplexity"]}
    for L in (32, 64):
        ref = _independent_losses(tiny, windows[L])
        assert rows[L]["perplexity"] == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)
        assert result["text"]["windows"][str(L)] == windows[L].shape[0]
    assert rows[512] == {"length": 512, "skipped": "no document reaches 512 tokens"}


# ------------------------------------------------------------------------------------------- passkey
class StubLM(torch.nn.Module):
    """A byte-level 'model' that reads the key from the prompt and answers it (right) or another number
    (wrong), one token per call, through the KV-cache interface greedy_generate uses."""

    def __init__(self, right: bool):
        super().__init__()
        self.right = right
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(vocab_size=256, model_type="stub")
        self.prompts = []

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        if cache is None:
            answers = []
            for row in input_ids.tolist():
                text = bytes(row).decode()
                self.prompts.append(text)
                key = re.findall(r"pass key is (\d{5})\.", text)
                assert len(key) == 1, "the key must be stated exactly once"
                value = key[0] if self.right else str(100_000 - int(key[0]) - 1)  # another 5-digit number
                answers.append(f" {value}.".encode())
            cache = {"answers": answers, "step": 0}
        else:
            cache = dict(cache, step=cache["step"] + 1)
        logits = torch.full((input_ids.shape[0], 1, 256), -1e9)
        for i, ans in enumerate(cache["answers"]):
            logits[i, 0, ans[min(cache["step"], len(ans) - 1)]] = 0.0
        return types.SimpleNamespace(logits=logits, cache=cache)


@pytest.mark.parametrize("right", [True, False])
def test_passkey_scoring_with_a_stub_model(right):
    stub = StubLM(right)
    enc = E.TextEncoder(None, 256)
    plan = E.passkey_plan(enc, [200, 600, 1500], (0.0, 0.5, 1.0), trials=3, seed=7)
    rows = E.passkey(stub, enc, plan, batch_size=2)
    cells = [r for r in rows if "skipped" not in r]
    assert len(cells) == 9 and all(r["trials"] == 3 for r in cells)
    assert all(r["accuracy"] == (1.0 if right else 0.0) for r in cells)
    assert len(stub.prompts) == 27


def test_passkey_prompts():
    enc = E.TextEncoder(None, 256)
    limit = 700 - E.passkey_answer_tokens(enc)
    starts = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        key = E.passkey_key(3, 700, depth, 0)
        ids = E.passkey_prompt(enc, 700, depth, key)
        assert 10_000 <= key <= 99_999 and len(ids) <= limit
        assert len(ids) > limit - 80  # filled with filler up to about the length (whole sentences)
        text = enc.decode(ids)
        assert text.count(str(key)) == 1 and text.endswith(E.PASSKEY_QUESTION)
        starts.append(text.index(str(key)) / len(text))
    assert starts == sorted(starts) and starts[0] < 0.25 and starts[-1] > 0.85
    assert E.passkey_prompt(enc, 60, 0.5, 12345) is None  # does not fit
    # Fixed seeds: the same keys every time, different across trials.
    assert E.passkey_key(0, 512, 0.5, 1) == E.passkey_key(0, 512, 0.5, 1) != E.passkey_key(0, 512, 0.5, 2)
    assert E.passkey_answer_correct(" 12345.", 12345) and E.passkey_answer_correct("is 12345", 12345)
    assert not E.passkey_answer_correct(" 123456", 12345) and not E.passkey_answer_correct(" 54321 12345", 12345)
    assert not E.passkey_answer_correct("none", 12345)


def test_greedy_generate_matches_step_by_step_argmax(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 20))
    got = E.greedy_generate(tiny, ids, 4)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(4):  # no cache: the whole sequence each step
            nxt = tiny(input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(got, seq[:, 20:])


# ------------------------------------------------------------------------------------------- encodings
def _strip(result):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result["results"]]


def test_several_encodings_in_one_run_equal_separate_runs(tiny):
    docs = _docs(tiny.config.vocab_size, [300, 200, 150])
    lengths = [48, 128]
    windows = {L: make_windows(docs, L, max_windows=3) for L in lengths}
    before = tiny(input_ids=windows[48]).logits
    specs = parse_specs("original,hope:32,nope@0-1,prope:0.5,rope")
    kw = dict(windows=windows, passkey_trials=1, passkey_depths=(0.5,), buckets=3)
    together = _strip(E.evaluate(tiny, None, specs, lengths, **kw))
    apart = [_strip(E.evaluate(tiny, None, [s], lengths, **kw))[0] for s in specs]
    assert together == apart
    losses = {r["encoding"]: r["perplexity"][1]["loss"] for r in together}
    assert losses["nope@0-1"] != losses["original"] and losses["hope:32"] != losses["original"]
    assert losses["rope"] == pytest.approx(losses["original"], rel=1e-5)  # kernel only: same numbers
    assert not posenc.is_patched(tiny)
    assert torch.equal(tiny(input_ids=windows[48]).logits, before)


def test_model_unpatched_when_a_spec_fails_midway(tiny, monkeypatch):
    windows = {32: torch.randint(0, 64, (2, 32))}
    real = E.perplexity
    calls = []

    def failing(model, w, **kw):
        calls.append(posenc.is_patched(model))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(model, w, **kw)

    monkeypatch.setattr(E, "perplexity", failing)
    with pytest.raises(RuntimeError, match="boom"):
        E.evaluate(tiny, None, parse_specs("original,nope"), [32], windows=windows)
    assert calls == [False, True] and not posenc.is_patched(tiny)


def test_a_patched_model_is_original_as_loaded_and_restored(tiny):
    windows = {40: torch.randint(0, tiny.config.vocab_size, (3, 40))}
    ref = _strip(E.evaluate(tiny, None, parse_specs("hope:32@1-2"), [40], windows=windows))[0]
    posenc.patch(tiny, "hope", context_length=32, layers=[1, 2])
    try:
        loaded = E.current_patch(tiny)
        assert loaded == {"encoding": "hope", "kernel": True, "layers": [1, 2], "context_length": 32}
        got = _strip(E.evaluate(tiny, None, parse_specs("original,nope"), [40], windows=windows))
        assert got[0]["perplexity"] == ref["perplexity"]
        assert E.current_patch(tiny) == loaded  # left as it was found
    finally:
        posenc.unpatch(tiny)


def test_run_eval_original_on_a_checkpoint_saved_patched_is_its_patch(tmp_path):
    """`posenc eval DIR` on a checkpoint saved patched (what `posenc finetune --encoding nope` writes): the
    up-front spec check unpatched the model, so `original` measured the unpatched model (rope's figures)."""
    from hf_tiny import tiny_model
    posenc.patch(tiny_model("llama"), "nope").save_pretrained(tmp_path / "nope-model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}." for i in range(400)))
    result = E.run_eval(str(tmp_path / "nope-model"), encodings="original,rope,nope", lengths="24,48",
                        text_path=str(text), max_windows=3, device="cpu", log=lambda msg: None)
    assert result["model"]["loaded_patch"] == {"encoding": "nope", "kernel": True, "layers": None}
    got = {r["encoding"]: r["perplexity"] for r in result["results"]}
    assert got["original"] == got["nope"]
    assert got["original"] != got["rope"]  # (a random tiny model barely uses positions: close, but not equal)


def test_check_specs_leaves_a_patched_model_as_loaded(tiny):
    windows = {40: torch.randint(0, tiny.config.vocab_size, (2, 40))}
    posenc.patch(tiny, "prope", p=0.5)
    try:
        loaded = E.current_patch(tiny)
        E.check_specs(tiny, parse_specs("rope,nope,original"), loaded)
        assert E.current_patch(tiny) == loaded
        got = _strip(E.evaluate(tiny, None, parse_specs("original,prope:0.5"), [40], windows=windows))
        assert got[0]["perplexity"] == got[1]["perplexity"]
        assert E.current_patch(tiny) == loaded
    finally:
        posenc.unpatch(tiny)


@pytest.mark.parametrize("kwargs", [dict(encoding="hope", layers="full_attention", context_length=16),
                                    dict(encoding="nope"), dict(encoding="prope", p=0.5, layers=[0, 3])])
def test_current_patch_reproduces_a_gemma3_patch(kwargs):
    from hf_tiny import tiny_model
    model = tiny_model("gemma3_text")
    assert E.current_patch(model) is None
    posenc.patch(model, **kwargs)
    found = E.current_patch(model)
    before = json.dumps(model.config.rope_parameters, sort_keys=True)
    posenc.unpatch(model)
    posenc.patch(model, **found)
    assert json.dumps(model.config.rope_parameters, sort_keys=True) == before


def test_check_specs_names_the_spec(tiny):
    with pytest.raises(E.EvalError, match=r"encoding 'nope@9'.*out of range"):
        E.check_specs(tiny, parse_specs("original,nope@9"))
    assert not posenc.is_patched(tiny)


# ------------------------------------------------------------------------------------------- models
def test_trained_context_and_learned_positions(tmp_path):
    import transformers
    from hf_tiny import tiny_model
    llama = tiny_model("llama")  # llama3 rope scaling, original_max_position_embeddings 64
    assert E.trained_context(llama.config) == 64 and E.learned_position_limit(llama) is None
    assert E.trained_context(tiny_model("qwen3").config) == 256
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_positions=48, n_embd=32,
                                                                n_layer=1, n_head=2))
    assert E.learned_position_limit(gpt2) == 48 and E.trained_context(gpt2.config) == 48


def test_peft_adapter_directory(tmp_path):
    peft = pytest.importorskip("peft")
    from hf_tiny import tiny_model
    model = tiny_model("qwen3", attn="sdpa")
    posenc.patch(model, "hope", context_length=64)
    base_dir, adapter_dir, both_dir = (str(tmp_path / n) for n in ("base", "adapter", "both"))
    model.save_pretrained(base_dir)
    model.save_pretrained(both_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter changes the outputs
    lora.peft_config["default"].base_model_name_or_path = base_dir
    lora.save_pretrained(adapter_dir)
    lora.save_pretrained(both_dir)
    ids = torch.randint(0, 96, (1, 24))
    with torch.no_grad():
        want = lora(input_ids=ids).logits
    for d in (adapter_dir, both_dir):
        merged, _, name = E.load_eval_model(d)
        assert "LoRA adapter" in name and posenc.is_patched(merged)
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base_only = E.load_eval_model(base_dir)[0](input_ids=ids).logits
    assert not torch.allclose(base_only, want, atol=1e-3)  # the adapter mattered
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "nowhere/model"}))
    with pytest.raises(ValueError, match="not a local directory"):
        E.load_eval_model(str(orphan))


# ------------------------------------------------------------------------------------------- the command
def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tiny_preset_up_to_1024(capsys, tmp_path):
    """The CI-sized run: a tiny preset, lengths up to 1024, three encodings, passkey, JSON and PNGs."""
    out_json, plots = str(tmp_path / "eval.json"), str(tmp_path / "plots")
    code, out, err = run_main(capsys, "eval", "tiny-llama", "--lengths", "128,256,512,1024", "--encoding",
                              "original,hope,nope", "--passkey", "--passkey-trials", "2", "--json", out_json,
                              "--plot", plots)
    assert code == 0, err
    assert "Traceback" not in err and "eval" in err  # the progress bar
    assert "original" in out and "passkey accuracy" in out and "trained context: 512" in out
    r = json.load(open(out_json))
    assert r["settings"]["lengths"] == [128, 256, 512, 1024] and r["settings"]["encodings"] == ["original", "hope",
                                                                                                  "nope"]
    assert r["text"]["source"].startswith("python-stdlib") and len(r["text"]["sha256"]) == 64
    assert r["text"]["tokens_read"] > 0 and r["model"]["trained_context"] == 512
    for res in r["results"]:
        assert [p["length"] for p in res["perplexity"]] == [128, 256, 512, 1024]
        for p in res["perplexity"]:
            assert p["windows"] == 8 and p["tokens"] == 8 * (p["length"] - 1)
            assert p["perplexity"] == pytest.approx(math.exp(p["loss"]))
        cells = [c for c in res["passkey"] if "skipped" not in c]
        assert {c["length"] for c in cells} == {256, 512, 1024} and all(c["trials"] == 2 for c in cells)
    assert sorted(os.listdir(plots)) == ["loss_by_position.png", "passkey_hope.png", "passkey_nope.png",
                                         "passkey_original.png", "perplexity.png"]


def test_cli_text_file_is_recorded(capsys, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("It was a quiet morning in the valley. " * 40)
    out_json = str(tmp_path / "e.json")
    code, out, err = run_main(capsys, "eval", "tiny-qwen3", "--lengths", "64,4096", "--text-file", str(book),
                              "--json", out_json, "--quiet")
    assert code == 0, err
    r = json.load(open(out_json))
    assert r["text"]["source"] == str(book) and r["text"]["documents"] == 1
    assert r["text"]["tokens_read"] == len(book.read_bytes())  # random model: one token per byte
    assert r["results"][0]["perplexity"][1] == {"length": 4096, "skipped": "no document reaches 4096 tokens"}
    assert "skipped" in out


def _gpt2_config(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 96, "n_positions": 64, "n_embd": 32,
                                "n_layer": 1, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}))
    return str(path)


def test_cli_original_on_a_model_with_learned_positions(capsys, tmp_path):
    code, out, err = run_main(capsys, "eval", _gpt2_config(tmp_path), "--lengths", "32,64", "--quiet")
    assert code == 0, err
    assert "original" in out and "trained context: 64" in out


@pytest.mark.parametrize("case", ["missing-model", "bad-spec", "cannot-take", "layer-range", "learned-table",
                                  "little-text", "json-dir-missing", "plot-is-file", "bad-lengths", "short-length",
                                  "bad-depth", "missing-text"])
def test_cli_errors_are_one_line_exit_2_nothing_written(capsys, tmp_path, case):
    out_json, plots = str(tmp_path / "out" / "e.json"), str(tmp_path / "out" / "plots")
    (tmp_path / "out").mkdir()
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("hello there")
    argv = {
        "missing-model": (["no/such/model"], "no such model directory"),
        "bad-spec": (["tiny-llama", "--encoding", "original,hope:x"], "bad encoding spec 'hope:x'"),
        "cannot-take": ([_gpt2_config(tmp_path), "--encoding", "original,hope", "--lengths", "32"],
                        "encoding 'hope'"),
        "layer-range": (["tiny-llama", "--encoding", "nope@7"], "out of range"),
        "learned-table": ([_gpt2_config(tmp_path), "--lengths", "32,128"], "learned position table (64"),
        "little-text": (["tiny-llama", "--text-file", str(tiny_text), "--lengths", "64"], "too little text"),
        "json-dir-missing": (["tiny-llama", "--json", str(tmp_path / "nowhere" / "e.json")], "no such directory"),
        "plot-is-file": (["tiny-llama", "--plot", str(tiny_text)], "is not a directory"),
        "bad-lengths": (["tiny-llama", "--lengths", "64,abc"], "context lengths"),
        "short-length": (["tiny-llama", "--lengths", "1,64"], "at least 2"),
        "bad-depth": (["tiny-llama", "--passkey", "--passkey-depths", "0.5,2"], "[0, 1]"),
        "missing-text": (["tiny-llama", "--text-file", str(tmp_path / "none.txt")], "does not exist"),
    }[case]
    args, needle = argv
    extra = [] if "--json" in args or "--plot" in args else ["--json", out_json, "--plot", plots]
    code, out, err = run_main(capsys, "eval", *args, *extra, "--quiet")
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    errors = [line for line in err.splitlines() if line.startswith("posenc eval: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    assert os.listdir(tmp_path / "out") == []  # nothing written, not even a temporary file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cli_cuda_without_a_gpu(capsys):
    code, _, err = run_main(capsys, "eval", "tiny-llama", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err
