"""RoPE, p-RoPE, HoPE and NoPE: one rotary map, different per-frequency masks.

Every encoding rotates pair i of a head vector by position * inv_freq[i]; they differ only in which pairs
keep a non-zero frequency (always the fastest ones, so the kernel just needs their count, `rotated_pairs`):

- RoPE (Su et al. 2021, "RoFormer"): every pair rotates; `scaling` takes any transformers rope type.
- p-RoPE (Barbero et al. 2024, "Round and Round We Go! What makes Rotary Positional Encodings useful?"): the
  fastest int(p * rotary_dim/2) pairs rotate, the rest get frequency 0. Equals transformers' "proportional"
  rope type (Gemma 4 global layers: p = 0.25, base 1e6).
- HoPE (Chen et al. 2024, "HoPE: A Novel Positional Encoding Without Long-Term Decay"): a pair keeps rotating
  iff its wavelength 2*pi/inv_freq is at most the training context length L, i.e. it completes a full period
  within L; lower frequencies become position-independent (frequency 0). D=128, base 1e4, L=4096 keeps 46/64.
- NoPE (Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization"): no pair
  rotates; position reaches attention only through the causal mask.

Precision: angles are formed in float64 (the fused op reduces position * inv_freq modulo 2*pi in float64
before a float32 sin/cos), so they stay accurate at any position; `cos_sin` tables are computed in float64
and rounded once to the requested dtype.

Shapes (bshd): q [batch, seq, q_heads, head_dim], k [batch, seq, kv_heads, head_dim]; positions [seq] or
[batch, seq] integers (default 0..seq-1).
"""
from __future__ import annotations

import torch
from torch import nn

from . import frequencies as F
from .ops import MAX_HEAD_DIM, apply_rotary

__all__ = ["Encoding", "RoPE", "PRoPE", "HoPE", "NoPE", "get_encoding", "ENCODINGS"]


