"""benchmarks/papers: each script's quantities against independent computations on tiny inputs (closed forms,
hand-computed attention, planted outliers), and each script's --quick run (a smoke test: exit code, JSON, PNG)."""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

PAPERS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "papers"
sys.path.insert(0, str(PAPERS))

import active_dormant as AD  # noqa: E402
import barbero_rope as BR  # noqa: E402
import length_generalization as LG  # noqa: E402
import papers_common as C  # noqa: E402
import systematic_outliers as SO  # noqa: E402

import posenc  # noqa: E402
from posenc.analysis import LayerCapture  # noqa: E402


def _rotate_half_split(x, r, base):
    """x [D] float64 rotated to position r, pair i = (x[i], x[i + D/2]) at angle r * base^(-2i/D), by hand."""
    d = len(x)
    out = x.clone()
    for i in range(d // 2):
        a = r * base ** (-2 * i / d)
        c, s = math.cos(a), math.sin(a)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


# ------------------------------------------------------------------------------------------ Barbero et al.
def test_rope_activation_all_ones_closed_form_and_rotation_by_hand():
    d, base = 16, 100.0
    enc = posenc.RoPE(d, base)
    r = torch.arange(0, 60)
    ones = torch.ones(1, d, dtype=torch.float64)
    got = BR.rope_activation(ones, ones, r, enc)[0]
    # q = k = 1: each pair contributes (1,1)·R(a)(1,1) = 2 cos(a), so a(r) = 2 * sum_i cos(r * theta_i)
    expect = torch.tensor([2 * sum(math.cos(int(x) * base ** (-2 * i / d)) for i in range(d // 2)) for x in r],
                          dtype=torch.float64)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-9)
    # random q, k: the rotation written out by hand
    q, k = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    got = BR.rope_activation(q, k, r, enc)
    for n in range(3):
        for j in (0, 1, 7, 59):
            assert got[n, j].item() == pytest.approx(float(_rotate_half_split(q[n], j, base) @ k[n]), abs=1e-9)


def test_gaussian_activation_mean_zero_spread_sqrt_d():
    d, samples = 32, 4000
    r = torch.arange(0, 300, 7)
    c = BR.activation_curves(d, 10_000.0, r, samples, seed=int(torch.randint(0, 2**31, (1,))))
    mean, sem, std = (torch.tensor(c[k]) for k in ("gauss_mean", "gauss_sem", "gauss_std"))
    # E[q.R k] = 0 for independent zero-mean q, k; Var = E[k^T R^T q q^T R k] = E|k|^2 = D at every r
    assert (mean.abs() < 5 * sem).all(), mean
    torch.testing.assert_close(std, torch.full_like(std, math.sqrt(d)), rtol=0.08, atol=0)
    torch.testing.assert_close(torch.tensor(c["ones"])[0], torch.tensor(2.0 * d / 2), rtol=0, atol=1e-9)


def test_previous_token_share_by_hand():
    probs = torch.zeros(1, 2, 3, 3)
    probs[0, 0] = torch.tensor([[1, 0, 0], [0.25, 0.75, 0], [0.1, 0.6, 0.3]])  # prev: 0.25, 0.6
    probs[0, 1] = torch.tensor([[1, 0, 0], [0.9, 0.1, 0], [0.2, 0.2, 0.6]])    # prev: 0.9, 0.2
    torch.testing.assert_close(BR.previous_token_share(probs), torch.tensor([0.425, 0.55], dtype=torch.float64))


def test_attention_probs_by_hand_with_gqa_and_dropped_pairs():
    b, s, h, hk, d = 2, 5, 4, 2, 8
    q, k = torch.randn(b, s, h, d), torch.randn(b, s, hk, d)
    scale = d ** -0.5
    for drop in ((), (0,), (1, 3)):
        keep = torch.ones(d)
        for i in drop:
            keep[i] = keep[i + d // 2] = 0
        got = BR.attention_probs(q, k, scale, drop_pairs=drop)
        for bi in range(b):
            for hi in range(h):
                kv = hi // (h // hk)
                for t in range(s):
                    logits = torch.tensor([float((q[bi, t, hi] * keep) @ k[bi, j, kv]) * scale for j in range(t + 1)])
                    p = torch.softmax(logits.double(), 0)
                    torch.testing.assert_close(got[bi, hi, t, :t + 1], p, rtol=1e-6, atol=1e-7)
        assert got.triu(1).abs().max() == 0  # causal


def test_fastest_share_and_correlations():
    qe = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)  # 2 query heads
    ke = torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64)                  # 1 kv head
    torch.testing.assert_close(BR.fastest_share(qe, ke, 1), torch.tensor([0.35, 0.15], dtype=torch.float64))
    x = torch.tensor([1.0, 2.0, 2.0, 5.0])
    y = torch.tensor([3.0, 1.0, 4.0, 4.0])
    # by hand: ranks of x with ties (0, 1.5, 1.5, 3), of y (1, 0, 2.5, 2.5)
    torch.testing.assert_close(C.ranks(x), torch.tensor([0.0, 1.5, 1.5, 3.0], dtype=torch.float64))
    mx, my = x.double() - 2.5, y.double() - 3.0
    assert C.pearson(x, y) == pytest.approx(float((mx * my).sum() / (mx.norm() * my.norm())), rel=1e-12)
    rx, ry = torch.tensor([0, 1.5, 1.5, 3]) - 1.5, torch.tensor([1, 0, 2.5, 2.5]) - 1.5
    assert C.spearman(x, y) == pytest.approx(float((rx * ry).sum() / (rx.norm() * ry.norm())), rel=1e-6)
    s = C.mean_std([1.0, 2.0, 6.0])
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(math.sqrt((4 + 1 + 9) / 2))


# ---------------------------------------------------------------------------------- length generalisation
def test_copy_and_recall_batches():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    task = LG.Copy(vocab=10)
    ids, targets = task.batch(gen, 6, 20)
    for row, tgt in zip(ids, targets):
        sep = int((row == task.sep).nonzero())
        n = sep - 1
        assert row[0] == task.bos and 1 <= n <= task.max_items(20)
        assert torch.equal(row[sep + 1:sep + 1 + n], row[1:sep])               # the copy
        assert torch.equal(tgt[sep:sep + n], row[1:sep])                        # predicted after SEP, ...
        assert (tgt[:sep] == LG.IGNORE).all() and (tgt[sep + n:] == LG.IGNORE).all()
        assert (row[sep + 1 + n:] == task.pad).all()
    ids, _ = task.batch(gen, 3, 20, n=task.max_items(20))
    assert ((ids == task.sep).nonzero()[:, 1] == 10).all()

    task = LG.Recall(keys=12, values=5)
    ids, targets = task.batch(gen, 6, 30)
    for row, tgt in zip(ids, targets):
        sep = int((row == task.sep).nonzero())
        n = (sep - 1) // 2
        keys, vals = row[1:sep:2], row[2:sep:2]
        assert len(set(keys.tolist())) == n and (keys < 12).all() and ((vals >= 12) & (vals < 17)).all()
        value_of = dict(zip(keys.tolist(), vals.tolist()))
        q = row[sep + 1:sep + 1 + 2 * n:2]
        assert sorted(q.tolist()) == sorted(keys.tolist())                      # every key asked once
        for j in range(n):
            pos = sep + 1 + 2 * j
            assert tgt[pos] == value_of[int(row[pos])] == row[pos + 1]
        assert int((tgt != LG.IGNORE).sum()) == n
    with pytest.raises(ValueError, match="distinct keys"):
        task.batch(gen, 1, 100)


def test_masked_loss_accuracy_by_hand():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    targets = torch.tensor([[0, LG.IGNORE, 1]])
    loss, acc, n = LG.masked_loss_accuracy(logits, targets)
    assert n == 2 and acc == 0.5
    assert float(loss) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)
    per_pos = LG.position_losses(logits, targets)
    assert per_pos[0] == pytest.approx(-math.log(0.7)) and math.isnan(per_pos[1])


def test_text_evaluation_matches_truncated_windows(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "b.txt").write_text("pack my box with five dozen liquor jugs! " * 40)
    task = LG.Text.__new__(LG.Text)
    from posenc.data import encode_documents, load_corpus
    task.train = task.held = encode_documents(load_corpus(str(tmp_path)), None, 256)
    model = C.tiny_decoder(256, 16, 1, 2, "rope", seed=0).eval()
    got = LG.evaluate_text(model, task, 8, multiples=(1, 2, 4), count=4)
    ids, targets = task.eval_batch(32, 4)
    for n in (8, 16, 32):  # a fresh forward on windows cut to n tokens
        with torch.no_grad():
            logits = model(ids[:, :n])
        direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, :n].flatten())
        assert got[str(n)]["loss"] == pytest.approx(float(direct), rel=1e-5)
    assert math.isnan(got["8"]["loss_beyond_train"])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).transpose(1, 2), targets, reduction="none")
    assert got["32"]["loss_beyond_train"] == pytest.approx(float(nll[:, 8:].mean()), rel=1e-5)


