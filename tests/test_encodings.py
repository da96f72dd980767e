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
