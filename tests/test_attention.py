"""posenc.Attention, KVCache and TinyDecoder: decoding, padding, GQA, relativity, causality, backends, errors."""
import inspect
import math
import sys
import types

import pytest
import torch

import flash_standin as FS
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


# ------------------------------------------------------------------------------- the flash-attn stand-in
# flash-attn cannot be installed on our machines: posenc's flash path runs against tests/flash_standin.py,
# which follows flash-attn 2's documented semantics. First the stand-in itself, on inputs worked out by hand.
def _rows(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_standin_masks_are_flash_attn_documented_ones():
    # flash-attn's docstring examples: causal aligned to the bottom-right corner.
    assert torch.equal(FS.keep_mask(2, 5, causal=True), _rows([1, 1, 1, 1, 0], [1, 1, 1, 1, 1]))
    assert torch.equal(FS.keep_mask(5, 2, causal=True), _rows([0, 0], [0, 0], [0, 0], [1, 0], [1, 1]))
    assert torch.equal(FS.keep_mask(2, 3, causal=True), _rows([1, 1, 0], [1, 1, 1]))
    assert torch.equal(FS.keep_mask(3, 3, causal=True), _rows([1, 0, 0], [1, 1, 0], [1, 1, 1]))
    assert torch.equal(FS.keep_mask(1, 4, causal=True), _rows([1, 1, 1, 1]))  # a decode step sees every key
    assert FS.keep_mask(2, 5).all()
    # Sliding window: query i sees keys [i + sk - sq - left, i + sk - sq + right]; causal makes right 0.
    assert torch.equal(FS.keep_mask(2, 5, window_size=(1, 0)), _rows([0, 0, 1, 1, 0], [0, 0, 0, 1, 1]))
    assert torch.equal(FS.keep_mask(3, 3, window_size=(0, 1)), _rows([1, 1, 0], [0, 1, 1], [0, 0, 1]))
    assert torch.equal(FS.keep_mask(3, 3, causal=True, window_size=(1, -1)), _rows([1, 0, 0], [1, 1, 0], [0, 1, 1]))


def _hand_qkv(dtype=torch.float16):
    """One head, headdim 4, seqlen_q 2, seqlen_k 3: q.k = [[0, 1, 2], [0, 2, 4]]; v's channel 0 is 1, 10, 100
    over the keys, channel 1 is 1 everywhere (so it reads the sum of the weights), channels 2-3 are 0."""
    q = torch.zeros(1, 2, 1, 4, dtype=dtype)
    k = torch.zeros(1, 3, 1, 4, dtype=dtype)
    v = torch.zeros(1, 3, 1, 4, dtype=dtype)
    q[0, :, 0, 0] = torch.tensor([1.0, 2.0])
    k[0, :, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
    v[0, :, 0, 0] = torch.tensor([1.0, 10.0, 100.0])
    v[0, :, 0, 1] = 1.0
    return q, k, v


def _weighted(scores, values=(1.0, 10.0, 100.0)):
    e = [math.exp(s) for s in scores]
    return sum(w * x for w, x in zip(e, values)) / sum(e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_standin_matches_hand_computed_attention(dtype):
    q, k, v = _hand_qkv(dtype)
    e = math.e ** 0.5  # the default scale is 1/sqrt(4): scores [[0, .5, 1], [0, 1, 2]]
    cases = {  # (kwargs): channel 0 of rows 0 and 1
        "causal": (dict(causal=True), [_weighted([0, 0.5]), _weighted([0, 1, 2])]),  # row 0 sees keys 0, 1
        "full": (dict(), [_weighted([0, 0.5, 1]), _weighted([0, 1, 2])]),
        "scale 1": (dict(softmax_scale=1.0, causal=True), [_weighted([0, 1]), _weighted([0, 2, 4])]),
    }
    assert abs(cases["causal"][1][0] - (1 + 10 * e) / (1 + e)) < 1e-12  # _weighted written out once
    for kwargs, expected in cases.values():
        out = FS.flash_attn_func(q, k, v, **kwargs)
        assert out.shape == q.shape and out.dtype == dtype
        want = torch.tensor([[c0, 1.0, 0.0, 0.0] for c0 in expected], dtype=torch.float64)
        torch.testing.assert_close(out[0, :, 0].double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3,
                                   atol=0)
        # The same through varlen (one sequence).
        cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
        torch.testing.assert_close(FS.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 2, 3, **kwargs), out[0],
                                   rtol=0, atol=0)


def test_standin_gqa_head_mapping():
    # 6 query heads on 2 kv heads: heads 0-2 read kv head 0 (v = 1 everywhere), heads 3-5 kv head 1 (v = 2).
    q, k = torch.randn(2, 3, 6, 8).half(), torch.randn(2, 4, 2, 8).half()
    v = torch.ones(2, 4, 2, 8, dtype=torch.float16)
    v[:, :, 1] = 2.0
    out = FS.flash_attn_func(q, k, v, causal=True)
    assert out[..., 0].tolist() == [[[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]] * 3] * 2
    # With random v: query head h is a one-head call on kv head h // 3 (keys and values both).
    v = torch.randn(2, 4, 2, 8).half()
    out = FS.flash_attn_func(q, k, v, causal=True)
    for h in range(6):
        j = h // 3
        single = FS.flash_attn_func(q[:, :, h:h + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], causal=True)
        assert torch.equal(out[:, :, h:h + 1], single)
    not_close(out[:, :, 1], FS.flash_attn_func(q[:, :, 1:2], k[:, :, 1:2], v[:, :, 1:2], causal=True)[:, :, 0])


def test_standin_varlen_equals_per_sequence_calls():
    len_q, len_k = [3, 0, 4, 1], [5, 2, 2, 1]  # sequence 2 has more queries than keys: its first rows see none
    q = torch.randn(sum(len_q), 4, 8).half()
    k, v = torch.randn(sum(len_k), 2, 8).half(), torch.randn(sum(len_k), 2, 8).half()
    cu_q = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 9, 10], dtype=torch.int32)
    for causal in (True, False):
        out = FS.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=causal)
        assert out.shape == q.shape
        for b in range(4):
            qa, qb, ka, kb = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
            if qb > qa:
                dense = FS.flash_attn_func(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal)[0]
                assert torch.equal(out[qa:qb], dense)
    # Causal, 4 queries on 2 keys: rows 0 and 1 see no key and output 0 (flash-attn's documented behaviour).
    out = FS.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True)
    assert torch.all(out[3:5] == 0) and torch.all(out[5:7] != 0)


