"""posenc.analysis.quant: simulated quantization against hand-computed values, the logit-error split against
explicit loops, the injection against a hand-written attention on the captured inputs, a planted outlier pair in
a tiny model, and the CLI."""
import json
import math

import pytest
import torch

import posenc
from posenc.analysis import capture, load_model, tokenize, DEFAULT_TEXT
from posenc.analysis import quant as Q
from posenc.cli import main


def planted(n_ones=7, outlier=100.0, channel=5, tokens=1, heads=1, dim=8):
    """bhsd tensor of ones with one outlier channel."""
    x = torch.ones(1, heads, tokens, dim, dtype=torch.float64)
    x[..., channel] = outlier
    return x


# ------------------------------------------------------------------------------------------- fake_quantize
def test_int8_tensor_absmax_by_hand():
    x = planted()                                           # [1, 1, 1, 8]: seven ones and a 100
    y = Q.fake_quantize(x, "int8", "tensor")
    # scale = 100/127; 1 / scale = 1.27 rounds to 1, so each 1 comes back as 100/127; 100 comes back exactly
    expect = torch.full_like(x, 100 / 127)
    expect[..., 5] = 100.0
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=0)
    rel = math.sqrt(7 * (1 - 100 / 127) ** 2 / (7 + 100 ** 2))
    assert float(((y - x).square().sum() / x.square().sum()).sqrt()) == pytest.approx(rel, rel=1e-12)
    # small values: 0.5 -> 0.635 rounds to 1; -0.3 -> -0.381 rounds to 0
    x2 = x.clone()
    x2[..., 0], x2[..., 1] = 0.5, -0.3
    y2 = Q.fake_quantize(x2, "int8")
    assert y2[..., 0].item() == pytest.approx(100 / 127, rel=1e-12) and y2[..., 1].item() == 0.0


def test_int4_and_fp8_by_hand():
    x = planted()
    x[..., 0] = 30.0
    y = Q.fake_quantize(x, "int4")                          # scale 100/7: 1 -> 0.07 -> 0; 30 -> 2.1 -> 2
    assert y[..., 1].item() == 0.0
    assert y[..., 0].item() == pytest.approx(200 / 7, rel=1e-12)
    assert y[..., 5].item() == pytest.approx(100.0, rel=1e-12)
    # e4m3: scale 100/448; 1 -> 4.48, nearest e4m3 (spacing 0.5 in [4, 8)) is 4.5 -> 4.5 * 100/448
    y = Q.fake_quantize(planted(), "fp8_e4m3")
    assert y[..., 0].item() == pytest.approx(4.5 * 100 / 448, rel=1e-12)
    assert y[..., 5].item() == pytest.approx(100.0, rel=1e-12)
    # e5m2: scale 100/57344; 1 -> 573.44, nearest e5m2 (spacing 128 in [512, 1024)) is 512
    y = Q.fake_quantize(planted(), "fp8_e5m2")
    assert y[..., 0].item() == pytest.approx(512 * 100 / 57344, rel=1e-12)
    assert torch.equal(Q.fake_quantize(planted(), "fp8"), Q.fake_quantize(planted(), "fp8_e4m3"))


def test_granularities_isolate_the_outlier():
    x = torch.ones(1, 2, 3, 8, dtype=torch.float64)
    x[0, 0, 1, 5] = 100.0                                   # head 0, token 1, channel 5
    exact = torch.ones_like(x, dtype=torch.bool)
    # tensor: everything else coarse; head: head 1 exact; channel: every other channel exact; token: other tokens
    t = Q.fake_quantize(x, "int8", "tensor")
    assert torch.allclose(t[0, 1], torch.full_like(t[0, 1], 100 / 127))
    h = Q.fake_quantize(x, "int8", "head")
    assert torch.equal(h[0, 1], x[0, 1]) and h[0, 0, 0, 0].item() == pytest.approx(100 / 127)
    c = Q.fake_quantize(x, "int8", "channel")
    exact[0, 0, :, 5] = False                               # channel 5 of head 0: scale 100/127 (ones -> 100/127)
    assert torch.equal(c[exact], x[exact])
    assert c[0, 0, 0, 5].item() == pytest.approx(100 / 127) and c[0, 0, 1, 5].item() == pytest.approx(100.0)
    k = Q.fake_quantize(x, "int8", "token")
    assert torch.equal(k[0, 0, [0, 2]], x[0, 0, [0, 2]]) and torch.equal(k[0, 1], x[0, 1])
    assert k[0, 0, 1, 0].item() == pytest.approx(100 / 127)


