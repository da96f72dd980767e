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

    assert set(ROPE_TYPES) - {"default"} == set(ROPE_INIT_FUNCTIONS) - {"posenc"}


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