def test_encodings_of_the_comparison():
    assert LG.encoding_args("hope", 32) == ("hope", {"context_length": 32})
    assert LG.encoding_args("prope0.25", 32) == ("prope", {"p": 0.25})
    model = LG.train_model(LG.Copy(8), "hope", 0, length=12, steps=2, batch=2, hidden=32, layers=1, heads=2, lr=1e-3)
    enc = model.attentions[0].encoding
    # head_dim 16, base 1e4: wavelengths 2*pi*1e4^(i/8) = 6.3, 19.9, ...: one fits in 12 tokens
    assert isinstance(enc, posenc.HoPE) and enc.rotated_pairs == 1


# ------------------------------------------------------------------------------------- Guo et al. (BB task)
def test_bigram_backcopy_rule():
    task = AD.BigramBackcopy(vocab=12, triggers=3, seed=int(torch.randint(0, 1000, (1,))))
    pi = task.stationary
    torch.testing.assert_close(pi @ task.P, pi)  # stationary
    assert set(task.triggers.tolist()) == set(pi.argsort(descending=True)[:3].tolist())
    x = task.batch(torch.Generator().manual_seed(1), 50, 30)
    assert (x[:, 0] == task.bos).all() and not task.is_trigger[x[:, 1]].any()
    trig = task.is_trigger[x[:, 1:-1]]
    assert trig.any()
    assert torch.equal(x[:, 2:][trig], x[:, :-2][trig])  # after a trigger: the token before it
    # the loss floor by hand
    cur, nxt = x[:, 1:-1], x[:, 2:]
    terms = [-math.log(float(task.P[c, n])) for c, n, t in zip(cur.flatten(), nxt.flatten(), trig.flatten()) if not t]
    assert task.bigram_floor(x) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_sink_share_by_hand_softmax_and_relu():
    # a 3-token softmax attention: rows sum to 1
    w = torch.tensor([[[[1.0, 0, 0], [0.8, 0.2, 0], [0.5, 0.3, 0.2]]]])
    share, zero = AD.sink_share(w, torch.tensor([[False, True, True]]))
    assert share == pytest.approx((0.8 + 0.5) / 2) and zero == 0
    share, _ = AD.sink_share(w, torch.tensor([[False, False, True]]))
    assert share == pytest.approx(0.5)
    # ReLU weights need not sum to 1; an all-zero row is counted apart
    w = torch.tensor([[[[0.4, 0, 0], [0.0, 0.0, 0], [0.3, 0.1, 0.2]]]])
    share, zero = AD.sink_share(w, torch.tensor([[False, True, True]]))
    assert share == pytest.approx(0.3 / 0.6) and zero == 0.5