def test_keep_pairs_keeps_the_outlier_pair():
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64) * 0.1
    x[0, 0, :, 5] += 50.0                                   # half-split: channel 5 belongs to pair 1 (1, 5)
    y = Q.fake_quantize(x, "int8", "tensor", keep_pairs=1)
    assert torch.equal(y[0, 0, :, [1, 5]], x[0, 0, :, [1, 5]])
    # the rest is quantized with one scale: the absmax of what neither head kept (head 1 keeps its own top pair)
    top1 = x[0, 1].abs().amax(0).view(2, 4).amax(0).argmax().item()
    masked = x.clone()
    masked[0, 0, :, [1, 5]] = 0
    masked[0, 1, :, [top1, top1 + 4]] = 0
    scale = float(masked.abs().max()) / 127
    rest = [c for c in range(8) if c not in (1, 5)]
    torch.testing.assert_close(y[0, 0][:, rest], (x[0, 0][:, rest] / scale).round() * scale, rtol=1e-12, atol=1e-15)
    assert torch.equal(y[0, 1, :, [top1, top1 + 4]], x[0, 1, :, [top1, top1 + 4]])
    # interleaved pairs (2i, 2i+1): channel 5 is in pair 2 (4, 5)
    yi = Q.fake_quantize(x, "int8", "tensor", keep_pairs=1, interleaved=True)
    assert torch.equal(yi[0, 0, :, [4, 5]], x[0, 0, :, [4, 5]]) and not torch.equal(yi[0, 0, :, 1], x[0, 0, :, 1])


