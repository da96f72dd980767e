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

import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .frequencies import (LENGTH_DEPENDENT_TYPES, ROPE_TYPES, check_int, check_number, hope_keeps, prope_rotated_pairs,
                          rope_frequencies)
from .ops import MAX_HEAD_DIM, _fast_rotary, _positions_from_cu_seqlens, apply_rotary

__all__ = ["Encoding", "RoPE", "PRoPE", "HoPE", "NoPE", "get_encoding", "encoding_class", "ENCODINGS",
           "rotated_pairs_of", "op_pairs_of"]


def rotated_pairs_of(inv_freq: torch.Tensor) -> int:
    """How many pairs rotate under these (masked) frequencies: the fastest ones, up to the last non-zero
    frequency (a mask only ever stops the slowest pairs), which is all the op needs to know."""
    nonzero = torch.nonzero(inv_freq).flatten()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


def op_pairs_of(rotated_pairs: int, pairs: int, attention_scale: float) -> int:
    """The pairs the op must visit (its rotated_pairs) out of `pairs`: the rotating ones, or all of them with an
    attention scale != 1, since transformers scales the "unrotated" pairs too (frequency 0: cos = 1, sin = 0)."""
    return rotated_pairs if attention_scale == 1.0 else pairs


class Encoding(nn.Module):
    """A rotary map with a per-frequency mask. Subclasses declare their own arguments in `options` (kept as
    attributes of those names) and their rule in `mask`.

    head_dim: channels per head (even, <= 512). base: RoPE base (theta; default scaling's rope_theta, else
    1e4). rotary_dim or partial_rotary_factor: how many leading channels take part (the rest pass through).
    interleaved: pair (x[2i], x[2i+1]) instead of (x[i], x[i + rotary_dim/2]). scaling: a transformers
    `rope_parameters`-style dict with `rope_type` ("default", "linear", "dynamic", "yarn", "longrope",
    "llama3", "proportional") and its entries; its rope_theta and partial_rotary_factor count as base and
    partial_rotary_factor (giving both with different values is an error).

    partial_rotary_factor means what it means in transformers: for every rope type but "proportional",
    rotary_dim = int(head_dim * factor) channels rotate with frequencies base^(-2i/rotary_dim); for
    "proportional" (Gemma 4) the rotation spans all of head_dim with frequencies base^(-2i/head_dim), of
    which the fastest int(factor * head_dim // 2) pairs rotate and the rest get frequency 0 (so rotary_dim =
    head_dim and rotary_dim= cannot be given).

    The frequencies are tiny constants computed on the CPU in float64 (also under `torch.device("meta")`)
    and kept there as the master copy; the buffers `inv_freq64` / `inv_freq` are copies of it on the
    module's device, so `to_empty` and moves to and from the meta device never lose them.
    """

    name = "rope"
    options: tuple[str, ...] = ()  # the encoding's own arguments, besides the rotary geometry below

    def __init__(self, head_dim: int, base: float | None = None, *, rotary_dim: int | None = None,
                 partial_rotary_factor: float | None = None, interleaved: bool = False,
                 scaling: dict | None = None):
        super().__init__()
        head_dim = check_int("head_dim", head_dim, at_least=2)
        if head_dim % 2 or head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be a positive even integer of at most {MAX_HEAD_DIM}, got {head_dim}")
        if scaling is None:
            scaling = {}
        if not isinstance(scaling, Mapping):
            raise TypeError(f"scaling must be a dict of rope parameters (transformers' rope_parameters), got "
                            f"{type(scaling).__name__}")
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", "default")
        if not isinstance(rope_type, str):
            raise TypeError(f"scaling['rope_type'] must be a string, got {type(rope_type).__name__}")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"scaling['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
        base = _one_of("base", base, "rope_theta", scaling.pop("rope_theta", None))
        base = check_number("base", 10_000.0 if base is None else base, above=1)
        partial_rotary_factor = _one_of("partial_rotary_factor", partial_rotary_factor, "partial_rotary_factor",
                                        scaling.pop("partial_rotary_factor", None))
        if rotary_dim is not None and partial_rotary_factor is not None:
            raise ValueError("give rotary_dim or partial_rotary_factor, not both")
        if partial_rotary_factor is not None:
            partial_rotary_factor = check_number("partial_rotary_factor", partial_rotary_factor, above=0, at_most=1)
        if rope_type == "proportional":
            if rotary_dim is not None and rotary_dim != head_dim:
                raise ValueError(f"rope_type 'proportional' always spans head_dim={head_dim} (as in transformers); "
                                 f"give partial_rotary_factor (the fraction of pairs that rotate), not "
                                 f"rotary_dim={rotary_dim!r}")
            rotary_dim = head_dim
        elif partial_rotary_factor is not None:
            rotary_dim = int(head_dim * partial_rotary_factor)
            if rotary_dim <= 0 or rotary_dim % 2:
                raise ValueError(f"partial_rotary_factor={partial_rotary_factor:g} gives rotary_dim = "
                                 f"int(head_dim * factor) = {rotary_dim}; it must be even and > 0")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim <= 0 or rotary_dim % 2 \
                or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be an even integer in (0, head_dim={head_dim}], got {rotary_dim!r}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
        self.head_dim, self.base, self.rotary_dim, self.interleaved = head_dim, base, rotary_dim, interleaved
        self.rope_type, self.scaling = rope_type, scaling
        # For "proportional": the fraction of pairs that rotate; for the others: rotary_dim / head_dim.
        self.partial_rotary_factor = (rotary_dim / head_dim if rope_type != "proportional"
                                      else 1.0 if partial_rotary_factor is None else partial_rotary_factor)
        self.register_buffer("inv_freq64", torch.empty(0, dtype=torch.float64, device="cpu"), persistent=False)
        self.register_buffer("inv_freq", torch.empty(0, device="cpu"), persistent=False)
        self.reset_parameters(device=torch.device("cpu"))
        if self.rotated_pairs == 0 and self.name != "nope":
            warnings.warn(f"{self._describe()} rotates no pair: {self._why_no_pair()}; it equals NoPE",
                          UserWarning, stacklevel=3)

    def reset_parameters(self, device: torch.device | str | None = None):
        """Rebuild the frequencies from the encoding's options and put the buffers on `device` (default: where
        they are). Meta-device initialisation (init_empty_weights, FSDP) calls this after `to_empty`."""
        device = torch.device(device) if device is not None else self.inv_freq64.device
        with torch.device("cpu"):  # constants: never built on the meta device a model may be created under
            raw, self.attention_scale = self._frequencies(None)
            inv = self.mask(raw).to(torch.float64)
        self.rotated_pairs = rotated_pairs_of(inv)
        self._inv_freq64_master = inv  # a plain attribute: module moves, to_empty and state dicts skip it
        self._place(device)

    def _place(self, device: torch.device):
        self.inv_freq64 = self._inv_freq64_master.to(device)
        self.inv_freq = self._inv_freq64_master.to(device, torch.float32)
        # The op's arguments for `apply`'s common call, resolved once: buffer reads and properties cost
        # microseconds of host time per call in eager models. None for the rope types whose frequencies depend
        # on the positions.
        self._op_args = None if self.rope_type in LENGTH_DEPENDENT_TYPES else (
            self.inv_freq64, self.attention_scale, self.rotary_dim, self.op_pairs, self.interleaved)

    def mask(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The encoding's idea, applied to the frequencies given (its own, or a model's, scaled ones included):
        frequency 0 for the pairs that must not rotate. RoPE keeps all."""
        return inv_freq

    def _describe(self) -> str:
        return f"{type(self).__name__}(head_dim={self.head_dim}, rope_type={self.rope_type!r})"

    def _why_no_pair(self) -> str:
        if self.rope_type == "proportional":
            return (f"partial_rotary_factor={self.partial_rotary_factor:g} of head_dim={self.head_dim} leaves "
                    f"int(factor * head_dim // 2) = 0 rotating pairs")
        return "every frequency of its rope type is 0"

    def _frequencies(self, seq_len):
        """Unmasked float64 frequencies over rotary_dim (the rope type's), and the attention scale."""
        if self.rope_type == "proportional":  # spans head_dim; the factor picks the rotating pairs
            return rope_frequencies(self.head_dim, self.base, "proportional",
                                    partial_rotary_factor=self.partial_rotary_factor, **self.scaling)
        # int(head_dim * factor) channels rotate as a full rotation of rotary_dim channels would.
        return rope_frequencies(self.rotary_dim, self.base, self.rope_type, seq_len=seq_len, **self.scaling)

    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts (model.half() must not round the frequencies); the
        # buffers are copies of the CPU master, so leaving the meta device (to_empty, .to) keeps their values.
        try:
            device = fn(torch.zeros((), device=self.inv_freq64.device)).device
        except NotImplementedError:  # fn copies out of the meta device: find where to
            device = fn(torch.zeros((), device="cpu")).device
        self._place(device)
        return self

    def frequencies(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Masked float64 inverse frequencies in use for these positions: the buffer `inv_freq64`, or for
        the dynamic and longrope types, which depend on the largest position, computed with tensor ops on
        positions' device (traceable)."""
        if self.rope_type not in LENGTH_DEPENDENT_TYPES or positions is None or positions.numel() == 0:
            return self.inv_freq64
        seq_len = positions.max().to(torch.float64) + 1
        inv, _ = self._frequencies(seq_len)
        # The kernel visits the first rotated_pairs pairs (fixed at construction); the mask applies to the
        # frequencies actually in use (HoPE's cut to the scaled ones).
        inv = self.mask(inv.to(positions.device))
        return torch.cat([inv[: self.rotated_pairs], torch.zeros_like(inv[self.rotated_pairs:])])

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """cos, sin shaped positions.shape + (rotary_dim,), halves duplicated as transformers builds them
        (repeated pairwise when interleaved), scaled by the attention scale; computed in float64."""
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or \
                positions.dtype == torch.bool or positions.is_complex():
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
        op_args, head_dim = self._op_args, self.head_dim
        if (op_args is not None and not inplace and cu_seqlens is None and type(q) is torch.Tensor
                and type(k) is torch.Tensor and q.dim() == 4 and k.dim() == 4 and q.shape[3] == head_dim
                and k.shape[3] == head_dim):
            # (frequencies on another device than q: the op refuses them, and the full path below moves them)
            inv_freq, scale, rotary_dim, pairs, interleaved = op_args
            out = _fast_rotary(q, k, None, None, positions, inv_freq, scale, rotary_dim, pairs, interleaved,
                               layout, False)
            if out is not None:
                return out
        for name, t in (("q", q), ("k", k)):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must end in head_dim={self.head_dim} channels, got shape {tuple(t.shape)}")
        if not isinstance(q, torch.Tensor):
            inv = self.inv_freq64  # apply_rotary names the bad argument
        else:
            if q.device != self.inv_freq64.device and q.device.type != "meta":
                self.to(q.device)  # frequencies follow the data (once, so CUDA graphs can capture the call)
            if positions is None and self.rope_type in LENGTH_DEPENDENT_TYPES:
                positions = self._default_positions(q, layout, cu_seqlens)
            inv = self.frequencies(positions if isinstance(positions, torch.Tensor) else None)
            inv = inv.to(q.device)  # meta data: a meta copy for this call; the buffers keep their values
        return apply_rotary(q, k, positions=positions, inv_freq=inv, scale=self.attention_scale,
                            rotary_dim=self.rotary_dim, rotated_pairs=self.op_pairs, interleaved=self.interleaved,
                            layout=layout, inplace=inplace, cu_seqlens=cu_seqlens)

    @staticmethod
    def _default_positions(q, layout, cu_seqlens):
        """The positions the op takes when none are given (0..seq-1, or per packed sequence), explicit so that
        the types that depend on the sequence length see it; None where q's shape is wrong (the op says so)."""
        if cu_seqlens is not None:
            return _positions_from_cu_seqlens(cu_seqlens, q.shape[0], q.device) if q.dim() == 3 else None
        if q.dim() != 4 or layout not in ("bshd", "bhsd"):
            return None
        return torch.arange(q.shape[1 if layout == "bshd" else 2], device=q.device)

    @property
    def op_pairs(self) -> int:
        """The pairs the op must visit (its rotated_pairs); see `op_pairs_of`."""
        return op_pairs_of(self.rotated_pairs, self.rotary_dim // 2, self.attention_scale)

    forward = apply

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base:g}, "
                f"rope_type={self.rope_type!r}, rotated_pairs={self.rotated_pairs}/{self.rotary_dim // 2}"
                + (f", partial_rotary_factor={self.partial_rotary_factor:g}" if self.rope_type == "proportional"
                   else "")
                + (", interleaved=True" if self.interleaved else "")
                + "".join(f", {option}={getattr(self, option)}" for option in self.options))


def _one_of(name: str, value, key: str, from_scaling):
    """An option given as an argument and/or as the scaling dict's entry: either, or both if they agree."""
    if value is not None and from_scaling is not None and value != from_scaling:
        raise ValueError(f"{name}={value!r} and scaling[{key!r}]={from_scaling!r} disagree; give one of them")
    return from_scaling if value is None else value


class RoPE(Encoding):
    """Rotary position embedding: every pair rotates."""

    name = "rope"


class PRoPE(Encoding):
    """p-RoPE: only the fastest fraction p of the pairs rotate (int(p * rotary_dim // 2) of them)."""

    name = "prope"
    options = ("p",)

    def __init__(self, head_dim: int, base: float | None = None, p: float = 0.75, **kwargs):
        self.p = p  # checked by the mask, which the construction applies
        super().__init__(head_dim, base, **kwargs)

    def mask(self, inv_freq):
        keep = prope_rotated_pairs(2 * inv_freq.shape[-1], self.p)
        return torch.cat([inv_freq[:keep], torch.zeros_like(inv_freq[keep:])])

    def _why_no_pair(self):
        return f"p={self.p:g} of {self.rotary_dim // 2} pairs leaves int(p * rotary_dim // 2) = 0"


class HoPE(Encoding):
    """HoPE: a pair rotates iff its wavelength fits within the training context length."""

    name = "hope"
    options = ("context_length",)

    def __init__(self, head_dim: int, base: float | None = None, context_length: int = 4096, **kwargs):
        self.context_length = context_length  # checked by the mask, which the construction applies
        super().__init__(head_dim, base, **kwargs)

    def mask(self, inv_freq):
        return torch.where(hope_keeps(inv_freq, self.context_length), inv_freq, torch.zeros_like(inv_freq))

    def _describe(self):
        return f"HoPE(context_length={self.context_length})"

    def _why_no_pair(self):
        # A context shorter than the fastest wavelength (2*pi tokens unscaled) completes no period.
        fastest = float(self._frequencies(None)[0].max())
        shortest = 2 * math.pi / fastest if fastest > 0 else math.inf
        return (f"no pair's wavelength is at most context_length={self.context_length} (the shortest is "
                f"{shortest:.4g} tokens)")


class NoPE(Encoding):
    """NoPE: no pair rotates (the identity on q and k)."""

    name = "nope"

    def __init__(self, head_dim: int, base: float | None = None, **kwargs):
        super().__init__(head_dim, base, **kwargs)

    def mask(self, inv_freq):
        return torch.zeros_like(inv_freq)


ENCODINGS = {cls.name: cls for cls in (RoPE, PRoPE, HoPE, NoPE)}
_ALIASES = {"p-rope": "prope", "p_rope": "prope", "proportional": "prope", "none": "nope"}


def encoding_class(name: str) -> type[Encoding]:
    """The encoding class a name (or alias: "p-rope", "none", ...) stands for, without building one."""
    if not isinstance(name, str):
        raise TypeError(f"encoding name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[key]


def get_encoding(name: str, **kwargs) -> Encoding:
    """An encoding by name: "rope", "prope" (or "p-rope"), "hope", "nope"."""
    return encoding_class(name)(**kwargs)