def test_relu_weights_by_hand():
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])  # [b=1, s=3, h=1, d=2]
    k = torch.tensor([[[[2.0, 0.0]], [[-1.0, 3.0]], [[0.5, -4.0]]]])
    w = AD.relu_weights(q, k, 1.0)[0, 0]
    expect = torch.tensor([[2.0, 0, 0], [0.0, 3.0, 0], [2.0, 2.0, 0.0]]) / torch.tensor([[1.0], [2.0], [3.0]])
    torch.testing.assert_close(w, expect)


@pytest.mark.parametrize("attention", ["softmax", "relu"])
def test_internals_reproduce_the_layers(attention):
    task = AD.BigramBackcopy(vocab=10, triggers=2, seed=0)
    model = AD.make_model(task, attention, hidden=32, layers=2, seed=0)
    ids = task.batch(torch.Generator().manual_seed(0), 4, 12)
    recs = AD.internals(model, ids)
    assert all(r["recompute_error"] < 1e-5 for r in recs)
    if attention == "softmax":
        torch.testing.assert_close(recs[0]["weights"].sum(-1), torch.ones(4, 1, 12))
    else:
        assert isinstance(model.layers[0].attn, AD.ReLUAttention)
    h = recs[0]["h"]
    norms = h.double().norm(dim=-1)
    expect = (norms[:, 0].mean() / norms[:, 1:].flatten().median())
    assert AD.norm_ratio(h) == pytest.approx(float(expect), rel=1e-9)


