"""Inverse frequencies for every rope type transformers 5.x knows, and the masks that make p-RoPE and HoPE.

Each function ports the matching `transformers.modeling_rope_utils._compute_*_parameters` formula, but in
float64 (transformers computes in float32); tests check that both agree to float32 rounding. Frequencies are
ordered fastest first: pair i rotates by position * inv_freq[i].
"""
from __future__ import annotations

import math

import torch

__all__ = ["ROPE_TYPES", "rope_frequencies", "prope_rotated_pairs", "hope_keeps", "rotary_dim_of"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# The arguments each rope type reads (besides head_dim, base, partial_rotary_factor).
_PARAMS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "max_position_embeddings", "attention_factor",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "factor", "original_max_position_embeddings",
                 "max_position_embeddings", "attention_factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "proportional": {"factor"},
}


def rotary_dim_of(head_dim: int, partial_rotary_factor: float = 1.0, rope_type: str = "default") -> int:
    """Channels that take part in the rotation. Proportional rope always spans head_dim (its factor is p)."""
    if rope_type == "proportional":
        return head_dim
    return int(head_dim * partial_rotary_factor)


def _default(dim: int, base: float) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_frequencies(head_dim: int, base: float = 10_000.0, rope_type: str = "default", *,
                     partial_rotary_factor: float = 1.0, seq_len: int | torch.Tensor | None = None,
                     **params) -> tuple[torch.Tensor, float]:
    """(inv_freq float64 [rotary_dim/2], attention_scale) for one rope type, as transformers defines it.

    params are the rope type's entries of `config.rope_parameters` (factor, original_max_position_embeddings,
    ...) plus `max_position_embeddings` where the type reads it. seq_len is the current length, read by the
    two types that change with it (dynamic, longrope); a tensor keeps the computation traceable.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    unknown = set(params) - _PARAMS[rope_type]
    if unknown:
        raise ValueError(f"rope_type {rope_type!r} takes {sorted(_PARAMS[rope_type]) or 'no parameters'}, "
                         f"got unexpected {sorted(unknown)}")

    def need(key):
        if params.get(key) is None:
            raise ValueError(f"rope_type {rope_type!r} needs {key!r}")
        return params[key]

    dim = rotary_dim_of(head_dim, partial_rotary_factor, rope_type)
    if rope_type == "default":
        return _default(dim, base), 1.0
    if rope_type == "linear":
        return _default(dim, base) / need("factor"), 1.0
    if rope_type == "proportional":
        pairs = int(partial_rotary_factor * head_dim // 2)
        inv = torch.zeros(head_dim // 2, dtype=torch.float64)
        inv[:pairs] = _default(head_dim, base)[:pairs]
        return inv / params.get("factor", 1.0), 1.0
    if rope_type == "dynamic":
        factor, mpe = need("factor"), need("max_position_embeddings")
        if seq_len is None:
            seq_len = mpe
        if isinstance(seq_len, torch.Tensor):
            seq_len = torch.clamp(seq_len.to(torch.float64), min=mpe)
        else:
            seq_len = max(seq_len, mpe)
        scaled_base = base * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        if isinstance(scaled_base, torch.Tensor):
            exponents = exponents.to(scaled_base.device)
        return 1.0 / scaled_base ** exponents, 1.0
    if rope_type == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old_len = need("original_max_position_embeddings")
        inv = _default(dim, base)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        original = need("original_max_position_embeddings")
        factor = params.get("factor")
        if factor is None:
            factor = need("max_position_embeddings") / original

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = params.get("attention_factor")
        if attention is None:
            mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all
                         else get_mscale(factor))
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
        extrapolation = _default(dim, base)
        extrapolation_weight = 1 - ramp
        inv = extrapolation / factor * ramp + extrapolation * extrapolation_weight
        return inv, float(attention)
    # longrope
    original = need("original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = need("max_position_embeddings") / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(need("short_factor"), dtype=torch.float64)
    long = torch.tensor(need("long_factor"), dtype=torch.float64)
    for name, f in (("short_factor", short), ("long_factor", long)):
        if f.shape != (dim // 2,):
            raise ValueError(f"longrope {name} must have rotary_dim/2 = {dim // 2} entries, got {tuple(f.shape)}")
    inv_base = _default(dim, base)
    if isinstance(seq_len, torch.Tensor):
        use_long = seq_len > original
        return torch.where(use_long, inv_base.to(seq_len.device) / long.to(seq_len.device),
                           inv_base.to(seq_len.device) / short.to(seq_len.device)), float(attention)
    ext = long if (seq_len is not None and seq_len > original) else short
    return inv_base / ext, float(attention)


def prope_rotated_pairs(rotary_dim: int, p: float) -> int:
    """p-RoPE keeps the fastest int(p * rotary_dim // 2) pairs rotating, as transformers' "proportional"."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
        raise ValueError(f"p must be a number in (0, 1], got {p!r}")
    return int(p * rotary_dim // 2)


def hope_keeps(inv_freq: torch.Tensor, context_length: int) -> torch.Tensor:
    """HoPE's rule: a pair keeps rotating iff its wavelength 2*pi/inv_freq is at most the training context
    length, i.e. it completes a full period within the context. Applies to the (possibly scaled) frequencies
    given. Returns a bool mask; its count is the number of rotating pairs."""
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length <= 0:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return inv_freq >= 2 * math.pi / context_length
