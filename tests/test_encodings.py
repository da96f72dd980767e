"""Every encoding against an independent float64 computation, and the properties that define them."""
import itertools

import pytest
import torch

import posenc
from helpers import assert_close_to_64, expected_inv_freq, rotate64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = {
    "rope": {},
    "prope": {"p": 0.25},
    "hope": {"context_length": 512},
    "nope": {},
}


def make(kind, head_dim, **kw):
    return posenc.get_encoding(kind, head_dim=head_dim, **{**KINDS[kind], **kw})


def positions_for(batch, seq, large):
    """Per-row offsets (left padding / KV-cache decoding), optionally beyond 1e5."""
    start = torch.randint(0, 200_000 if large else 64, (batch, 1))
    return start + torch.arange(seq)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256, 512])
def test_inv_freq_matches_definition(kind, head_dim):
    enc = make(kind, head_dim)
    expected = expected_inv_freq(kind, head_dim, p=0.25, context_length=512)
    torch.testing.assert_close(enc.inv_freq64, expected, rtol=1e-12, atol=0)
    assert enc.inv_freq.dtype == torch.float32 and enc.inv_freq.shape == (head_dim // 2,)
    assert enc.rotated_pairs == int((expected != 0).sum())


def test_documented_hope_counts():
    assert posenc.HoPE(128, 10_000.0, context_length=4096).rotated_pairs == 46
    assert posenc.HoPE(64, 10_000.0, context_length=512).rotated_pairs == 16


CASES = list(itertools.product(
    list(KINDS), DTYPES, ["bshd", "bhsd"], [64, 80, 128, 256, 512], [(4, 4), (8, 2), (6, 1), (3, 3)],
))


@pytest.mark.parametrize("kind,dtype,layout,head_dim,heads", CASES)
def test_apply_matches_float64(kind, dtype, layout, head_dim, heads):
    batch, seq = 2, 5
    interleaved = head_dim == 80  # cover the interleaved layout on one size of every combination
    rotary_dim = head_dim // 2 if head_dim == 256 else None  # and partial rotary on another
    enc = make(kind, head_dim, interleaved=interleaved, rotary_dim=rotary_dim)
    hq, hk = heads
    shape = (batch, seq) if layout == "bshd" else (batch,)
    q = torch.randn(*shape, hq, *((seq,) if layout == "bhsd" else ()), head_dim).to(dtype)
    k = torch.randn(*shape, hk, *((seq,) if layout == "bhsd" else ()), head_dim).to(dtype)
    positions = positions_for(batch, seq, large=head_dim in (128, 512))
    q0, k0 = q.clone(), k.clone()
    q2, k2 = enc.apply(q, k, positions, layout=layout)
    assert torch.equal(q, q0) and torch.equal(k, k0), "out of place must leave its inputs untouched"
    inv = expected_inv_freq(kind, head_dim, rotary_dim=rotary_dim, p=0.25, context_length=512)
    for x, out in ((q, q2), (k, k2)):
        assert out.dtype == dtype and out.shape == x.shape
        want = rotate64(x, positions, inv, rotary_dim, interleaved, layout)
        assert_close_to_64(out, want, x, dtype, rotary_dim, interleaved)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_matches_out_of_place_and_skips_unrotated(kind, interleaved):
    enc = make(kind, 128, interleaved=interleaved)
    q, k = torch.randn(2, 6, 4, 128), torch.randn(2, 6, 2, 128)
    positions = positions_for(2, 6, large=True)
    q2, k2 = enc.apply(q, k, positions)
    q_in, k_in = q.clone(), k.clone()
    out = enc.apply(q_in, k_in, positions, inplace=True)
    assert out[0] is q_in and out[1] is k_in
    assert torch.equal(q_in, q2) and torch.equal(k_in, k2)
    # Pairs that do not rotate are bit-identical (in place they are not even touched).
    n = enc.rotated_pairs
    if interleaved:
        untouched = slice(2 * n, 128)
    else:
        untouched = torch.cat([torch.arange(n, 64), torch.arange(64 + n, 128)])
    assert torch.equal(q_in[..., untouched], q[..., untouched])


@pytest.mark.parametrize("kind", ["rope", "prope", "hope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_preserves_pair_norms(kind, dtype):
    enc = make(kind, 64)
    q, k = torch.randn(3, 7, 2, 64, dtype=dtype), torch.randn(3, 7, 1, 64, dtype=dtype)
    q2, _ = enc.apply(q, k, positions_for(3, 7, large=True))
    norms = lambda x: x[..., :32] ** 2 + x[..., 32:] ** 2  # noqa: E731 (pair i = (x[i], x[i+32]))
    torch.testing.assert_close(norms(q2), norms(q), rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("kind", ["rope", "prope", "hope"])
def test_scores_depend_only_on_position_difference(kind):
    enc = make(kind, 128)
    q, k = torch.randn(1, 1, 1, 128, dtype=torch.float64), torch.randn(1, 1, 1, 128, dtype=torch.float64)
    shift = int(torch.randint(1, 50_000, ()))
    scores = []
    for offset in (0, shift):
        qm, _ = enc.apply(q, q, torch.tensor([[37 + offset]]))
        kn, _ = enc.apply(k, k, torch.tensor([[5 + offset]]))
        scores.append((qm * kn).sum())
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-10)
    # ...and they do depend on it (the encoding is not the identity).
    qm, _ = enc.apply(q, q, torch.tensor([[40]]))
    kn, _ = enc.apply(k, k, torch.tensor([[5]]))
    assert not torch.allclose((qm * kn).sum(), scores[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nope_is_identity(dtype):
    enc = posenc.NoPE(96)
    q, k = torch.randn(2, 5, 3, 96).to(dtype), torch.randn(2, 5, 1, 96).to(dtype)
    q2, k2 = enc.apply(q, k, positions_for(2, 5, large=True))
    assert torch.equal(q2, q) and torch.equal(k2, k) and enc.rotated_pairs == 0


def test_prope_equals_transformers_proportional():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for head_dim, p, base in ((512, 0.25, 1e6), (128, 0.75, 1e4), (256, 0.5, 1e4)):
        config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                             rope_parameters={"rope_type": "proportional", "rope_theta": base,
                                              "partial_rotary_factor": p})
        hf, _ = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
        enc = posenc.PRoPE(head_dim, base, p=p)
        torch.testing.assert_close(enc.inv_freq, hf, rtol=2e-7, atol=0)
        assert enc.rotated_pairs == int((hf != 0).sum())


@pytest.mark.parametrize("interleaved", [False, True])
def test_cos_sin_tables(interleaved):
    enc = posenc.HoPE(64, context_length=512, interleaved=interleaved)
    positions = torch.tensor([[0, 3, 100_000]])
    cos, sin = enc.cos_sin(positions, dtype=torch.bfloat16)
    assert cos.shape == (1, 3, 64) and cos.dtype == torch.bfloat16
    angle = positions.double()[..., None] * expected_inv_freq("hope", 64, context_length=512)
    want = angle.cos().repeat_interleave(2, -1) if interleaved else torch.cat([angle.cos()] * 2, -1)
    torch.testing.assert_close(cos, want.to(torch.bfloat16), rtol=0, atol=0)
    # The same tables through the op's table path give the encoding's own result.
    q, k = torch.randn(1, 3, 2, 64), torch.randn(1, 3, 1, 64)
    c32, s32 = enc.cos_sin(positions)
    via_tables = posenc.apply_rotary(q, k, c32, s32, interleaved=interleaved)
    direct = enc.apply(q, k, positions)
    inv = expected_inv_freq("hope", 64, context_length=512)
    for x, a, b in ((q, via_tables[0], direct[0]), (k, via_tables[1], direct[1])):
        for out in (a, b):  # both within two float32 rounding steps of the exact rotation
            assert_close_to_64(out, rotate64(x, positions, inv, interleaved=interleaved), x, torch.float32,
                               interleaved=interleaved)


@pytest.mark.parametrize("rope_type,params", [
    ("linear", {"factor": 4.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096}),
])
def test_hope_masks_scaled_frequencies(rope_type, params):
    from posenc.frequencies import rope_frequencies

    enc = posenc.HoPE(128, 5e5, context_length=8192, scaling={"rope_type": rope_type, **params})
    scaled, scale = rope_frequencies(128, 5e5, rope_type, **params)
    keep = 2 * torch.pi / scaled <= 8192
    torch.testing.assert_close(enc.inv_freq64, torch.where(keep, scaled, 0.0), rtol=0, atol=0)
    q, k = torch.randn(1, 4, 2, 128), torch.randn(1, 4, 1, 128)
    positions = torch.arange(4) + 9000
    q2, _ = enc.apply(q, k, positions)
    assert_close_to_64(q2, rotate64(q, positions, enc.inv_freq64, scale=scale), q, torch.float32)


def test_dynamic_ntk_follows_sequence_length():
    from posenc.frequencies import rope_frequencies

    enc = posenc.RoPE(64, scaling={"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 128})
    q, k = torch.randn(1, 300, 1, 64), torch.randn(1, 300, 1, 64)
    positions = torch.arange(300)
    q2, _ = enc.apply(q, k, positions)
    inv, _ = rope_frequencies(64, 10_000.0, "dynamic", factor=2.0, max_position_embeddings=128, seq_len=300)
    assert_close_to_64(q2, rotate64(q, positions, inv), q, torch.float32)


def test_module_casts_keep_frequencies_exact():
    enc = posenc.RoPE(64)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), enc).to(torch.bfloat16)
    assert enc.inv_freq64.dtype == torch.float64 and enc.inv_freq.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------ sequence-length dependent types
SEQ_TYPES = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [3.0] * 32,
                 "original_max_position_embeddings": 16, "max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope_type", list(SEQ_TYPES))
def test_sequence_length_types_on_zero_tokens(rope_type):
    """Regression: dynamic/longrope took positions.max() of an empty tensor; the other encodings handle 0 tokens."""
    enc = posenc.RoPE(64, scaling=SEQ_TYPES[rope_type])
    q, k = torch.randn(2, 0, 4, 64), torch.randn(2, 0, 2, 64)
    for positions in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), None):
        q2, k2 = enc.apply(q, k, positions)
        assert q2.shape == q.shape and k2.shape == k.shape
    cos, sin = enc.cos_sin(torch.zeros(0, dtype=torch.long))
    assert cos.shape == sin.shape == (0, 64)
    packed = enc.apply(q[0], k[0], cu_seqlens=torch.tensor([0, 0]))
    assert packed[0].shape == (0, 4, 64)


@pytest.mark.parametrize("rope_type", list(SEQ_TYPES))
def test_sequence_length_types_without_positions_see_the_sequence_length(rope_type):
    """Regression: without positions the frequencies of the configured length were used, whatever the length."""
    from posenc.frequencies import rope_frequencies

    scaling = dict(SEQ_TYPES[rope_type])
    enc = posenc.RoPE(64, scaling=scaling)
    scaling.pop("rope_type")
    q, k = torch.randn(1, 40, 2, 64), torch.randn(1, 40, 1, 64)
    inv, scale = rope_frequencies(64, 10_000.0, rope_type, seq_len=40, **scaling)  # 40 > 16: scaled / long factors
    assert not torch.allclose(inv, enc.inv_freq64)
    positions = torch.arange(40)
    q2, _ = enc.apply(q, k)
    assert_close_to_64(q2, rotate64(q, positions, inv, scale=scale), q, torch.float32, factor=2 * scale)
    # Packed: each sequence restarts at 0, so the longest one (40 tokens) sets the length.
    qp, _ = enc.apply(torch.cat([q[0], q[0, :5]]), torch.cat([k[0], k[0, :5]]), cu_seqlens=torch.tensor([0, 40, 45]))
    torch.testing.assert_close(qp[:40], q2[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- meta device
@pytest.mark.parametrize("kind", list(KINDS))
def test_built_under_meta_device_has_real_frequencies(kind):
    """Regression: torch.nonzero on meta raised, so no encoding (nor Attention, nor TinyDecoder) could be
    built under torch.device("meta")."""
    with torch.device("meta"):
        enc = make(kind, 64)
    cpu = make(kind, 64)
    assert enc.inv_freq64.device.type == "cpu" and torch.equal(enc.inv_freq64, cpu.inv_freq64)
    assert enc.rotated_pairs == cpu.rotated_pairs and torch.equal(enc.inv_freq, cpu.inv_freq)


def test_apply_rotary_on_meta_in_every_table_form():
    """Meta tensors carry shapes, not values: tables with positions (whose range check reads values) and per-token
    tables give meta outputs of the right shapes, as inv_freq does."""
    meta = lambda *shape: torch.empty(*shape, device="meta")
    q, k = meta(2, 5, 4, 16), meta(2, 5, 1, 16)
    positions = torch.empty(2, 5, dtype=torch.long, device="meta")
    for args in ((meta(32, 8), meta(32, 8), positions), (meta(2, 5, 16), meta(2, 5, 16))):
        qo, ko = posenc.apply_rotary(q, k, *args)
        assert qo.device.type == ko.device.type == "meta" and qo.shape == q.shape and ko.shape == k.shape


@pytest.mark.parametrize("scaling", [None, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 8}])
def test_apply_on_meta_does_not_poison_later_calls(scaling):
    """Regression: one apply on meta tensors moved the buffers to meta for good, and later CPU calls failed."""
    enc = posenc.HoPE(64, context_length=512, scaling=scaling)
    q, k = torch.randn(2, 12, 4, 64), torch.randn(2, 12, 2, 64)
    want = enc.apply(q, k)
    meta_q, meta_k = enc.apply(q.to("meta"), k.to("meta"), torch.arange(12, device="meta"))
    assert meta_q.device.type == "meta" and meta_q.shape == q.shape
    cos, _ = enc.cos_sin(torch.arange(12, device="meta"))
    assert cos.device.type == "meta" and cos.shape == (12, 64)
    assert enc.inv_freq64.device.type == "cpu"
    got = enc.apply(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_moved_to_meta_and_back_keeps_frequencies():
    enc = posenc.PRoPE(64, p=0.5)
    want = enc.inv_freq64.clone()
    enc.to("meta")
    assert enc.inv_freq64.device.type == "meta"
    enc.to("cpu")  # a plain module cannot leave meta with .to(); the encoding's values live in its CPU master
    assert torch.equal(enc.inv_freq64, want)
    enc.to_empty(device="meta")
    enc.to_empty(device="cpu")
    assert torch.equal(enc.inv_freq64, want) and enc.inv_freq.dtype == torch.float32
    enc.inv_freq64.zero_()  # damage the buffers: reset_parameters rebuilds them from the options
    enc.reset_parameters()
    assert torch.equal(enc.inv_freq64, want)


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_decoder_built_under_meta_then_materialised_equals_cpu_twin(kind):
    """Meta-device initialisation end to end: build under torch.device("meta"), to_empty on the CPU, load the
    state dict of a CPU-built twin: the same logits and generations (tied embeddings stay tied)."""
    kw = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, encoding=kind,
              **KINDS[kind])
    twin = posenc.TinyDecoder(**kw).eval()
    with torch.device("meta"):
        model = posenc.TinyDecoder(**kw).eval()
    assert model.embed.weight.device.type == "meta"
    ids = torch.randint(0, 64, (2, 9))
    assert model(ids.to("meta")).shape == (2, 9, 64)  # a shape-only pass on meta works
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.embed.weight
    model.load_state_dict(twin.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids), twin(ids))
    assert torch.equal(model.generate(ids, 4), twin.generate(ids, 4))
    for a, b in zip(model.attentions, twin.attentions):
        assert torch.equal(a.encoding.inv_freq64, b.encoding.inv_freq64)


def test_attention_built_under_meta():
    with torch.device("meta"):
        layer = posenc.Attention(64, 4, num_kv_heads=2, encoding="hope", context_length=256)
    twin = posenc.Attention(64, 4, num_kv_heads=2, encoding="hope", context_length=256)
    layer.to_empty(device="cpu")
    layer.load_state_dict(twin.state_dict())
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), twin(x))