def test_fake_quantize_rejects_bad_input():
    x = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="format"):
        Q.fake_quantize(x, "int7")
    with pytest.raises(ValueError, match="granularity"):
        Q.fake_quantize(x, "int8", "row")
    with pytest.raises(ValueError, match="keep_pairs"):
        Q.fake_quantize(x, "int8", keep_pairs=5)
    with pytest.raises(TypeError, match="head_dim"):
        Q.fake_quantize(torch.randn(2, 8), "int8")
    with pytest.raises(ValueError, match="tensors"):
        Q.QuantScheme("int8", tensors="qx")
    assert torch.equal(Q.fake_quantize(torch.zeros(1, 1, 2, 8)), torch.zeros(1, 1, 2, 8))  # no division by 0
    assert Q.fake_quantize(x.bfloat16()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- logit errors
def test_logit_errors_against_loops():
    b, h, kv, s, d = 1, 4, 2, 5, 6
    q, k = torch.randn(b, h, s, d, dtype=torch.float64), torch.randn(b, kv, s, d, dtype=torch.float64)
    qh, kh = q + 0.1 * torch.randn_like(q), k + 0.1 * torch.randn_like(k)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    allowed[3, 1] = False                                  # a hole in the mask
    scaling = 0.37
    out = Q.logit_errors(q, k, qh, kh, allowed[None, None], scaling, chunk_elements=7)  # chunks of 1 query
    for head in range(h):
        g = head // (h // kv)
        err2 = clean2 = count = 0.0
        pair = [0.0] * (d // 2)
        for i in range(s):
            for j in range(s):
                if not allowed[i, j]:
                    continue
                clean = scaling * float(q[0, head, i] @ k[0, g, j])
                err2 += (scaling * float(qh[0, head, i] @ kh[0, g, j]) - clean) ** 2
                clean2 += clean ** 2
                count += 1
                for p in range(d // 2):
                    c = [p, p + d // 2]
                    dp = float(qh[0, head, i, c] @ kh[0, g, j, c] - q[0, head, i, c] @ k[0, g, j, c])
                    pair[p] += (scaling * dp) ** 2
        assert out["err2"][head].item() == pytest.approx(err2, rel=1e-10)
        assert out["clean2"][head].item() == pytest.approx(clean2, rel=1e-10)
        assert out["count"][head].item() == count
        assert out["pair_err2"][head].tolist() == pytest.approx(pair, rel=1e-10)


# ------------------------------------------------------------------------------------------- injection
def _ids(model, n=24):
    return tokenize(DEFAULT_TEXT, None, model.config.vocab_size, n)


def test_quantized_attention_equals_hand_attention_on_quantized_inputs():
    model, _, _ = load_model("tiny-llama", seed=1)
    ids = _ids(model)
    with torch.no_grad():
        clean_logits = model(input_ids=ids).logits
        with capture(model) as records:
            model(input_ids=ids)
    q, k, v = (getattr(records[0], n).transpose(1, 2).double() for n in ("q_rot", "k_rot", "v"))  # bhsd
    scheme = Q.QuantScheme("int4", "tensor")
    qq, kq, vq = (Q.fake_quantize(t, "int4", "tensor") for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kq, vq = kq.repeat_interleave(group, 1), vq.repeat_interleave(group, 1)
    logits = qq @ kq.transpose(-1, -2) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), -math.inf)
    expect = (logits.softmax(-1) @ vq).transpose(1, 2).flatten(2)              # [b, s, heads * d]
    seen = {}
    attn0 = model.model.layers[0].self_attn
    hook = attn0.o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    previous = model.config._attn_implementation
    try:
        with torch.no_grad(), Q.quantized_attention(model, scheme):
            quant_logits = model(input_ids=ids).logits
    finally:
        hook.remove()
    torch.testing.assert_close(seen["x"].double(), expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(quant_logits, clean_logits, atol=1e-4)
    # unquantized through the same path: the model's own numbers; after the block: as before
    with torch.no_grad(), Q.quantized_attention(model, None):
        same = model(input_ids=ids).logits
    torch.testing.assert_close(same, clean_logits, rtol=0, atol=1e-6)
    assert model.config._attn_implementation == previous
    assert not any("_posenc_quant" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, clean_logits)


def _outlier_model(pair=2, offset=40.0):
    """tiny-llama with a constant offset planted in key pair `pair` of every kv head (through k_proj's bias)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from posenc.analysis import MODEL_PRESETS
    cfg = dict(MODEL_PRESETS["tiny-llama"], attention_bias=True)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    d = config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            bias = torch.zeros(config.num_key_value_heads, d)
            bias[:, pair] = offset
            bias[:, pair + d // 2] = offset / 2
            layer.self_attn.k_proj.bias.copy_(bias.flatten())
    return model


def test_planted_outlier_pair_dominates_the_logit_error_and_mitigations_remove_it():
    pair = 2
    model = _outlier_model(pair)
    ids = _ids(model, 32)
    schemes = [Q.QuantScheme("int8", "tensor"), Q.QuantScheme("int8", "tensor", key_granularity="channel"),
               Q.QuantScheme("int8", "tensor", keep_pairs=1)]
    res = Q.quant_analysis(model, ids, schemes)
    base, chan, keep = res["schemes"]
    # analyze flags the planted offset in every kv head of every layer
    assert all(f["k_offset"][h][pair] for f in res["flags"] for h in range(len(f["k_offset"])))
    assert all(o == pair for f in res["flags"] for o in f["k_outlier"])
    # the outlier pair carries most of the logit error (1 of 8 pairs)
    share = base["by_pair"]["logit_share"]
    assert max(range(len(share)), key=share.__getitem__) == pair and share[pair] > 0.5
    assert base["summary"]["logit_share"]["offset"] > 2 * base["summary"]["pair_share"]["offset"]
    # with one scale the other key pairs lose most of their precision (scale 40/127 against values ~1); per-channel
    # key scales give them their own, keeping the outlier pair in full precision a scale without it
    others = [p for p in range(8) if p != pair]
    worst = lambda r: max(r["by_pair"]["k_err"][p] for p in others)  # noqa: E731
    assert min(base["by_pair"]["k_err"][p] for p in others) > 0.1
    assert worst(chan) < 0.05 * min(base["by_pair"]["k_err"][p] for p in others) and worst(keep) < 0.02
    assert chan["summary"]["k_err"] < 0.5 * base["summary"]["k_err"]   # the outlier pair's own error stays
    assert keep["summary"]["k_err"] < 0.05 * base["summary"]["k_err"]
    assert keep["summary"]["logit_rms"] < chan["summary"]["logit_rms"] < base["summary"]["logit_rms"]
    assert chan["summary"]["q_err"] == base["summary"]["q_err"]       # q untouched by the key mitigation
    # layer 0's key error, independently: capture the keys, quantize them, compare
    with torch.no_grad(), capture(model) as records:
        model(input_ids=ids)
    k = records[0].k_rot.transpose(1, 2).double()
    kq = Q.fake_quantize(k, "int8", "tensor")
    expect = ((kq - k).square().sum((0, 2, 3)) / k.square().sum((0, 2, 3))).sqrt()
    assert res["schemes"][0]["layers"][0]["k_err_head"] == pytest.approx(expect.tolist(), rel=1e-3)
    # the loss is the quantized forward's
    with torch.no_grad(), Q.quantized_attention(model, schemes[0], rotary_dim=res["rotary_dim"]):
        out = model(input_ids=ids, labels=ids)
    assert base["loss"] == pytest.approx(float(out.loss), rel=1e-6)
    with torch.no_grad():
        clean = model(input_ids=ids, labels=ids)
    assert res["loss"] == pytest.approx(float(clean.loss), rel=1e-5)
    p, r = clean.logits.double().softmax(-1), out.logits.double().softmax(-1)
    kl = float((p * (p.log() - r.log())).sum(-1).mean())
    assert base["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-9) and base["kl"] > 0


def test_compare_encodings_leaves_the_model_as_it_came(tmp_path):
    model, _, _ = load_model("tiny-llama", seed=2)
    ids = _ids(model, 16)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    schemes = [Q.QuantScheme("int8", "tensor")]
    res = Q.compare_encodings(model, ids, schemes, Q.parse_encodings("original,hope,nope"))
    assert [e["encoding"] for e in res["encodings"]] == ["original", "hope", "nope"]
    assert res["encodings"][1]["rope_type"] == "posenc:hope" and res["encodings"][0]["rope_type"] == "default"
    # NoPE: nothing rotates, so every pair is in the incomplete band
    assert all(all(f["incomplete"]) for f in res["encodings"][2]["flags"])
    assert res["encodings"][0]["loss"] != res["encodings"][2]["loss"]
    assert not posenc.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    # a patched model (as `posenc finetune` saves one) comes back patched
    posenc.patch(model, "hope", context_length=64)
    model.save_pretrained(tmp_path / "hope")
    loaded, _, _ = load_model(str(tmp_path / "hope"))
    rope_parameters = json.dumps(loaded.config.rope_parameters, sort_keys=True)
    with torch.no_grad():
        before = loaded(input_ids=ids).logits
    res = Q.compare_encodings(loaded, ids, schemes, Q.parse_encodings("original,prope:0.5"))
    assert res["encodings"][0]["rope_type"] == "posenc:hope"
    assert json.dumps(loaded.config.rope_parameters, sort_keys=True) == rope_parameters
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_quant_json_plot_and_table(capsys, tmp_path):
    argv = ["analyze", "tiny-llama", "--max-tokens", "20", "--quant", "int8,fp8", "--granularity", "tensor,channel",
            "--keep-pairs", "1", "--encoding", "original,hope", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "plots")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    quant = report["quant"]
    assert [e["encoding"] for e in quant["encodings"]] == ["original", "hope"]
    labels = [s["label"] for s in quant["encodings"][0]["schemes"]]
    assert labels == ["int8 tensor", "int8 tensor, k per-channel", "int8 tensor, keep 1 pairs", "int8 channel",
                      "int8 channel, keep 1 pairs", "fp8_e4m3 tensor", "fp8_e4m3 tensor, k per-channel",
                      "fp8_e4m3 tensor, keep 1 pairs", "fp8_e4m3 channel", "fp8_e4m3 channel, keep 1 pairs"]
    layers = quant["encodings"][0]["schemes"][0]["layers"]
    assert len(layers) == 4 and len(layers[0]["k_err"]) == 2 and len(layers[0]["k_err"][0]) == 8
    assert "int8 tensor, k per-channel" in out and "mitigations" in out
    assert "quant [" in err
    for name in ("quant_by_pair.png", "quant_k_err_original.png", "quant_k_err_hope.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0


@pytest.mark.parametrize("extra,needle", [
    (["--quant", "int7"], "--quant: unknown format 'int7'"),
    (["--quant", "int8,int8"], "duplicate"),
    (["--quant", "int8", "--granularity", "row"], "--granularity: unknown granularity 'row'"),
    (["--granularity", "tensor"], "only apply with --quant"),
    (["--encoding", "hope"], "only apply with --quant"),
    (["--quant", "int8", "--encoding", "hope:x"], "--encoding: bad encoding spec 'hope:x'"),
    (["--quant", "int8", "--keep-pairs", "9"], "keep_pairs"),
    (["--quant", "int8", "--keep-pairs", "-1"], "--keep-pairs"),
])
def test_cli_quant_errors_are_one_line(capsys, extra, needle):
    code = main(["analyze", "tiny-llama", "--max-tokens", "8"] + extra)
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and needle in err
    lines = [ln for ln in err.splitlines() if ln.startswith("posenc analyze: error") or "error:" in ln]
    assert len(lines) == 1
