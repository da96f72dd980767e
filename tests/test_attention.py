"""posenc.Attention, KVCache and TinyDecoder: decoding, padding, GQA, relativity, causality, backends, errors."""
import types

import pytest
import torch

import posenc
from posenc import attention as A

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16
# Every encoding with a non-trivial mask at head_dim 16: RoPE 8/8 pairs, p-RoPE 4/8, HoPE 3/8 (wavelengths
# 6.3, 19.9, 62.8 fit in 64), NoPE 0/8.
ENCODINGS = {"rope": {}, "prope": {"p": 0.5}, "hope": {"context_length": 64}, "nope": {}}
ROTATED = {"rope": 8, "prope": 4, "hope": 3, "nope": 0}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(name, num_kv_heads=2, backend="auto", bias=True, causal=True, device="cpu", **kw):
    layer = posenc.Attention(HIDDEN, HEADS, num_kv_heads, encoding=name, bias=bias, causal=causal,
                             backend=backend, **ENCODINGS[name], **kw)
    assert layer.encoding.rotated_pairs == ROTATED[name]
    return layer.to(device).eval()


def close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def not_close(a, b, gap=1e-3):
    assert (a - b).abs().max().item() > gap


@pytest.fixture(params=list(ENCODINGS))
def name(request):
    return request.param


# ------------------------------------------------------------------------------------------ cache decoding
@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_token_by_token_decoding_equals_full_forward(name, device):
    layer = make(name, device=device)
    x = torch.randn(2, 12, HIDDEN, device=device)
    full = layer(x)
    cache = posenc.KVCache()
    steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(12)], 1)
    close(steps, full)
    assert len(cache) == 12 and cache.keys.shape == (2, 12, 2, HEAD_DIM)
    assert cache.next_position.tolist() == [12, 12]
    # Chunked prefill then steps (query blocks that are not the whole key range).
    cache = layer.new_cache()
    chunks = [layer(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 9), (9, 12))]
    close(torch.cat(chunks, 1), full)


def test_cache_stores_rotated_keys(name):
    layer = make(name)
    x = torch.randn(1, 5, HIDDEN)
    cache = posenc.KVCache()
    with torch.no_grad():
        layer(x, cache=cache)
        k = layer.k_proj(x).view(1, 5, 2, HEAD_DIM)
        expected = layer.encoding.apply(k.clone(), k.clone(), torch.arange(5))[1]
    close(cache.keys, expected, 1e-6)
    if name != "nope":
        not_close(cache.keys, k)


def test_decoding_under_autograd_and_gradients(name):
    layer = make(name)
    x = torch.randn(2, 6, HIDDEN, requires_grad=True)
    full = layer(x)
    cache = posenc.KVCache()
    steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(6)], 1)
    close(steps, full)
    (g_full,) = torch.autograd.grad(full.square().sum(), x)
    (g_steps,) = torch.autograd.grad(steps.square().sum(), x)
    close(g_steps, g_full, 1e-4)


@torch.no_grad()
def test_tiny_decoder_cache_and_generate(name):
    model = posenc.TinyDecoder(vocab_size=50, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS, num_kv_heads=1,
                               encoding=name, **ENCODINGS[name]).eval()
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids)
    assert full.shape == (2, 9, 50)
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)],
                      1)
    close(steps, full, 1e-4)  # logits go through 2 layers and a tied head: magnitudes ~10
    out = model.generate(ids[:, :4], max_new_tokens=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids[:, :4])
    # Greedy: each generated token is the argmax of the full forward over what precedes it.
    assert torch.equal(model(out[:, :-1])[:, 3:].argmax(-1), out[:, 4:])


