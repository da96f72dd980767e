"""Rope parameters as transformers reads them: partial_rotary_factor for every rope type (against transformers'
ROPE_INIT_FUNCTIONS and a rotary embedding module's cos/sin), and the validation of each type's parameters."""
import math

import pytest
import torch
from transformers import PhiConfig
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding, apply_rotary_pos_emb

import posenc
from posenc.cli import main
from posenc.frequencies import ROPE_TYPES, rope_frequencies

HEAD_DIM, BASE, MAX_POS, ORIGINAL = 64, 10_000.0, 2048, 512
EPS32 = torch.finfo(torch.float32).eps


def type_params(rope_type, pairs):
    """A rope_parameters entry of each type (pairs: rotary_dim / 2, the length of longrope's factor lists)."""
    return {
        "default": {},
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 2.0},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32, "beta_slow": 1},
        "longrope": {"short_factor": [1.0 + 0.05 * i for i in range(pairs)],
                     "long_factor": [1.5 + 0.25 * i for i in range(pairs)],
                     "original_max_position_embeddings": ORIGINAL},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL},
        "proportional": {},
    }[rope_type]


def hf_config(rope_type, factor):
    """A tiny Phi config (its rotary embedding reads partial_rotary_factor for every rope type) with this
    rope type and factor in rope_parameters, as transformers 5.x stores them."""
    dim = HEAD_DIM if rope_type == "proportional" else int(HEAD_DIM * factor)
    config = PhiConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, max_position_embeddings=MAX_POS,
                       rope_parameters={"rope_type": rope_type, "rope_theta": BASE, "partial_rotary_factor": factor,
                                        **type_params(rope_type, dim // 2)})
    assert config.rope_parameters["partial_rotary_factor"] == factor
    return config


def ours(config):
    """posenc's encoding built from the same rope_parameters (plus max_position_embeddings where the type reads it)."""
    scaling = dict(config.rope_parameters)
    if scaling["rope_type"] in ("dynamic", "yarn", "longrope"):
        scaling["max_position_embeddings"] = config.max_position_embeddings
    return posenc.RoPE(HEAD_DIM, scaling=scaling)


def hf_apply(q, k, cos, sin, rope_type, factor):
    """transformers' application: Phi rotates the first int(head_dim * factor) channels; Gemma 4's proportional
    layers rotate all of head_dim with cos/sin as wide as head_dim."""
    dim = cos.shape[-1]
    assert dim == (HEAD_DIM if rope_type == "proportional" else int(HEAD_DIM * factor))
    qr, kr = apply_rotary_pos_emb(q[..., :dim], k[..., :dim], cos, sin, unsqueeze_dim=2)  # q, k bshd
    return torch.cat([qr, q[..., dim:]], -1), torch.cat([kr, k[..., dim:]], -1)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_partial_rotary_factor_matches_transformers(rope_type, factor):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(rope_type, factor)
    enc = ours(config)
    if rope_type == "default":
        hf_inv, hf_scale = PhiRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        hf_inv, hf_scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    assert enc.rotary_dim == 2 * hf_inv.numel()
    torch.testing.assert_close(enc.inv_freq64.float(), hf_inv, rtol=4 * EPS32, atol=0)
    assert enc.rotated_pairs == int((hf_inv != 0).sum()) and enc.attention_scale == pytest.approx(hf_scale)
    if rope_type == "proportional":
        assert enc.rotated_pairs == int(factor * HEAD_DIM // 2)  # 8 / 16 / 32 of 32 pairs
    else:
        assert enc.rotary_dim == int(HEAD_DIM * factor)

    # cos/sin of the rotary embedding module (fresh for each call: dynamic and longrope keep state) and the
    # rotation it implies, at positions inside and beyond the original context (dynamic/longrope switch there).
    for start in (0, 3000):
        positions = torch.arange(start, start + 8).unsqueeze(0)
        q, k = torch.randn(1, 8, 2, HEAD_DIM), torch.randn(1, 8, 1, HEAD_DIM)
        cos, sin = PhiRotaryEmbedding(config)(q, positions)
        my_cos, my_sin = enc.cos_sin(positions)
        # transformers forms angles in float32: within a few roundings of position * inv_freq.
        tol = 4 * EPS32 * (start + 8) * float(enc.inv_freq64.max()) * enc.attention_scale + 1e-6
        torch.testing.assert_close(my_cos, cos, rtol=0, atol=tol)
        torch.testing.assert_close(my_sin, sin, rtol=0, atol=tol)
        want_q, want_k = hf_apply(q, k, cos, sin, rope_type, factor)
        got_q, got_k = enc.apply(q, k, positions)
        torch.testing.assert_close(got_q, want_q, rtol=0, atol=8 * tol)
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=8 * tol)


def test_partial_rotary_factor_is_not_dropped():
    """Regression: the factor in `scaling` was popped and ignored (proportional rotated all pairs; other types
    all channels)."""
    prop = posenc.RoPE(128, scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25})
    assert prop.rotary_dim == 128 and prop.rotated_pairs == 16
    default = posenc.RoPE(128, scaling={"rope_type": "default", "partial_rotary_factor": 0.5})
    assert default.rotary_dim == 64 and default.rotated_pairs == 32
    # The same through the keyword argument, and both when they agree.
    assert posenc.RoPE(128, partial_rotary_factor=0.25, scaling={"rope_type": "proportional"}).rotated_pairs == 16
    assert posenc.HoPE(128, partial_rotary_factor=0.5, context_length=4096,
                       scaling={"partial_rotary_factor": 0.5}).rotary_dim == 64


@pytest.mark.parametrize("build,match", [
    (lambda: posenc.RoPE(128, partial_rotary_factor=0.5, scaling={"partial_rotary_factor": 0.25}),
     "partial_rotary_factor=0.5 and scaling"),
    (lambda: posenc.RoPE(128, 1e4, scaling={"rope_theta": 5e5}), "base=10000.0 and scaling\\['rope_theta'\\]"),
    (lambda: posenc.RoPE(128, rotary_dim=64, scaling={"rope_type": "proportional"}), "give partial_rotary_factor"),
    (lambda: posenc.RoPE(128, scaling={"rope_type": "proportional", "p": 0.25}), "unexpected \\['p'\\]"),
])
def test_conflicting_or_undocumented_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_rope_theta_in_scaling_is_the_base():
    enc = posenc.RoPE(64, scaling={"rope_type": "default", "rope_theta": 5e5})
    assert enc.base == 5e5
    torch.testing.assert_close(enc.inv_freq64, 5e5 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64),
                               rtol=1e-15, atol=0)