# ------------------------------------------------------------------------------------------- An et al.
def test_massive_entries_attention_received_value_ratio():
    h = torch.ones(1, 4, 3)
    h[0, 0, 2] = -500.0
    h[0, 2, 1] = 150.0
    assert SO.massive_entries(h, 100) == [(0, 0, 2, -500.0), (0, 2, 1, 150.0)]
    assert SO.massive_entries(h, 200) == [(0, 0, 2, -500.0)]
    probs = torch.zeros(2, 1, 3, 3)
    probs[0, 0] = torch.tensor([[1, 0, 0], [0.7, 0.3, 0], [0.6, 0.1, 0.3]])
    probs[1, 0] = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.5, 0.3]])
    # row 0: token 0 gets 0.7, 0.6 from queries 1, 2; row 1: token 1 gets 0.5 from query 2
    got = SO.attention_received(probs, [[0], [1]])
    assert float(got[0]) == pytest.approx((0.65 + 0.5) / 2)
    v = torch.ones(1, 4, 1, 2)
    v[0, 0] *= 0.1  # |v| = 0.1 * sqrt(2) at token 0, sqrt(2) elsewhere
    assert SO.value_norm_ratio(v, [[0]]) == pytest.approx(0.1)


def test_outlier_lineup_on_planted_outliers():
    b, s, hidden, heads, d, n_layers = 1, 6, 8, 2, 4, 4
    records, mlp_out = [], []
    h = torch.randn(b, s, hidden) * 0.1 + 1.0
    for layer in range(n_layers):
        mlp = torch.zeros(b, s, hidden)
        if layer == 1:
            mlp[0, 0, 3] = 1000.0  # layer 1's MLP writes a massive entry at token 0, dim 3
        h = h + mlp
        probs = torch.full((b, heads, s, s), 0.0)
        for t in range(s):
            if layer >= 2:  # from the layer after, attention sinks on token 0
                probs[0, :, t, 0] = 0.9 if t else 1.0
                probs[0, :, t, 1:t + 1] = 0.1 / t if t else 0.0
            else:
                probs[0, :, t, :t + 1] = 1.0 / (t + 1)
        v = torch.ones(b, s, 1, d)
        if layer >= 2:
            v[0, 0] = 0.05
        records.append(LayerCapture(index=layer, residual=h.clone(), probs=probs, v=v))
        mlp_out.append(mlp)
    w = torch.full((hidden, 5), 0.01)
    w[3, 2] = 2.0
    out = SO.outlier_lineup(records, mlp_out, [w] * n_layers, threshold=100)
    assert out["onset_layer"] == 1 and out["tokens"] == [[0]] and out["dims"] == [3]
    o = out["origin"]
    assert (o["token"], o["dim"]) == (0, 3) and o["mlp_output"] == pytest.approx(1000.0)
    assert abs(o["attention_output"]) < 1e-3 and o["down_proj_rows_with_larger_max"] == 0
    att = {a["layer"]: a for a in out["attention"]}
    assert att[3]["attention_on_massive"] == pytest.approx(0.9) and att[3]["value_ratio_massive"] == pytest.approx(0.05)
    uniform = sum(1 / (t + 1) for t in range(1, s)) / (s - 1)
    assert att[0]["attention_on_massive"] == pytest.approx(uniform)
    assert out["summary"]["attention_on_massive_after"] == pytest.approx(0.9)
    assert out["summary"]["most_attended_is_massive_after"] == 1.0


