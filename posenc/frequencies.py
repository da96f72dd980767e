"""Inverse frequencies for every rope type transformers 5.x knows, and the masks that make p-RoPE and HoPE.

Each function ports the matching `transformers.modeling_rope_utils._compute_*_parameters` formula, but in
float64 (transformers computes in float32); tests check that both agree to float32 rounding. Frequencies are
ordered fastest first: pair i rotates by position * inv_freq[i].
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["ROPE_TYPES", "LENGTH_DEPENDENT_TYPES", "ROPE_PARAMS", "rope_frequencies", "prope_rotated_pairs", "hope_keeps", "rotary_dim_of"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# The rope types whose frequencies change with the sequence length (the largest position).
LENGTH_DEPENDENT_TYPES = ("dynamic", "longrope")
# The arguments each rope type reads (besides head_dim, base, partial_rotary_factor).
ROPE_PARAMS = {
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
    """Channels that take part in the rotation, as transformers reads partial_rotary_factor: the first
    int(head_dim * factor) channels for every rope type but "proportional", which always spans head_dim (its
    factor is the fraction of pairs that rotate, the others get frequency 0)."""
    if rope_type == "proportional":
        return head_dim
    return int(head_dim * partial_rotary_factor)


def _default(dim: int, base: float) -> torch.Tensor:
    # Explicitly on the CPU: these are tiny constants, also when a model is built under torch.device("meta").
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None, why: str = "") -> float:
    """value as a float if it is a finite real number within the bounds, else TypeError / ValueError naming
    `name`, the bound and `why` (the remedy)."""
    bounds = " and ".join(b for b in ((f"> {above:g}" if above is not None else ""),
                                      (f">= {at_least:g}" if at_least is not None else ""),
                                      (f"<= {at_most:g}" if at_most is not None else "")) if b)
    expected = f"a finite number{' ' + bounds if bounds else ''}{why}"
    if not _is_number(value):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    x = float(value)
    if (not math.isfinite(x) or (above is not None and not x > above)
            or (at_least is not None and not x >= at_least) or (at_most is not None and not x <= at_most)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return x


def check_int(name: str, value, *, at_least: int = 1, why: str = "") -> int:
    """value if it is an int (not a bool) >= at_least, else TypeError / ValueError naming `name`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {at_least}{why}, got {type(value).__name__} {value!r}")
    if value < at_least:
        raise ValueError(f"{name} must be an int >= {at_least}{why}, got {value!r}")
    return int(value)


def _check_params(rope_type: str, dim: int, params: dict) -> None:
    """The rules of transformers' rope validation (`RotaryEmbeddingConfigMixin._validate_*_rope_parameters`,
    which only logs a warning) as errors, plus what keeps the formulas finite (no division by zero, no NaN)."""
    def key(k):
        return f"{rope_type} rope's {k}"

    def present(k):
        return params.get(k) is not None

    if "factor" in ROPE_PARAMS[rope_type] and present("factor"):
        if rope_type == "proportional":  # transformers sets no bound; it divides the frequencies by it
            check_number(key("factor"), params["factor"], above=0)
        else:
            check_number(key("factor"), params["factor"], at_least=1, why=" (transformers' rule; 1 = unscaled)")
    if "max_position_embeddings" in ROPE_PARAMS[rope_type] and present("max_position_embeddings"):
        check_int(key("max_position_embeddings"), params["max_position_embeddings"])
    if "original_max_position_embeddings" in ROPE_PARAMS[rope_type] and present("original_max_position_embeddings"):
        longrope = rope_type == "longrope"  # its attention factor divides by log(original length)
        check_int(key("original_max_position_embeddings"), params["original_max_position_embeddings"],
                  at_least=2 if longrope else 1, why=" (LongRoPE divides by its log)" if longrope else "")
    if rope_type == "dynamic" and dim <= 2:
        raise ValueError(f"dynamic rope needs a rotary_dim of at least 4 (it scales the base by "
                         f"(...) ** (dim / (dim - 2))), got rotary_dim {dim}")
    if present("attention_factor"):
        check_number(key("attention_factor"), params["attention_factor"], above=0,
                     why=" (it multiplies cos and sin)")
    if rope_type == "yarn":
        for k in ("beta_fast", "beta_slow"):
            if present(k):
                check_number(key(k), params[k], above=0, why=" (a number of rotations)")
        fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
        if fast < slow:
            raise ValueError(f"{key('beta_fast')} must be >= beta_slow (defaults 32 and 1), got beta_fast={fast} "
                             f"and beta_slow={slow}")
        for k in ("mscale", "mscale_all_dim"):
            if present(k):
                check_number(key(k), params[k], at_least=0)
        if present("truncate") and not isinstance(params["truncate"], bool):
            raise TypeError(f"{key('truncate')} must be a bool, got {params['truncate']!r}")
    if rope_type == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if present(k):
                check_number(key(k), params[k], above=0)
        if present("low_freq_factor") and present("high_freq_factor") and \
                not params["high_freq_factor"] > params["low_freq_factor"]:
            raise ValueError(f"{key('high_freq_factor')} must be greater than low_freq_factor (transformers' rule; "
                             f"the smoothing divides by their difference), got high_freq_factor="
                             f"{params['high_freq_factor']} and low_freq_factor={params['low_freq_factor']}")
    if rope_type == "longrope":
        for k in ("short_factor", "long_factor"):
            if not present(k):
                continue
            value = params[k]
            if not isinstance(value, (list, tuple)) or not all(_is_number(x) for x in value):
                raise TypeError(f"{key(k)} must be a list of numbers, one per rotary pair ({dim // 2}), got "
                                f"{type(value).__name__}")
            if len(value) != dim // 2:
                raise ValueError(f"{key(k)} must have rotary_dim/2 = {dim // 2} entries (one per rotary pair), "
                                 f"got {len(value)}")
            if not all(math.isfinite(x) and x > 0 for x in value):
                raise ValueError(f"{key(k)} must hold finite numbers > 0 (each divides a frequency), got {list(value)}")