def test_standin_dropout_is_unbiased():
    # One query on 4 keys with v = identity: the output row is the (dropped, rescaled) attention probabilities.
    n, p = 4000, 0.25
    q, k = torch.randn(1, 1, 1, 4).half().expand(n, 1, 1, 4), torch.randn(1, 4, 1, 4).half().expand(n, 4, 1, 4)
    v = torch.eye(4, dtype=torch.float16)[None, :, None].expand(n, 4, 1, 4)
    probs = FS.flash_attn_func(q[:1], k[:1], v[:1]).double()[0, 0, 0]
    out = FS.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), dropout_p=p).double()[:, 0, 0]
    assert abs((out == 0).double().mean().item() - p) < 0.03  # 3e-2 is ~9 standard deviations
    kept = out[out != 0].view(-1)
    torch.testing.assert_close(kept.unique(), (probs / (1 - p)).half().double().unique(), rtol=2e-3, atol=0)
    sd = (probs / (1 - p)) * math.sqrt(p * (1 - p) / n)
    assert ((out.mean(0) - probs).abs() <= 6 * sd + 1e-3).all()


def _refusal_cases():
    h = torch.float16
    q, k, v = torch.randn(2, 3, 4, 8).to(h), torch.randn(2, 5, 2, 8).to(h), torch.randn(2, 5, 2, 8).to(h)
    qv, kv, vv = q[0], k[0], v[0]
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    dense, varlen = FS.flash_attn_func, FS.flash_attn_varlen_func
    return {
        "float32": (lambda: dense(q.float(), k.float(), v.float()), RuntimeError, "fp16 and bf16"),
        "float64": (lambda: varlen(qv.double(), kv.double(), vv.double(), cu_q, cu_k, 3, 5), RuntimeError,
                    "fp16 and bf16"),
        "mixed dtypes": (lambda: dense(q, k.bfloat16(), v), RuntimeError, "query and key must have the same dtype"),
        "heads not divisible": (lambda: dense(torch.randn(2, 3, 5, 8).to(h), k, v), RuntimeError, "must divide"),
        "head_dim over 256": (lambda: dense(*(torch.randn(1, 2, 1, 264).to(h),) * 3), RuntimeError, "at most 256"),
        "batch 0": (lambda: dense(q[:0], k[:0], v[:0]), RuntimeError, "batch size must be positive"),
        "varlen batch 0": (lambda: varlen(qv[:0], kv[:0], vv[:0], cu_q[:1], cu_k[:1], 0, 0), RuntimeError,
                           "batch size must be positive"),
        "last dim strided": (lambda: dense(q.transpose(1, 3).contiguous().transpose(1, 3), k, v), RuntimeError,
                             "contiguous last dimension"),
        "k shape": (lambda: dense(q, k[:, :, :, :4], v), RuntimeError, "k and v must be"),
        "cu_seqlens int64": (lambda: varlen(qv, kv, vv, cu_q.long(), cu_k, 3, 5), RuntimeError, "int32"),
        "cu_seqlens not covering q": (lambda: varlen(qv, kv, vv, torch.tensor([0, 2], dtype=torch.int32), cu_k, 3,
                                                     5), ValueError, "cu_seqlens_q"),
        "max_seqlen_q too small": (lambda: varlen(qv, kv, vv, cu_q, cu_k, 2, 5), ValueError, "max_seqlen"),
        "softcap": (lambda: dense(q, k, v, softcap=30.0), NotImplementedError, "softcap"),
        "return_attn_probs": (lambda: dense(q, k, v, return_attn_probs=True), NotImplementedError, "return_attn"),
    }


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_standin_refuses_what_flash_attn_refuses(case):
    fn, exc, match = REFUSALS[case]
    with pytest.raises(exc, match=match):
        fn()