# -------------------------------------------------------------------------------------------------- padding
@torch.no_grad()
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
@pytest.mark.parametrize("device", DEVICES)
def test_left_padded_batch_equals_unpadded_rows(name, mask_dtype, device):
    layer = make(name, device=device)
    lengths, S, new = [7, 4, 1], 7, 3
    rows = [torch.randn(1, n + new, HIDDEN, device=device) for n in lengths]
    x = torch.randn(3, S, HIDDEN, device=device)  # pads hold garbage, which must not leak anywhere
    mask = torch.zeros(3, S, dtype=mask_dtype, device=device)
    for i, n in enumerate(lengths):
        x[i, S - n:] = rows[i][0, :n]
        mask[i, S - n:] = 1
    cache = posenc.KVCache()
    out = layer(x, attention_mask=mask, cache=cache)
    # Then decode `new` tokens: with the mask of the new tokens only, or the full [batch, past + 1] mask.
    steps = []
    for t in range(new):
        xt = torch.stack([r[0, n + t] for r, n in zip(rows, lengths)])[:, None]
        step_mask = torch.ones(3, 1, dtype=mask_dtype, device=device) if t % 2 else torch.cat(
            [mask, torch.ones(3, t + 1, dtype=mask_dtype, device=device)], 1)
        steps.append(layer(xt, attention_mask=step_mask, cache=cache))
    for i, n in enumerate(lengths):
        ref = layer(rows[i])
        close(out[i, S - n:], ref[0, :n])
        assert torch.all(out[i, : S - n] == 0), "outputs at padded positions must be 0"
        close(torch.cat(steps, 1)[i], ref[0, n:])
    # Positions count real tokens only (a padded row starts at 0, like the unpadded one).
    assert cache.next_position.tolist() == [n + new for n in lengths]
    # Without the mask the pads leak in: this test can fail.
    not_close(layer(x)[1, S - 4:], out[1, S - 4:])


@torch.no_grad()
def test_right_padding_and_all_pad_rows(name):
    layer = make(name)
    x = torch.randn(3, 5, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = layer(x, attention_mask=mask)
    assert torch.isfinite(out).all()
    close(out[0, :3], layer(x[:1, :3])[0])
    assert torch.all(out[0, 3:] == 0) and torch.all(out[2] == 0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("device", DEVICES)
def test_padded_training_step_has_finite_gradients(name, backend, device):
    layer = make(name, backend=backend, device=device).train()
    x = torch.randn(2, 6, HIDDEN, requires_grad=True, device=device)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    layer(x, attention_mask=mask).square().sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(x.grad[0, :3] == 0), "pads must not receive gradient"


# ------------------------------------------------------------------------------------------------------ GQA
@torch.no_grad()
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(name, num_kv_heads):
    gqa = make(name, num_kv_heads=num_kv_heads)
    mha = make(name, num_kv_heads=HEADS)
    groups = HEADS // num_kv_heads
    state = {}
    for key, value in gqa.state_dict().items():
        if key.startswith(("k_proj", "v_proj")):  # kv head j serves query heads j*groups .. j*groups+groups-1
            value = value.view(num_kv_heads, HEAD_DIM, *value.shape[1:]).repeat_interleave(groups, 0)
            value = value.reshape(HEADS * HEAD_DIM, *value.shape[2:])
        state[key] = value
    mha.load_state_dict(state)
    x = torch.randn(2, 9, HIDDEN)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    for backend in ("sdpa", "eager"):
        gqa.backend = mha.backend = backend
        close(gqa(x), mha(x))
        close(gqa(x, attention_mask=mask), mha(x, attention_mask=mask))
    # Repeating with the other convention (tiling) gives a different layer: the test can fail.
    if num_kv_heads > 1:
        for key in ("k_proj.weight", "v_proj.weight"):
            w = gqa.state_dict()[key].view(num_kv_heads, HEAD_DIM, HIDDEN)
            state[key] = w.repeat(groups, 1, 1).reshape(HEADS * HEAD_DIM, HIDDEN)
        mha.load_state_dict(state)
        not_close(gqa(x), mha(x))


# ---------------------------------------------------------------------------------------------- relativity
@torch.no_grad()
def test_outputs_unchanged_when_all_positions_shift(name):
    layer = make(name)
    x = torch.randn(2, 10, HIDDEN)
    base = layer(x)
    pos = torch.arange(10)
    close(layer(x, positions=pos + 1000), base)
    close(layer(x, positions=torch.stack([pos + 7, pos + 123_456])), base)
    # The shift carries through a cache too.
    cache = posenc.KVCache()
    parts = [layer(x[:, :6], positions=pos[:6] + 50, cache=cache), layer(x[:, 6:], cache=cache)]
    close(torch.cat(parts, 1), base)
    # Changing relative distances matters for every encoding that rotates something.
    stretched = layer(x, positions=2 * pos)
    if name == "nope":
        close(stretched, base)
    else:
        not_close(stretched, base)


# ----------------------------------------------------------------------------------------------- causality
@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_causality(name, backend):
    layer = make(name, backend=backend)
    x = torch.randn(2, 10, HIDDEN)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, HIDDEN)
    close(layer(y)[:, :6], layer(x)[:, :6], 1e-6)
    not_close(layer(y)[:, 6:], layer(x)[:, 6:])
    bidirectional = make(name, backend=backend, causal=False)
    not_close(bidirectional(y)[:, :6], bidirectional(x)[:, :6])


# ------------------------------------------------------------------------------------------------ backends
@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_and_eager_agree(name, device):
    layer = make(name, num_kv_heads=1, device=device)
    x = torch.randn(3, 8, HIDDEN, device=device)
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[1, :5] = False
    results = {}
    for backend in ("sdpa", "eager"):
        layer.backend = backend
        cache = posenc.KVCache()
        results[backend] = (layer(x), layer(x, attention_mask=mask),
                            torch.cat([layer(x[:, :5], attention_mask=mask[:, :5], cache=cache),
                                       layer(x[:, 5:], cache=cache)], 1))
    for a, b in zip(results["sdpa"], results["eager"]):
        close(a, b)
    bidir = make(name, causal=False, backend="sdpa", device=device)
    ref = bidir(x, attention_mask=mask)
    bidir.backend = "eager"
    close(bidir(x, attention_mask=mask), ref)


def test_auto_backend_on_cpu_is_sdpa():
    layer = make("rope")
    assert layer._choose_backend(torch.randn(1, 2, HEADS, HEAD_DIM)) == "sdpa"


def _reference_attention(q, k, v, causal, scale):
    """q [s, h, d], k/v [L, hk, d]; causal aligned bottom right, as flash-attn does."""
    s, L = q.shape[0], k.shape[0]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.einsum("shd,lhd->hsl", q.float(), k.float()) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(s, L, dtype=torch.bool).tril(L - s), float("-inf"))
    return torch.einsum("hsl,lhd->shd", scores.softmax(-1), v.float()).to(q.dtype)