class Encoding(nn.Module):
    """A rotary map with a per-frequency mask. Subclasses choose the mask in `_mask`.

    head_dim: channels per head (even, <= 512). base: RoPE base (theta). rotary_dim or partial_rotary_factor:
    how many leading channels take part (the rest pass through). interleaved: pair (x[2i], x[2i+1]) instead
    of (x[i], x[i + rotary_dim/2]). scaling: a transformers `rope_parameters`-style dict with `rope_type`
    ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional") and its entries.
    """

    name = "rope"

    def __init__(self, head_dim: int, base: float = 10_000.0, *, rotary_dim: int | None = None,
                 partial_rotary_factor: float | None = None, interleaved: bool = False,
                 scaling: dict | None = None):
        super().__init__()
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
        if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        if rotary_dim is not None and partial_rotary_factor is not None:
            raise ValueError("give rotary_dim or partial_rotary_factor, not both")
        if partial_rotary_factor is not None:
            if not 0 < partial_rotary_factor <= 1:
                raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
            rotary_dim = int(head_dim * partial_rotary_factor)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be an even integer in (0, head_dim={head_dim}], got {rotary_dim!r}")
        scaling = dict(scaling or {})
        if not isinstance(scaling.get("rope_type", "default"), str):
            raise TypeError("scaling['rope_type'] must be a string")
        self.rope_type = scaling.pop("rope_type", "default")
        scaling.pop("rope_theta", None)  # transformers' rope_parameters carry the base too
        scaling.pop("partial_rotary_factor", None)
        self.head_dim, self.base, self.rotary_dim, self.interleaved = head_dim, float(base), rotary_dim, interleaved
        self.scaling = scaling
        raw, self.attention_scale = self._frequencies(None)
        inv_freq = self._mask(raw)
        nonzero = torch.nonzero(inv_freq).flatten()
        self.rotated_pairs = int(nonzero[-1]) + 1 if nonzero.numel() else 0
        self.register_buffer("inv_freq64", inv_freq, persistent=False)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def _mask(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The encoding's idea: frequency 0 for the pairs that must not rotate. RoPE keeps all."""
        return inv_freq

    def _frequencies(self, seq_len):
        """Unmasked float64 frequencies over rotary_dim (the rope type's), and the attention scale."""
        factor = self.rotary_dim / self.head_dim
        if self.rope_type == "proportional":  # its "partial rotary factor" is p; it always spans head_dim
            factor = self.scaling.get("p", 1.0)
        scaling = {k: v for k, v in self.scaling.items() if k != "p"}
        return F.rope_frequencies(self.head_dim, self.base, self.rope_type, partial_rotary_factor=factor,
                                  seq_len=seq_len, **scaling)

    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts (model.half() must not round the frequencies).
        device = fn(torch.zeros((), device=self.inv_freq.device)).device
        self.inv_freq64 = self.inv_freq64.to(device)
        self.inv_freq = self.inv_freq.to(device)
        return self

    def frequencies(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Masked float64 inverse frequencies in use for these positions (dynamic and longrope types
        depend on the largest position; computed with tensor ops, so traceable)."""
        if self.rope_type not in ("dynamic", "longrope") or positions is None:
            return self.inv_freq64
        seq_len = positions.max().to(torch.float64) + 1
        inv, _ = self._frequencies(seq_len)
        # The kernel visits the first rotated_pairs pairs (fixed at construction); the mask applies to the
        # frequencies actually in use (HoPE's cut to the scaled ones).
        inv = self._mask(inv.to(self.inv_freq64.device))
        return torch.cat([inv[: self.rotated_pairs], torch.zeros_like(inv[self.rotated_pairs:])])

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """cos, sin shaped positions.shape + (rotary_dim,), halves duplicated as transformers builds them
        (repeated pairwise when interleaved), scaled by the attention scale; computed in float64."""
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point():
            raise TypeError("positions must be an integer tensor")
        inv = self.frequencies(positions).to(positions.device)
        angle = positions.to(torch.float64)[..., None] * inv
        cos, sin = torch.cos(angle) * self.attention_scale, torch.sin(angle) * self.attention_scale
        if self.interleaved:
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        else:
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return cos.to(dtype), sin.to(dtype)

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None, *,
              layout: str = "bshd", inplace: bool = False, cu_seqlens: torch.Tensor | None = None):
        """(q, k) rotated through the fused op; see `posenc.apply_rotary` for shapes and options."""
        for name, t in (("q", q), ("k", k)):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must end in head_dim={self.head_dim} channels, got shape {tuple(t.shape)}")
        if isinstance(q, torch.Tensor) and q.device != self.inv_freq64.device:
            self.to(q.device)  # frequencies follow the data
        inv = self.frequencies(positions if isinstance(positions, torch.Tensor) else None)
        return apply_rotary(q, k, positions=positions, inv_freq=inv, scale=self.attention_scale,
                            rotary_dim=self.rotary_dim, rotated_pairs=self.op_pairs, interleaved=self.interleaved,
                            layout=layout, inplace=inplace, cu_seqlens=cu_seqlens)

    @property
    def op_pairs(self) -> int:
        """The pairs the op must visit (its rotated_pairs): the rotating ones, or all of them with an attention
        scale != 1, since transformers scales the "unrotated" pairs too (frequency 0: cos = 1, sin = 0)."""
        return self.rotated_pairs if self.attention_scale == 1.0 else self.rotary_dim // 2

    forward = apply

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base:g}, "
                f"rope_type={self.rope_type!r}, rotated_pairs={self.rotated_pairs}/{self.rotary_dim // 2}"
                + (", interleaved=True" if self.interleaved else ""))


class RoPE(Encoding):
    """Rotary position embedding: every pair rotates."""

    name = "rope"


class PRoPE(Encoding):
    """p-RoPE: only the fastest fraction p of the pairs rotate (int(p * rotary_dim // 2) of them)."""

    name = "prope"

    def __init__(self, head_dim: int, base: float = 10_000.0, p: float = 0.75, **kwargs):
        F.prope_rotated_pairs(2, p)  # validates p before any work
        self.p = p
        super().__init__(head_dim, base, **kwargs)

    def _mask(self, inv_freq):
        keep = F.prope_rotated_pairs(self.rotary_dim, self.p)
        return torch.cat([inv_freq[:keep], torch.zeros_like(inv_freq[keep:])])

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}"


class HoPE(Encoding):
    """HoPE: a pair rotates iff its wavelength fits within the training context length."""

    name = "hope"

    def __init__(self, head_dim: int, base: float = 10_000.0, context_length: int = 4096, **kwargs):
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length <= 0:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        self.context_length = context_length
        super().__init__(head_dim, base, **kwargs)

    def _mask(self, inv_freq):
        return torch.where(F.hope_keeps(inv_freq, self.context_length), inv_freq, torch.zeros_like(inv_freq))

    def extra_repr(self):
        return super().extra_repr() + f", context_length={self.context_length}"


class NoPE(Encoding):
    """NoPE: no pair rotates (the identity on q and k)."""

    name = "nope"

    def __init__(self, head_dim: int, base: float = 10_000.0, **kwargs):
        super().__init__(head_dim, base, **kwargs)

    def _mask(self, inv_freq):
        return torch.zeros_like(inv_freq)


ENCODINGS = {cls.name: cls for cls in (RoPE, PRoPE, HoPE, NoPE)}
_ALIASES = {"p-rope": "prope", "p_rope": "prope", "proportional": "prope", "none": "nope"}


def get_encoding(name: str, **kwargs) -> Encoding:
    """An encoding by name: "rope", "prope" (or "p-rope"), "hope", "nope"."""
    if not isinstance(name, str):
        raise TypeError(f"encoding name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[key](**kwargs)