# --------------------------------------------------------------------------- the layer's flash path
FLASH_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="CUDA is not available"))]
FLASH_DTYPES = [torch.float16, torch.bfloat16]
# flash (the stand-in's float64 core) vs SDPA, both on fp16/bf16 inputs: 3 ulps at |out| ~ 1-2, which a
# misaligned mask or a wrong scale exceeds by far.
FLASH_TOL = {torch.float16: 3e-3, torch.bfloat16: 2.4e-2}


def _gpu(major, minor):
    return types.SimpleNamespace(major=major, minor=minor, name=f"a compute capability {major}.{minor} GPU")


class _FlashRecorder:
    """posenc's view of flash-attn, served by the stand-in: `calls` holds ("dense" or "varlen", the arguments by
    name) of each call."""

    def __init__(self, monkeypatch, device):
        self.calls = []
        self.module = types.ModuleType("flash_attn")
        self.use(FS.flash_attn_func, FS.flash_attn_varlen_func)
        monkeypatch.setitem(sys.modules, "flash_attn", self.module)
        monkeypatch.setattr(A, "_flash_module", None)  # posenc imports `flash_attn` afresh: the stand-in
        monkeypatch.setattr(A, "_flash_error", None)
        if device == "cpu":
            # posenc's own eligibility check, with the CPU tensor seen as if on an Ampere-or-newer GPU (the one
            # thing the stand-in relaxes); dtype and head_dim are checked as they are on CUDA.
            unusable = A._flash_unusable
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _gpu(9, 0))
            monkeypatch.setattr(A, "_flash_unusable", lambda q: unusable(
                types.SimpleNamespace(device=torch.device("cuda", 0), dtype=q.dtype, shape=q.shape)))

    def use(self, dense, varlen):
        def recorded(name, fn):
            signature = inspect.signature(fn)

            def call(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self.calls.append((name, bound.arguments))
                return fn(*args, **kwargs)
            return call
        self.module.flash_attn_func = recorded("dense", dense)
        self.module.flash_attn_varlen_func = recorded("varlen", varlen)

    def names(self):
        return {name for name, _ in self.calls}


def _flash_layer(monkeypatch, name, device, dtype, **kw):
    recorder = _FlashRecorder(monkeypatch, device)
    layer = make(name, backend="flash", device=device, **kw).to(dtype)
    return layer, recorder


def _on(layer, backend, fn):
    old, layer.backend = layer.backend, backend
    try:
        return fn()
    finally:
        layer.backend = old


def _decode_runs(layer, x):
    """Full forward, token-by-token decoding, and chunked prefill (query blocks shorter than the keys)."""
    full = layer(x)
    cache = layer.new_cache()
    steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], 1)
    cache = layer.new_cache()
    chunks = torch.cat([layer(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 9), (9, 12))], 1)
    return full, steps, chunks


