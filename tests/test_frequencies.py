"""Our float64 frequencies equal transformers' ROPE_INIT_FUNCTIONS (float32) for every rope type."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from posenc.frequencies import ROPE_TYPES, hope_keeps, prope_rotated_pairs, rope_frequencies

HEAD_DIM, BASE, MAX_POS = 128, 500_000.0, 32_768
CASES = {
    "default": {},
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
    "longrope": {"short_factor": [1.0 + 0.01 * i for i in range(64)],
                 "long_factor": [1.5 + 0.1 * i for i in range(64)], "original_max_position_embeddings": 4096},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "proportional": {"partial_rotary_factor": 0.25},
}


def test_every_transformers_type_is_covered():
    import posenc  # noqa: F401  (registers its own "posenc" rope type, which wraps the others)

    theirs = {t for t in ROPE_INIT_FUNCTIONS if not t.startswith("posenc")}  # posenc's type, whatever its name
    assert set(ROPE_TYPES) - {"default"} == theirs


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("seq_len", [None, 65_536])
def test_matches_transformers(rope_type, partial, seq_len):
    params = dict(CASES[rope_type])
    if rope_type == "longrope" and partial != 1.0:
        params["short_factor"], params["long_factor"] = params["short_factor"][:32], params["long_factor"][:32]
    factor = params.pop("partial_rotary_factor", partial)
    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POS,
                         rope_parameters={"rope_type": rope_type, "rope_theta": BASE,
                                          "partial_rotary_factor": factor, **params})
    if rope_type == "default":
        dim = int(HEAD_DIM * factor)
        hf = 1.0 / BASE ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # transformers' default
        hf_scale = 1.0
    else:
        hf, hf_scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    if rope_type in ("dynamic", "yarn", "longrope"):
        params["max_position_embeddings"] = MAX_POS
    ours, scale = rope_frequencies(HEAD_DIM, BASE, rope_type, partial_rotary_factor=factor,
                                   seq_len=seq_len, **params)
    assert ours.dtype == torch.float64 and ours.shape == hf.shape
    # float32 (transformers) against float64 (ours): a few float32 rounding steps.
    torch.testing.assert_close(ours.float(), hf, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert scale == pytest.approx(hf_scale, rel=1e-12)


def test_traceable_seq_len_equals_integer_seq_len():
    for rope_type in ("dynamic", "longrope"):
        params = dict(CASES[rope_type], max_position_embeddings=MAX_POS)
        for n in (100, 70_000):
            a, _ = rope_frequencies(HEAD_DIM, BASE, rope_type, seq_len=n, **params)
            b, _ = rope_frequencies(HEAD_DIM, BASE, rope_type, seq_len=torch.tensor(n), **params)
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_masks():
    inv, _ = rope_frequencies(128, 10_000.0)
    assert int(hope_keeps(inv, 4096).sum()) == 46
    assert prope_rotated_pairs(512, 0.25) == 64 and prope_rotated_pairs(128, 1.0) == 64


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_computed_on_the_cpu_under_the_meta_device(rope_type):
    """Regression for meta-device model construction: the constants must not become meta tensors."""
    params = dict(CASES[rope_type])
    factor = params.pop("partial_rotary_factor", 1.0)
    if rope_type in ("dynamic", "yarn", "longrope"):
        params["max_position_embeddings"] = MAX_POS
    want, want_scale = rope_frequencies(HEAD_DIM, BASE, rope_type, partial_rotary_factor=factor, **params)
    with torch.device("meta"):
        got, scale = rope_frequencies(HEAD_DIM, BASE, rope_type, partial_rotary_factor=factor, **params)
    assert got.device.type == "cpu" and torch.equal(got, want) and scale == want_scale


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(head_dim=True), TypeError, "head_dim"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(base=float("nan")), ValueError, "base"),
    (dict(base=1.0), ValueError, "base"),
    (dict(base="1e4"), TypeError, "base"),
    (dict(partial_rotary_factor=1.5), ValueError, "partial_rotary_factor"),
    (dict(partial_rotary_factor=0.01), ValueError, "rotary_dim"),  # int(128 * 0.01) = 1 channel
    (dict(seq_len=-1), ValueError, "seq_len"),
    (dict(seq_len=2.5), TypeError, "seq_len"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    args = {"head_dim": 128, "base": 1e4, **kwargs}
    with pytest.raises(error, match=match):
        rope_frequencies(args.pop("head_dim"), args.pop("base"), **args)


def test_mask_arguments_are_checked():
    inv, _ = rope_frequencies(64)
    for bad, error in ((4096.0, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="context_length"):
            hope_keeps(inv, bad)
    for bad, error in ((float("nan"), ValueError), ("0.5", TypeError), (0, ValueError), (1.01, ValueError)):
        with pytest.raises(error, match="p must"):
            prope_rotated_pairs(64, bad)