@pytest.fixture(scope="module")
def tiny_finetuned(tmp_path_factory):
    """Two tiny-llama runs of posenc finetune (2 steps on 20 stdlib files): HoPE and p-RoPE 0.25, with the
    saved q and k projections then scaled by 10. A random tiny model attends almost uniformly, so RoPE and
    p-RoPE 0.25 give it text losses 3e-6 apart, within the tolerance that checks which one the analysis ran;
    sharper attention puts them ~6e-3 apart."""
    from safetensors.torch import load_file, save_file

    from posenc.training import FinetuneArgs, finetune
    root = tmp_path_factory.mktemp("finetuned")
    dirs = {}
    for name, spec in (("hope", "hope"), ("prope", "prope:0.25")):
        dirs[name] = root / name
        finetune(FinetuneArgs(model="tiny-llama", encoding=spec, output=str(dirs[name]), seq_len=32, steps=2,
                              batch_size=2, warmup=1, eval_rows=2, max_documents=20, save_every=0,
                              dtype="float32", device="cpu", quiet=True))
        weights = load_file(dirs[name] / "model.safetensors")
        weights = {k: w * 10 if k.endswith(("q_proj.weight", "k_proj.weight")) else w for k, w in weights.items()}
        save_file(weights, dirs[name] / "model.safetensors", metadata={"format": "pt"})
    return dirs


def _text_loss(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:]) / 2
                 + torch.nn.functional.cross_entropy(logits[1, :-1].double(), ids[1, 1:]) / 2)