@torch.no_grad()
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_path_decoding_with_cache_matches_sdpa(name, device, dtype, monkeypatch):
    layer, flash = _flash_layer(monkeypatch, name, device, dtype)
    x = torch.randn(2, 12, HIDDEN, device=device, dtype=dtype)
    got = _decode_runs(layer, x)
    want = _on(layer, "sdpa", lambda: _decode_runs(layer, x))
    for a, b in zip(got, want):
        close(a, b, FLASH_TOL[dtype])
    assert flash.names() == {"dense"} and all(kw["causal"] is True for _, kw in flash.calls)
    # A top-left-aligned causal mask (query i sees keys 0..i, what a plain tril would give) breaks decoding
    # and chunked prefill: these comparisons can fail.
    def top_left(q, k, v, dropout_p=0.0, **kw):
        return FS.flash_attn_func(q, k[:, :q.shape[1]], v[:, :q.shape[1]], dropout_p, **kw)
    flash.use(top_left, FS.flash_attn_varlen_func)
    wrong = _decode_runs(layer, x)
    close(wrong[0], want[0], FLASH_TOL[dtype])  # the full forward has seqlen_q == seqlen_k: the same either way
    not_close(wrong[1], want[1], 0.05)
    not_close(wrong[2], want[2], 0.05)


@torch.no_grad()
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_path_padded_batches_use_varlen_and_match_sdpa(name, device, dtype, monkeypatch):
    layer, flash = _flash_layer(monkeypatch, name, device, dtype)
    x = torch.randn(3, 7, HIDDEN, device=device, dtype=dtype)
    steps = torch.randn(3, 2, HIDDEN, device=device, dtype=dtype)
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    mask[0, :3] = False  # left padding
    mask[1, 5:] = False  # right padding: later tokens follow pads in the cache
    mask[2, :6] = False  # one real token

    def run():
        cache = layer.new_cache()
        out = [layer(x, attention_mask=mask, cache=cache)]
        out.append(layer(steps[:, :1], attention_mask=torch.ones(3, 1, dtype=torch.bool, device=device), cache=cache))
        out.append(layer(steps[:, 1:], cache=cache))  # the cache remembers the pads
        return torch.cat(out, 1), layer(x, attention_mask=mask.long())

    got, want = run(), _on(layer, "sdpa", run)
    for a, b in zip(got, want):
        close(a, b, FLASH_TOL[dtype])
    assert torch.all(got[0][0, :3] == 0) and torch.all(got[0][2, :6] == 0)
    assert flash.names() == {"varlen"}
    # Bidirectional (an encoder) with padding.
    encoder = make(name, causal=False, backend="flash", device=device).to(dtype)
    close(encoder(x, attention_mask=mask), _on(encoder, "sdpa", lambda: encoder(x, attention_mask=mask)),
          FLASH_TOL[dtype])
    assert flash.calls[-1][0] == "varlen" and flash.calls[-1][1]["causal"] is False


@torch.no_grad()
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_path_gqa_matches_eager(num_kv_heads, device, monkeypatch):
    dtype = torch.float16
    layer, flash = _flash_layer(monkeypatch, "rope", device, dtype, num_kv_heads=num_kv_heads)
    x = torch.randn(2, 9, HIDDEN, device=device, dtype=dtype)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[0, :4] = False

    def run():
        cache = layer.new_cache()
        return layer(x), layer(x, attention_mask=mask), layer(x[:, :6], cache=cache), layer(x[:, 6:], cache=cache)

    for a, b in zip(run(), _on(layer, "eager", run)):
        close(a, b, FLASH_TOL[dtype])
    assert flash.names() == {"dense", "varlen"}


@torch.no_grad()
@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_path_passes_the_layer_softmax_scale(device, monkeypatch):
    dtype = torch.float16
    layer, flash = _flash_layer(monkeypatch, "hope", device, dtype)
    x = torch.randn(2, 6, HIDDEN, device=device, dtype=dtype)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1, :2] = False
    default = layer(x)
    assert flash.calls[-1][1]["softmax_scale"] == 1 / math.sqrt(HEAD_DIM)
    # A scale other than flash-attn's default shows that it is passed, not left to the default.
    layer.scale = 0.6
    for kw in ({}, {"attention_mask": mask}):
        out = layer(x, **kw)
        assert flash.calls[-1][1]["softmax_scale"] == 0.6
        close(out, _on(layer, "eager", lambda: layer(x, **kw)), FLASH_TOL[dtype])
    not_close(layer(x), default)


