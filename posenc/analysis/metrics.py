"""The measurements, as pure functions of captured tensors (no model code here), in float64.

Shapes: queries/keys/values are bshd, `[batch, seq, heads, head_dim]` (heads = kv heads for keys and values);
attention probabilities are `[batch, heads, queries, keys]`; residual states are `[batch, seq, hidden]`.
Every statistic averages over batch and sequence (the "tokens").

Rotary pairs: half-split pairs channel i with i + rotary_dim/2 (Hugging Face), interleaved
pairs 2i with 2i+1; pair 0 is the fastest.
"""
from __future__ import annotations

import torch

from ..frequencies import hope_keeps

__all__ = ["rotary_pairs", "frequency_norms", "frequency_energy", "offset_ratio", "outlier_pair", "sink_share",
           "sink_argmax_fraction", "value_drain", "massive_activations", "completes_period"]


def rotary_pairs(x: torch.Tensor, rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """x [..., head_dim] -> float64 [..., rotary_dim/2, 2]: the 2-D vector each rotary pair rotates."""
    rotary_dim = rotary_dim or x.shape[-1]
    part = x[..., :rotary_dim].to(torch.float64)
    if interleaved:
        return part.unflatten(-1, (rotary_dim // 2, 2))
    half = rotary_dim // 2
    return torch.stack([part[..., :half], part[..., half:]], -1)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """bshd -> [tokens, heads, head_dim]."""
    if x.dim() != 4:
        raise ValueError(f"expected a [batch, seq, heads, head_dim] tensor, got shape {tuple(x.shape)}")
    return x.flatten(0, 1)


def frequency_norms(x: torch.Tensor, rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """Mean over tokens of the norm of each rotary pair's 2-D vector: [heads, pairs] (Barbero et al. 2024,
    figs. 3-4). Rotation does not change it, so q/k before or after the rotary map give the same values."""
    return rotary_pairs(_tokens(x), rotary_dim, interleaved).norm(dim=-1).mean(0)


def frequency_energy(x: torch.Tensor, rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """Share of each head's squared norm carried by each rotary pair, E|x_pair|^2 / E|x|^2: [heads, pairs].
    A head's shares sum to 1 when every channel rotates (less with partial rotary: the rest pass through)."""
    t = _tokens(x).to(torch.float64)
    pair = rotary_pairs(t, rotary_dim, interleaved).pow(2).sum(-1).mean(0)
    total = t.pow(2).sum(-1).mean(0)
    return pair / total.clamp_min(torch.finfo(torch.float64).tiny)[:, None]


def offset_ratio(x: torch.Tensor, rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """How constant each pair's 2-D vector is across tokens: |E x_pair| / sqrt(E |x_pair|^2), in [0, 1]:
    [heads, pairs]. 1 means the same vector at every token (a pure offset), about 1/sqrt(tokens) means
    directions that cancel. Measure it on q/k *before* the rotary map: a rotary offset feature (Jonasson 2025)
    is a large, token-independent component in a pair, which then rotates only with position."""
    p = rotary_pairs(_tokens(x), rotary_dim, interleaved)
    rms = p.pow(2).sum(-1).mean(0).sqrt()
    return p.mean(0).norm(dim=-1) / rms.clamp_min(torch.finfo(torch.float64).tiny)


def outlier_pair(x: torch.Tensor, rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """Per head, the pair holding the channel of largest absolute value over all tokens: [heads] (long)."""
    p = rotary_pairs(_tokens(x), rotary_dim, interleaved).abs().amax(-1).amax(0)  # [heads, pairs]
    return p.argmax(-1)


def sink_share(probs: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Attention probability put on key `sink` (the first token), averaged over the queries that can see
    another token (queries 1..seq-1; query 0 sees only itself) and the batch: [heads]."""
    if probs.dim() != 4:
        raise ValueError(f"expected attention probs [batch, heads, queries, keys], got {tuple(probs.shape)}")
    if probs.shape[-2] < 2:
        raise ValueError("need at least 2 tokens to measure an attention sink")
    return probs[:, :, sink + 1:, sink].to(torch.float64).mean((0, 2))


def sink_argmax_fraction(probs: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Share of the queries 1..seq-1 (and batch rows) whose most-attended key is `sink`: [heads]. Unlike the
    attention averaged over queries, this does not favour early keys under uniform causal attention (there
    key 0 is the argmax of query t with chance 1/(t+1) only)."""
    return (probs[:, :, sink + 1:, :].argmax(-1) == sink).to(torch.float64).mean((0, 2))


def value_drain(v: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Value norm at the sink token over the median value norm of the other tokens: [kv heads]. Well below 1
    is a value-state drain (Guo et al. 2024): the head parks attention on a token that contributes ~nothing."""
    norms = v.to(torch.float64).norm(dim=-1)  # [b, s, heads]
    others = torch.cat([norms[:, :sink], norms[:, sink + 1:]], 1).flatten(0, 1)
    return norms[:, sink].mean(0) / others.median(0).values.clamp_min(torch.finfo(torch.float64).tiny)


def massive_activations(h: torch.Tensor, top: int = 5) -> dict:
    """Largest residual magnitude over the median magnitude (Sun et al. 2024's massive activations; An et al.
    2025, Guo et al. 2024 "residual-state peaks"). h: [batch, seq, hidden]. Returns ratio, max, median and
    the `top` largest entries as (token, dim, value), batch folded into the token index."""
    flat = h.to(torch.float64).flatten(0, -2)  # [tokens, hidden]
    mag = flat.abs()
    median = float(mag.median())
    values, index = mag.flatten().topk(min(top, mag.numel()))
    hidden = flat.shape[-1]
    entries = [(int(i) // hidden, int(i) % hidden, float(flat.flatten()[i])) for i in index]
    return {"ratio": float(values[0]) / max(median, torch.finfo(torch.float64).tiny), "max": float(values[0]),
            "median": median, "top": entries}


def completes_period(inv_freq: torch.Tensor, context_length: int) -> torch.Tensor:
    """Whether each pair's wavelength 2*pi/inv_freq is at most the context length (False for frequency 0)."""
    return hope_keeps(inv_freq.to(torch.float64), context_length)