def test_quick_run_with_two_finetuned_models(tiny_finetuned, tmp_path):
    from posenc.analysis import load_model
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = subprocess.run([sys.executable, str(PAPERS / "systematic_outliers.py"), "--quick", "--json", str(out),
                           "--plot", str(png), "--finetuned", str(tiny_finetuned["hope"]),
                           "--finetuned", str(tiny_finetuned["prope"])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(SO.VARIANTS) + 2
    base, _, _ = load_model("tiny-llama")
    ids, _ = C.real_model_inputs(None, base.config.vocab_size, 48)
    for r, name, encoding in zip(results[-2:], ("hope", "prope"), ("hope", "prope:0.25")):
        record = json.loads((tiny_finetuned[name] / "finetune.json").read_text())
        assert r["label"] == f"fine-tuned ({name})" and r["finetune"]["encoding"] == encoding
        assert r["finetune"]["steps"] == 2 and r["finetune"]["eval_loss"] == record["final"]["eval_loss"]
        # the analysis ran the patched model: its loss is the reloaded patched model's, not RoPE's
        model, _, _ = load_model(str(tiny_finetuned[name]))
        assert posenc.is_patched(model) and r["patch"]["encoding"] == name
        assert r["loss"] == pytest.approx(_text_loss(model, ids), rel=1e-5)
        posenc.unpatch(model)
        assert r["loss_unpatched"] == pytest.approx(_text_loss(model, ids), rel=1e-5)
    assert results[-1]["patch"]["p"] == 0.25
    # p-RoPE 0.25 is not RoPE here: the gap is >15x the tolerance above, so those checks tell the two apart
    assert abs(results[-1]["loss"] - results[-1]["loss_unpatched"]) > 1e-3
    assert "fine-tuned (prope)" in proc.stdout


def test_finetune_record_reads_finetune_json(tiny_finetuned, tmp_path):
    record = json.loads((tiny_finetuned["prope"] / "finetune.json").read_text())
    got = SO.finetune_record(str(tiny_finetuned["prope"]))
    assert got["encoding"] == "prope:0.25" and got["steps"] == 2 and got["seq_len"] == 32 and got["seed"] == 0
    assert got["eval_loss_before"] == record["final"]["eval_loss_before"] and got["lr"] == record["lr"]
    assert got["command"] == record["command"]
    assert SO.finetune_record(str(tmp_path)) is None  # no finetune.json: nothing to report, not an error
    for text in ("{not json", "[1, 2]", '{"args": [1], "final": {}}'):
        (tmp_path / "finetune.json").write_text(text)
        with pytest.raises(ValueError, match="finetune.json"):
            SO.finetune_record(str(tmp_path))


def test_finetuned_model_is_checked_against_the_analysed_model_and_its_record(tiny_finetuned):
    from posenc.analysis import load_model
    from posenc.hf import current_patch
    base, _, _ = load_model("tiny-llama")
    other, _, _ = load_model("tiny-qwen3")
    model, _, _ = load_model(str(tiny_finetuned["hope"]))
    patch = current_patch(model)
    record = SO.finetune_record(str(tiny_finetuned["hope"]))
    SO._check_finetuned("d", model, base.config, record, patch)  # the right pairing passes
    SO._check_finetuned("d", model, base.config, None, patch)  # no finetune.json: only the shape is checked
    with pytest.raises(ValueError, match="not a fine-tune of the analysed model"):
        SO._check_finetuned("d", model, other.config, record, patch)
    for encoding, message in (("prope:0.25", "loads with"), ("original", "loads patched"),
                              (f"hope:{patch['context_length'] + 1}", "loads with")):
        with pytest.raises(ValueError, match=message):
            SO._check_finetuned("d", model, base.config, dict(record, encoding=encoding), patch)
    SO._check_finetuned("d", model, base.config, dict(record, encoding=f"hope:{patch['context_length']}"), patch)
    with pytest.raises(ValueError, match="loads unpatched"):
        SO._check_finetuned("d", model, base.config, record, None)


def test_finetuned_directory_that_loads_unpatched_is_a_user_error(tiny_finetuned, tmp_path):
    import shutil
    broken = tmp_path / "unpatched"
    shutil.copytree(tiny_finetuned["hope"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (broken / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(PAPERS / "systematic_outliers.py"), "--quick", "--finetuned",
                           str(broken)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "loads unpatched" in proc.stderr, proc.stderr[-2000:]
    (broken / "finetune.json").write_text("{not json")
    proc = subprocess.run([sys.executable, str(PAPERS / "systematic_outliers.py"), "--quick", "--finetuned",
                           str(broken)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


# ------------------------------------------------------------------------------------------ --quick runs
@pytest.mark.parametrize("script,keys", [
    ("barbero_rope.py", {"activation", "model"}),
    ("length_generalization.py", {"rows", "runs", "corpus"}),
    ("active_dormant.py", {"runs", "bigram_floor"}),
    ("systematic_outliers.py", {"results", "token_strings"}),
])
def test_quick_run(script, keys, tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = subprocess.run([sys.executable, str(PAPERS / script), "--quick", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert keys <= set(result) and result["settings"]["quick"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.strip()
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind


def test_bad_output_path_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, str(PAPERS / "barbero_rope.py"), "--quick", "--json",
                           str(tmp_path / "missing" / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