@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_path_dropout_and_gradients(device, monkeypatch):
    dtype = torch.float16
    layer, flash = _flash_layer(monkeypatch, "rope", device, dtype, dropout=0.3)
    x = torch.randn(2, 6, HIDDEN, device=device, dtype=dtype)
    with torch.no_grad():
        layer(x)
    assert flash.calls[-1][1]["dropout_p"] == 0.0  # eval
    layer.train()
    layer(x)
    assert flash.calls[-1][1]["dropout_p"] == 0.3
    # Gradients through the flash path (dropout off) match SDPA's.
    layer.dropout = 0.0
    xs = x.clone().requires_grad_(True)
    (g_flash,) = torch.autograd.grad(layer(xs).float().square().sum(), xs)
    (g_sdpa,) = torch.autograd.grad(_on(layer, "sdpa", lambda: layer(xs)).float().square().sum(), xs)
    close(g_flash.float(), g_sdpa.float(), 5e-3)


@torch.no_grad()
@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_path_empty_batch(device, monkeypatch):
    # flash-attn refuses batch size 0 ("batch size must be positive"): the layer must not pass it on.
    layer, flash = _flash_layer(monkeypatch, "rope", device, torch.float16)
    x = torch.randn(0, 4, HIDDEN, device=device, dtype=torch.float16)
    assert layer(x).shape == (0, 4, HIDDEN)
    assert layer(x, attention_mask=torch.ones(0, 4, dtype=torch.bool, device=device)).shape == (0, 4, HIDDEN)
    # A decode step whose only token is padding: no query to attend, outputs 0.
    cache = layer.new_cache()
    layer(torch.randn(2, 3, HIDDEN, device=device, dtype=torch.float16), cache=cache)
    out = layer(torch.randn(2, 1, HIDDEN, device=device, dtype=torch.float16),
                attention_mask=torch.zeros(2, 1, dtype=torch.bool, device=device), cache=cache)
    assert out.shape == (2, 1, HIDDEN) and torch.all(out == 0)


def test_auto_backend_takes_flash_only_where_flash_attn_runs(monkeypatch):
    _FlashRecorder(monkeypatch, "cpu")  # CPU tensors seen as on an sm90 GPU
    layer = make("rope")
    q = torch.randn(1, 2, HEADS, HEAD_DIM)
    assert layer._choose_backend(q.half()) == "flash" and layer._choose_backend(q.bfloat16()) == "flash"
    assert layer._choose_backend(q) == "sdpa"  # float32: flash-attn refuses it
    assert layer._choose_backend(torch.randn(1, 2, 1, 264).half()) == "sdpa"


@pytest.mark.parametrize("capability, usable", [((7, 5), False), ((8, 0), True), ((9, 0), True), ((10, 0), True)])
def test_flash_needs_ampere_or_newer(capability, usable, monkeypatch):
    # flash-attn 2 refuses GPUs before Ampere ("FlashAttention only supports Ampere GPUs or newer."); on a T4
    # or V100 the auto backend must fall back to SDPA rather than raise.
    _FlashRecorder(monkeypatch, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _gpu(*capability))
    q = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(1, 2, HEADS, HEAD_DIM))
    why = A._flash_unusable(q)
    assert (why is None) == usable, why
    if not usable:
        assert "7.5" in why and "Ampere" in why


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


def test_forced_flash_errors(monkeypatch):
    if not A.flash_attn_available():
        with pytest.raises(ImportError, match="flash-attn"):
            posenc.Attention(HIDDEN, HEADS, backend="flash")
    monkeypatch.setitem(sys.modules, "flash_attn", FS)
    monkeypatch.setattr(A, "_flash_module", None)
    monkeypatch.setattr(A, "_flash_error", None)
    layer = posenc.Attention(HIDDEN, HEADS, backend="flash")
    with pytest.raises(ValueError, match="backend='flash'.*CUDA"):
        layer(torch.randn(1, 3, HIDDEN))  # CPU tensors


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