def _stub_flash():
    """A stand-in for flash_attn with its calling conventions (bshd, varlen with cu_seqlens), to test our
    glue (bottom-right causal alignment, unpadding and re-padding) on any machine."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append("dense")
        return torch.stack([_reference_attention(q[i], k[i], v[i], causal, softmax_scale) for i in range(len(q))])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append("varlen")
        assert cu_q.dtype == cu_k.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty_like(q)
        for i in range(len(cu_q) - 1):
            a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            if b > a:
                out[a:b] = _reference_attention(q[a:b], k[c:d], v[c:d], causal, softmax_scale)
        return out

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func), calls


@torch.no_grad()
def test_flash_glue_with_stand_in(name, monkeypatch):
    stub, calls = _stub_flash()
    monkeypatch.setattr(A, "_import_flash", lambda: stub)
    monkeypatch.setattr(A, "_flash_unusable", lambda q: None)
    layer = make(name, backend="flash")
    eager = make(name, backend="eager")
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8, HIDDEN)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, :7] = False
    close(layer(x), eager(x))
    close(layer(x, attention_mask=mask), eager(x, attention_mask=mask))
    caches = posenc.KVCache(), posenc.KVCache()
    for lo, hi in ((0, 5), (5, 6), (6, 8)):
        m = mask[:, lo:hi]
        close(layer(x[:, lo:hi], attention_mask=m, cache=caches[0]), eager(x[:, lo:hi], attention_mask=m,
                                                                          cache=caches[1]))
    assert "dense" in calls and "varlen" in calls


@pytest.mark.skipif(not (torch.cuda.is_available() and A.flash_attn_available()), reason="needs flash-attn + CUDA")
@torch.no_grad()
def test_flash_matches_sdpa_on_cuda(name):
    layer = make(name, backend="flash").cuda().to(torch.bfloat16)
    sdpa = make(name, backend="sdpa").cuda().to(torch.bfloat16)
    sdpa.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64, HIDDEN, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(3, 64, dtype=torch.bool, device="cuda")
    mask[0, :20] = False
    for kw in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(layer(x, **kw), sdpa(x, **kw), atol=2e-2, rtol=2e-2)


def test_forced_flash_errors():
    if not A.flash_attn_available():
        with pytest.raises(ImportError, match="flash-attn"):
            posenc.Attention(HIDDEN, HEADS, backend="flash")
    stub, _ = _stub_flash()
    old = A._import_flash
    A._import_flash = lambda: stub
    try:
        layer = posenc.Attention(HIDDEN, HEADS, backend="flash")
        with pytest.raises(ValueError, match="backend='flash'.*CUDA"):
            layer(torch.randn(1, 3, HIDDEN))  # CPU tensors
    finally:
        A._import_flash = old


# ----------------------------------------------------------------------------------------- encoding swaps
@torch.no_grad()
def test_encoding_swap_keeps_weights(name):
    layer = make("rope")
    x = torch.randn(2, 7, HIDDEN)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    enc = posenc.get_encoding(name, head_dim=HEAD_DIM, **ENCODINGS[name])
    layer.encoding = enc
    assert layer.encoding is enc and dict(layer.named_children())["encoding"] is enc
    assert before.keys() == layer.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    ref = make(name)
    ref.load_state_dict(before)
    close(layer(x), ref(x), 0.0)
    layer.encoding = "nope"  # by name, built with the layer's head_dim
    assert isinstance(layer.encoding, posenc.NoPE) and layer.encoding.head_dim == HEAD_DIM


def test_subclasses_are_interchangeable():
    classes = {posenc.RoPEAttention: posenc.RoPE, posenc.PRoPEAttention: posenc.PRoPE,
               posenc.HoPEAttention: posenc.HoPE, posenc.NoPEAttention: posenc.NoPE}
    layers = [cls(HIDDEN, HEADS, 2, bias=True) for cls in classes]
    for layer, enc_cls in zip(layers, classes.values()):
        assert type(layer.encoding) is enc_cls
        layer.load_state_dict(layers[0].state_dict())  # same parameters for every encoding
    assert posenc.HoPEAttention(HIDDEN, HEADS, context_length=64).encoding.rotated_pairs == 3
    enc = posenc.PRoPE(head_dim=HEAD_DIM, p=0.25)
    assert posenc.Attention(HIDDEN, HEADS, encoding=enc).encoding is enc
    assert isinstance(posenc.RoPEAttention(HIDDEN, HEADS, 2, HEAD_DIM, encoding="nope").encoding, posenc.NoPE)


def test_torch_compile_fullgraph_matches_eager():
    layer = make("hope")
    x = torch.randn(2, 8, HIDDEN, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[0, :3] = 0
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # no graph break anywhere
    out = compiled(x, attention_mask=mask)
    close(out, layer(x, attention_mask=mask), 1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(layer(x, attention_mask=mask).square().sum(), x)
    close(g, g_ref, 1e-5)


def test_tiny_decoder_set_encoding():
    model = posenc.TinyDecoder(vocab_size=20, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS)
    model.set_encoding("hope", context_length=64)
    assert all(isinstance(a.encoding, posenc.HoPE) and a.encoding.rotated_pairs == 3 for a in model.attentions)


# -------------------------------------------------------------------------------------------- bad arguments
def _layer_call(**kw):
    layer = make("rope")
    args = dict(x=torch.randn(2, 4, HIDDEN))
    args.update(kw)
    return lambda: layer(**args)


def _primed(layer):
    """A cache that `layer` has filled with 3 tokens of batch 2."""
    cache = posenc.KVCache()
    layer(torch.randn(2, 3, HIDDEN), cache=cache)
    return cache


def _foreign_cache():
    cache, layer = _primed(make("rope")), make("rope")
    return lambda: layer(torch.randn(2, 1, HIDDEN), cache=cache)


def _cache_after_swap():
    layer = make("rope")
    cache = _primed(layer)
    layer.encoding = "hope"
    return lambda: layer(torch.randn(2, 1, HIDDEN), cache=cache)


def _cache_other_batch():
    layer = make("rope")
    cache = _primed(layer)
    return lambda: layer(torch.randn(3, 1, HIDDEN), cache=cache)


def _mask_with_cache_wrong_length():
    layer = make("rope")
    cache = _primed(layer)
    return lambda: layer(torch.randn(2, 1, HIDDEN), attention_mask=torch.ones(2, 3, dtype=torch.bool), cache=cache)


BAD = {
    "hidden_size not divisible": (lambda: posenc.Attention(65, 4), ValueError, "hidden_size"),
    "heads not multiple of kv": (lambda: posenc.Attention(64, 4, 3), ValueError, "num_kv_heads"),
    "num_heads zero": (lambda: posenc.Attention(64, 0), ValueError, "num_heads"),
    "num_heads float": (lambda: posenc.Attention(64, 4.0), TypeError, "num_heads"),
    "hidden_size bool": (lambda: posenc.Attention(True, 4), TypeError, "hidden_size"),
    "head_dim odd": (lambda: posenc.Attention(64, 4, head_dim=15), ValueError, "head_dim"),
    "dropout": (lambda: posenc.Attention(64, 4, dropout=1.5), ValueError, "dropout"),
    "backend": (lambda: posenc.Attention(64, 4, backend="xformers"), ValueError, "backend"),
    "causal": (lambda: posenc.Attention(64, 4, causal="yes"), TypeError, "causal"),
    "unknown encoding": (lambda: posenc.Attention(64, 4, encoding="alibi"), ValueError, "encoding"),
    "encoding type": (lambda: posenc.Attention(64, 4, encoding=3), TypeError, "encoding"),
    "encoding head_dim": (lambda: posenc.Attention(64, 4, encoding=posenc.RoPE(32)), ValueError, "head_dim"),
    "encoding kwargs with instance": (lambda: posenc.Attention(64, 4, encoding=posenc.RoPE(16), base=5.0),
                                      TypeError, "keyword"),
    "unknown encoding kwarg": (lambda: posenc.Attention(64, 4, contxt_length=3), TypeError, "contxt_length"),
    "x wrong width": (_layer_call(x=torch.randn(2, 4, 32)), ValueError, "x must be"),
    "x 2-D": (_layer_call(x=torch.randn(4, HIDDEN)), ValueError, "x must be"),
    "x int": (_layer_call(x=torch.ones(2, 4, HIDDEN, dtype=torch.long)), TypeError, "x must be"),
    "mask wrong shape": (_layer_call(attention_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
                         "attention_mask"),
    "mask 4-D": (_layer_call(attention_mask=torch.ones(2, 1, 4, 4, dtype=torch.bool)), ValueError,
                 "attention_mask"),
    "mask additive float": (_layer_call(attention_mask=torch.zeros(2, 4)), TypeError, "attention_mask"),
    "mask values": (_layer_call(attention_mask=torch.full((2, 4), 2)), ValueError, "attention_mask"),
    "mask not tensor": (_layer_call(attention_mask=[[1, 1, 1, 1]] * 2), TypeError, "attention_mask"),
    "mask with cache wrong length": (_mask_with_cache_wrong_length(), ValueError, "attention_mask"),
    "positions float": (_layer_call(positions=torch.arange(4.0)), TypeError, "positions"),
    "positions shape": (_layer_call(positions=torch.arange(5)), ValueError, "positions"),
    "cache type": (_layer_call(cache={}), TypeError, "cache"),
    "cache from another layer": (_foreign_cache(), ValueError, "another attention layer"),
    "cache after encoding swap": (_cache_after_swap(), ValueError, "encoding"),
    "cache batch size": (_cache_other_batch(), ValueError, "batch size"),
    "swap to non-encoding": (lambda: setattr(make("rope"), "encoding", torch.nn.Linear(2, 2)), TypeError,
                             "encoding"),
    "swap head_dim": (lambda: setattr(make("rope"), "encoding", posenc.NoPE(32)), ValueError, "head_dim"),
    "decoder cache list": (lambda: posenc.TinyDecoder(10, HIDDEN, 2)(torch.zeros(1, 2, dtype=torch.long),
                                                                  cache=[posenc.KVCache()]), ValueError, "cache"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise(case):
    fn, exc, match = BAD[case]
    with torch.no_grad(), pytest.raises(exc, match=match):
        fn()