# -------------------------------------------------------------------------------- degenerate and bad input
def test_hope_shorter_than_the_fastest_wavelength_warns_it_is_nope():
    with pytest.warns(UserWarning, match="context_length=6.*equals NoPE"):
        enc = posenc.HoPE(64, context_length=6)  # the fastest pair's wavelength is 2*pi > 6 tokens
    assert enc.rotated_pairs == 0
    with pytest.warns(UserWarning, match="p=0.01.*equals NoPE"):
        posenc.PRoPE(64, p=0.01)
    with pytest.warns(UserWarning, match="partial_rotary_factor=0.1.*equals NoPE"):
        posenc.RoPE(8, scaling={"rope_type": "proportional", "partial_rotary_factor": 0.1})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert posenc.HoPE(64, context_length=7).rotated_pairs == 1  # 2*pi <= 7: one pair rotates
        posenc.NoPE(64)


@pytest.mark.parametrize("build,error,match", [
    (lambda: posenc.RoPE(True), TypeError, "head_dim"),
    (lambda: posenc.RoPE(64.0), TypeError, "head_dim"),
    (lambda: posenc.RoPE(64, float("nan")), ValueError, "base"),
    (lambda: posenc.RoPE(64, float("inf")), ValueError, "base"),
    (lambda: posenc.RoPE(64, "1e4"), TypeError, "base"),
    (lambda: posenc.RoPE(64, True), TypeError, "base"),
    (lambda: posenc.RoPE(64, partial_rotary_factor=float("nan")), ValueError, "partial_rotary_factor"),
    (lambda: posenc.RoPE(64, partial_rotary_factor=0.0), ValueError, "partial_rotary_factor"),
    (lambda: posenc.RoPE(64, partial_rotary_factor=True), TypeError, "partial_rotary_factor"),
    (lambda: posenc.RoPE(64, partial_rotary_factor=0.3), ValueError, "partial_rotary_factor"),  # 19 channels
    (lambda: posenc.RoPE(64, rotary_dim=True), ValueError, "rotary_dim"),
    (lambda: posenc.RoPE(64, interleaved="yes"), TypeError, "interleaved"),
    (lambda: posenc.RoPE(64, scaling="linear"), TypeError, "scaling"),
    (lambda: posenc.RoPE(64, scaling={"rope_type": 3}), TypeError, "rope_type"),
    (lambda: posenc.PRoPE(64, p=float("nan")), ValueError, "p must"),
    (lambda: posenc.PRoPE(64, p="0.5"), TypeError, "p must"),
    (lambda: posenc.PRoPE(64, p=True), TypeError, "p must"),
    (lambda: posenc.HoPE(64, context_length=4096.0), TypeError, "context_length"),
    (lambda: posenc.HoPE(64, context_length=True), TypeError, "context_length"),
    (lambda: posenc.RoPE(64).cos_sin(torch.ones(3, dtype=torch.bool)), TypeError, "positions"),
])
def test_bad_types_and_values_are_rejected(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_encoding_class_resolves_names_without_building():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is built, so no "equals NoPE" warning for a probe
        assert posenc.encodings.encoding_class("p-rope") is posenc.PRoPE
        assert posenc.encodings.encoding_class("None") is posenc.NoPE
    with pytest.raises(ValueError, match="unknown encoding"):
        posenc.encodings.encoding_class("alibi")
    with pytest.raises(TypeError, match="encoding name"):
        posenc.encodings.encoding_class(3)


def test_each_encoding_declares_its_options_and_masks_given_frequencies():
    """`options` names each encoding's own arguments (kept as attributes); `mask` applies the encoding's rule to
    frequencies from elsewhere (a model's own, as the patcher uses it), checked here by hand."""
    assert {cls.name: cls.options for cls in posenc.ENCODINGS.values()} == {
        "rope": (), "prope": ("p",), "hope": ("context_length",), "nope": ()}
    hope, prope = posenc.HoPE(16, context_length=100), posenc.PRoPE(16, p=0.5)
    assert (hope.context_length, prope.p) == (100, 0.5)
    inv = torch.tensor([1.0, 0.5, 0.1, 0.01, 1e-3, 1e-4], dtype=torch.float64)  # 6 pairs, not the encodings' 8
    first_three = torch.tensor([1.0, 0.5, 0.1, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(hope.mask(inv), first_three)  # wavelengths 6.3, 12.6, 62.8 tokens <= 100 < 628
    assert torch.equal(prope.mask(inv), first_three)  # int(0.5 * 6) = 3 of the 6 pairs given
    assert torch.equal(posenc.RoPE(16).mask(inv), inv)
    assert torch.equal(posenc.NoPE(16).mask(inv), torch.zeros_like(inv))


def test_rotated_pairs_and_the_pairs_the_op_visits():
    from posenc.encodings import op_pairs_of, rotated_pairs_of
    assert rotated_pairs_of(torch.tensor([1.0, 0.5, 0.0, 0.0])) == 2
    assert rotated_pairs_of(torch.zeros(4)) == 0
    assert (op_pairs_of(2, 4, 1.0), op_pairs_of(2, 4, 1.25)) == (2, 4)
    # yarn's attention scale multiplies the frozen pairs too: the op must visit all 32 of NoPE's
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    nope = posenc.NoPE(64, scaling=yarn)
    assert nope.attention_scale != 1.0 and (nope.rotated_pairs, nope.op_pairs) == (0, 32)
    hope = posenc.HoPE(64, context_length=64)
    assert (hope.rotated_pairs, hope.op_pairs) == (rotated_pairs_of(hope.inv_freq64),) * 2