def run_cli(capsys, *argv):
    code = main(["freqs", "--head-dim", "128", "--context", "4096", "--json", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_proportional_partial_factor(capsys):
    import json

    code, out, _ = run_cli(capsys, "--rope-type", "proportional", "--partial-rotary-factor", "0.25")
    table = json.loads(out)
    assert code == 0 and table["rotary_dim"] == 128 and table["rotated"]["rope"] == 16
    assert [r["rope"] for r in table["pairs"]] == [True] * 16 + [False] * 48


# ------------------------------------------------------------------------------------------- validation
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
YARN = {"factor": 4.0, "original_max_position_embeddings": 512}
LONG = {"short_factor": [1.0] * 32, "long_factor": [2.0] * 32, "original_max_position_embeddings": 512,
        "max_position_embeddings": 2048}
BAD = [  # (rope type, parameters, error, the key the message must name)
    ("linear", {"factor": 0}, ValueError, "factor"),
    ("linear", {"factor": 0.5}, ValueError, "factor"),
    ("linear", {"factor": float("nan")}, ValueError, "factor"),
    ("linear", {"factor": "2"}, TypeError, "factor"),
    ("linear", {"factor": True}, TypeError, "factor"),
    ("dynamic", {"factor": 0, "max_position_embeddings": 128}, ValueError, "factor"),
    ("dynamic", {"factor": 2.0, "max_position_embeddings": 0}, ValueError, "max_position_embeddings"),
    ("dynamic", {"factor": 2.0, "max_position_embeddings": 12.5}, TypeError, "max_position_embeddings"),
    ("yarn", {**YARN, "factor": 0}, ValueError, "factor"),
    ("yarn", {**YARN, "original_max_position_embeddings": 0}, ValueError, "original_max_position_embeddings"),
    ("yarn", {**YARN, "attention_factor": 0.0}, ValueError, "attention_factor"),
    ("yarn", {**YARN, "attention_factor": -1.0}, ValueError, "attention_factor"),
    ("yarn", {**YARN, "beta_fast": 1, "beta_slow": 32}, ValueError, "beta_fast"),
    ("yarn", {**YARN, "beta_fast": -4}, ValueError, "beta_fast"),
    ("yarn", {**YARN, "beta_slow": 0}, ValueError, "beta_slow"),
    ("yarn", {**YARN, "mscale": -1.0, "mscale_all_dim": 1.0}, ValueError, "mscale"),
    ("yarn", {**YARN, "truncate": "no"}, TypeError, "truncate"),
    ("longrope", {**LONG, "short_factor": [1.0] * 31}, ValueError, "short_factor"),
    ("longrope", {**LONG, "long_factor": [2.0] * 31 + [0.0]}, ValueError, "long_factor"),
    ("longrope", {**LONG, "long_factor": "2.0"}, TypeError, "long_factor"),
    ("longrope", {**LONG, "factor": 0.5}, ValueError, "factor"),
    ("longrope", {**LONG, "attention_factor": 0}, ValueError, "attention_factor"),
    ("longrope", {**LONG, "original_max_position_embeddings": 1}, ValueError, "original_max_position_embeddings"),
    ("llama3", {**LLAMA3, "factor": 0}, ValueError, "factor"),
    ("llama3", {**LLAMA3, "low_freq_factor": 0}, ValueError, "low_freq_factor"),
    ("llama3", {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 4.0}, ValueError, "high_freq_factor"),
    ("llama3", {**LLAMA3, "original_max_position_embeddings": 0}, ValueError, "original_max_position_embeddings"),
    ("proportional", {"factor": 0}, ValueError, "factor"),
    ("proportional", {"factor": -2.0}, ValueError, "factor"),
]


@pytest.mark.parametrize("rope_type,params,error,key", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_rope_parameters_raise_naming_the_key(rope_type, params, error, key):
    with pytest.raises(error, match=key):
        rope_frequencies(64, 1e4, rope_type, **params)
    with pytest.raises(error, match=key):
        posenc.RoPE(64, scaling={"rope_type": rope_type, **params})


GOOD = [  # the boundaries transformers accepts are accepted here too
    ("linear", {"factor": 1}),
    ("dynamic", {"factor": 1.0, "max_position_embeddings": 1}),
    ("yarn", {**YARN, "factor": 1.0, "beta_fast": 1, "beta_slow": 1, "mscale": 0, "mscale_all_dim": 0}),
    ("yarn", {"original_max_position_embeddings": 512, "max_position_embeddings": 2048}),  # factor implied
    ("longrope", {**LONG, "factor": 1.0, "attention_factor": 1}),
    ("llama3", {**LLAMA3, "factor": 1, "low_freq_factor": 0.5, "high_freq_factor": 0.75}),
    ("proportional", {"factor": 0.5}),
]


@pytest.mark.parametrize("rope_type,params", GOOD)
def test_boundary_rope_parameters_are_accepted(rope_type, params):
    inv, scale = rope_frequencies(64, 1e4, rope_type, **params)
    assert torch.isfinite(inv).all() and (inv > 0).any() and math.isfinite(scale) and scale > 0


def test_dynamic_needs_more_than_one_pair():
    """Regression: head_dim 2 divided by zero (dim / (dim - 2))."""
    with pytest.raises(ValueError, match="rotary_dim"):
        posenc.RoPE(2, scaling={"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 16})


@pytest.mark.parametrize("argv,needle", [
    (["--rope-type", "linear", "--rope-param", "factor=0"], "factor"),
    (["--rope-type", "linear", "--factor", "0.5"], "factor"),
    (["--rope-type", "dynamic", "--factor", "2", "--rope-param", "max_position_embeddings=0"],
     "max_position_embeddings"),
    (["--rope-type", "yarn", "--factor", "4", "--rope-param", "original_max_position_embeddings=512",
      "--rope-param", "beta_fast=1", "--rope-param", "beta_slow=8"], "beta_fast"),
    (["--rope-type", "llama3", "--factor", "8", "--rope-param", "low_freq_factor=4", "--rope-param",
      "high_freq_factor=1", "--rope-param", "original_max_position_embeddings=512"], "high_freq_factor"),
    (["--rope-type", "proportional", "--rope-param", "p=0.25"], "'p'"),
])
def test_cli_bad_rope_parameters_are_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posenc freqs: error:") and needle in lines[0], err