def rope_frequencies(head_dim: int, base: float = 10_000.0, rope_type: str = "default", *,
                     partial_rotary_factor: float = 1.0, seq_len: int | torch.Tensor | None = None,
                     **params) -> tuple[torch.Tensor, float]:
    """(inv_freq float64 on the CPU (on seq_len's device for a tensor seq_len), attention_scale) for one rope
    type, as transformers defines it: [rotary_dim/2] entries with rotary_dim = int(head_dim *
    partial_rotary_factor), except "proportional": [head_dim/2] entries of which the fastest
    int(partial_rotary_factor * head_dim // 2) are base^(-2i/head_dim) / factor and the rest 0.

    params are the rope type's entries of `config.rope_parameters` (factor, original_max_position_embeddings,
    ...) plus `max_position_embeddings` where the type reads it. seq_len is the current length, read by the
    two types that change with it (dynamic, longrope); a tensor keeps the computation traceable.
    Parameters are checked as transformers' rope validation does (which only warns), as errors naming the key.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    unknown = set(params) - ROPE_PARAMS[rope_type]
    if unknown:
        raise ValueError(f"rope_type {rope_type!r} takes {sorted(ROPE_PARAMS[rope_type]) or 'no parameters'}, "
                         f"got unexpected {sorted(unknown)}")
    check_int("head_dim", head_dim)
    base = check_number("base", base, above=1)
    partial_rotary_factor = check_number("partial_rotary_factor", partial_rotary_factor, above=0, at_most=1)
    if seq_len is not None and not isinstance(seq_len, torch.Tensor):
        check_int("seq_len", seq_len, at_least=0)
    dim = rotary_dim_of(head_dim, partial_rotary_factor, rope_type)
    if dim < 2:
        raise ValueError(f"partial_rotary_factor {partial_rotary_factor:g} of head_dim {head_dim} leaves "
                         f"rotary_dim {dim}; it must be at least 2 (one pair)")
    _check_params(rope_type, dim, params)

    def need(key):
        if params.get(key) is None:
            raise ValueError(f"rope_type {rope_type!r} needs {key!r}")
        return params[key]

    if rope_type == "default":
        return _default(dim, base), 1.0
    if rope_type == "linear":
        return _default(dim, base) / need("factor"), 1.0
    if rope_type == "proportional":
        pairs = int(partial_rotary_factor * head_dim // 2)
        inv = torch.zeros(head_dim // 2, dtype=torch.float64, device="cpu")
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
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
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
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low), 0, 1)
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
    short = torch.tensor(need("short_factor"), dtype=torch.float64, device="cpu")
    long = torch.tensor(need("long_factor"), dtype=torch.float64, device="cpu")
    inv_base = _default(dim, base)
    if isinstance(seq_len, torch.Tensor):
        use_long = seq_len > original
        return torch.where(use_long, inv_base.to(seq_len.device) / long.to(seq_len.device),
                           inv_base.to(seq_len.device) / short.to(seq_len.device)), float(attention)
    ext = long if (seq_len is not None and seq_len > original) else short
    return inv_base / ext, float(attention)


def prope_rotated_pairs(rotary_dim: int, p: float) -> int:
    """p-RoPE keeps the fastest int(p * rotary_dim // 2) pairs rotating, as transformers' "proportional"."""
    p = check_number("p", p, above=0, at_most=1, why=" (the fraction of pairs that rotate)")
    return int(p * rotary_dim // 2)


def hope_keeps(inv_freq: torch.Tensor, context_length: int) -> torch.Tensor:
    """HoPE's rule: a pair keeps rotating iff its wavelength 2*pi/inv_freq is at most the training context
    length, i.e. it completes a full period within the context. Applies to the (possibly scaled) frequencies
    given. Returns a bool mask; its count is the number of rotating pairs."""
    check_int("context_length", context_length, why=" (the training context length in tokens)")
    return inv_freq >= 2 * math.pi / context_length
