"""Drop-in attention layers whose positional encoding is one argument, and a KV cache for decoding.

    layer = posenc.Attention(hidden_size=512, num_heads=8, num_kv_heads=2, encoding="hope", context_length=4096)
    y = layer(x)                                   # x, y: [batch, seq, hidden_size]
    layer.encoding = posenc.PRoPE(head_dim=64)     # swap the encoding; the weights stay as they are

Shapes and conventions (what `forward(x, positions=None, attention_mask=None, cache=None)` takes):
- x: [batch, seq, hidden_size] (float). Returns [batch, seq, hidden_size].
- positions: int [seq] or [batch, seq], the positions of the new tokens. Default: 0..seq-1 continuing from the
  cache; with an attention_mask, each row counts only its kept tokens (a left-padded row's first real token
  gets position 0, as transformers' `generate` does); a pad takes the position of the last real token before
  it (0 for leading pads), which matters nowhere since pads are never attended to.
- attention_mask: a *keep* mask as transformers' tokenizers return it: bool or integer 0/1 (1/True = a real
  token, 0/False = padding), shaped [batch, past + seq] (all keys this call attends to: the cached ones and
  the new ones) or [batch, seq] (only the new tokens; the cache remembers the earlier ones). Padded keys are
  never attended to; the output at padded query positions is exactly 0. Additive float masks (0 / -inf) are
  refused rather than guessed at.
- cache: a `KVCache`, filled by the call. It stores keys already rotated (and values), so a decoding step
  rotates only the new token's key. One cache per layer: a cache is bound to the first layer that uses it.
- GQA/MQA: query head i reads kv head i // (num_heads // num_kv_heads) (as transformers' `repeat_kv`, SDPA's
  `enable_gqa` and flash-attn do).
- Attention: flash-attn when it imports and q is fp16/bf16 on an Ampere or newer GPU with head_dim <= 256, else
  PyTorch's `scaled_dot_product_attention`, else an eager softmax(q k^T / sqrt(head_dim)) v. `backend=` forces
  one.
  The softmax scale is 1/sqrt(head_dim); the encoding's attention scale (YaRN/LongRoPE) is applied to q and
  k by the rotary op, as transformers does.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .encodings import ENCODINGS, Encoding, get_encoding

__all__ = ["Attention", "RoPEAttention", "PRoPEAttention", "HoPEAttention", "NoPEAttention", "KVCache",
           "BACKENDS", "flash_attn_available"]

BACKENDS = ("auto", "flash", "sdpa", "eager")
_FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------- flash-attn
_flash_module = None
_flash_error = None


def _import_flash():
    """The flash_attn module, or None (the import is tried once)."""
    global _flash_module, _flash_error
    if _flash_module is None and _flash_error is None:
        try:
            import flash_attn  # noqa: F401
            from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
            _flash_module = flash_attn
        except Exception as exc:  # ImportError, or a binary built for another torch
            _flash_error = exc
    return _flash_module


def flash_attn_available() -> bool:
    """True when the flash-attn package imports."""
    return _import_flash() is not None


def _flash_unusable(q: torch.Tensor) -> str | None:
    """Why flash-attn cannot run on q ([batch, seq, heads, head_dim]), or None when it can."""
    if _import_flash() is None:
        return f"flash-attn does not import ({_flash_error})"
    if q.device.type != "cuda":
        return f"flash-attn needs CUDA tensors, got {q.device.type}"
    gpu = torch.cuda.get_device_properties(q.device)  # not get_device_capability: torch.compile folds this one
    if gpu.major < 8:  # flash-attn 2 raises on these rather than running
        return f"flash-attn needs an Ampere or newer GPU (compute capability 8.0+), got {gpu.major}.{gpu.minor}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] > _FLASH_MAX_HEAD_DIM:
        return f"flash-attn supports head_dim <= {_FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


def _flash_attention(q, k, v, keep, causal, dropout_p, scale):
    """q [b, s, h, d], k/v [b, L, hk, d] (bshd, what flash-attn takes); keep [b, L] bool or None.
    flash-attn aligns the causal mask to the bottom right (query i sees keys up to L - s + i), which is what
    a cache needs. With padding, the kept tokens are packed and run through the varlen kernel."""
    fa = _import_flash()
    if q.numel() == 0:  # flash-attn refuses batch size 0; with no query there is nothing to compute
        return q.new_zeros(q.shape)
    if keep is None:
        return fa.flash_attn_func(q, k, v, dropout_p, softmax_scale=scale, causal=causal)
    b, s, h, d = q.shape
    L, hk = k.shape[1], k.shape[2]
    q_keep = keep[:, L - s:]
    q_idx = q_keep.reshape(-1).nonzero().flatten()
    if q_idx.numel() == 0:  # every query is padding: the outputs are 0
        return q.new_zeros(q.shape)
    k_idx = keep.reshape(-1).nonzero().flatten()
    q_len, k_len = q_keep.sum(1, dtype=torch.int32), keep.sum(1, dtype=torch.int32)
    cu_q = F.pad(q_len.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_len.cumsum(0, dtype=torch.int32), (1, 0))
    out = fa.flash_attn_varlen_func(
        q.reshape(b * s, h, d).index_select(0, q_idx), k.reshape(b * L, hk, d).index_select(0, k_idx),
        v.reshape(b * L, hk, d).index_select(0, k_idx), cu_q, cu_k, int(q_len.max()), int(k_len.max()),
        dropout_p, softmax_scale=scale, causal=causal)
    return q.new_zeros(b * s, h, d).index_copy(0, q_idx, out.to(q.dtype)).view(b, s, h, d)


# ------------------------------------------------------------------------------------------- sdpa / eager
def _bool_mask(keep, s, L, causal, device):
    """[b | 1, 1, s, L] bool mask (True = attend) for s queries that are the last s of L keys, or None when
    nothing is masked. A query row with no key to attend to (a pad before any real token) may attend to all
    keys instead: its output is zeroed later, and this keeps softmax free of NaN."""
    mask = None
    if causal and s > 1:
        mask = torch.ones(s, L, dtype=torch.bool, device=device).tril(L - s)[None, None]
    if keep is not None:
        k = keep[:, None, None, :]
        mask = k if mask is None else mask & k
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask


def _sdpa_attention(q, k, v, keep, causal, dropout_p, scale):
    """q [b, s, h, d], k/v [b, L, hk, d]; returns [b, s, h, d]."""
    s, L = q.shape[1], k.shape[1]
    q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if keep is None and causal and s == L and s > 1:  # the fast path: no explicit mask at all
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    else:
        mask = _bool_mask(keep, s, L, causal, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                             enable_gqa=gqa)
    return rearrange(out, "b h s d -> b s h d")


def _eager_attention(q, k, v, keep, causal, dropout_p, scale):
    """softmax(q k^T * scale) v with float32 softmax; q [b, s, h, d], k/v [b, L, hk, d]."""
    s, L = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    q = rearrange(q, "b s h d -> b h s d")
    k, v = (repeat(t, "b L h d -> b (h g) L d", g=groups) for t in (k, v))  # kv head i: queries i*g..(i+1)*g-1
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    mask = _bool_mask(keep, s, L, causal, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1).to(v.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return rearrange(torch.matmul(weights, v), "b h s d -> b s h d")


_ATTEND = {"flash": _flash_attention, "sdpa": _sdpa_attention, "eager": _eager_attention}


def _check_int(name, value, *, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


# ----------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys (already rotated) and values of the tokens one attention layer has seen, for incremental decoding.

    Make one per layer (`TinyDecoder.new_cache()` makes one per layer of a model) and pass it as
    `layer(x, cache=cache)` on every step: the layer appends the new keys and values and attends over all of
    them. A cache is bound to the first layer that uses it; giving it to another layer, after swapping that
    layer's encoding, or with another batch size raises ValueError. Storage grows by doubling (amortized O(1)
    per token); under autograd it grows by concatenation instead, so that no saved tensor is overwritten.

    keys / values: [batch, seq_len, num_kv_heads, head_dim]; mask: [batch, seq_len] bool keep mask, or None
    while no padding was given; next_position: [batch] int64, where default positions continue.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        """Empty the cache and unbind it from its layer."""
        self._k = self._v = None
        self._len = 0
        self.mask = None
        self.next_position = None
        self._layer = None
        self._encoding = None

    def __len__(self):
        return self._len

    @property
    def seq_len(self) -> int:
        return self._len

    @property
    def keys(self):
        return None if self._k is None else self._k[:, : self._len]

    @property
    def values(self):
        return None if self._v is None else self._v[:, : self._len]

    @property
    def layer(self):
        return None if self._layer is None else self._layer()

    def _check(self, layer: "Attention", x: torch.Tensor):
        if self._layer is None:
            return
        if self._layer() is not layer:
            raise ValueError("cache belongs to another attention layer: use one KVCache per layer "
                             "(TinyDecoder.new_cache() makes one per layer), or cache.reset() it first")
        if layer.encoding is not self._encoding:
            raise ValueError("cache holds keys rotated by the layer's previous encoding (it was swapped): "
                             "start a new KVCache or cache.reset() it")
        if self._len and x.shape[0] != self._k.shape[0]:
            raise ValueError(f"cache was filled with batch size {self._k.shape[0]}, got x with batch size "
                             f"{x.shape[0]}")
        if self._len and (x.device != self._k.device):
            raise ValueError(f"cache lives on {self._k.device}, got x on {x.device}")

    def _append(self, layer, k, v):
        """Store k, v ([batch, s, hk, d]) after the cached ones; returns all keys and values."""
        if self._layer is None:
            self._layer, self._encoding = weakref.ref(layer), layer.encoding
        b, s = k.shape[:2]
        need = self._len + s
        if k.dtype != (self._k.dtype if self._k is not None else k.dtype):
            raise ValueError(f"cache holds {self._k.dtype} keys, got {k.dtype}: use one dtype per cache")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            self._k = k if self._k is None else torch.cat([self.keys, k], 1)
            self._v = v if self._v is None else torch.cat([self.values, v], 1)
        else:
            if self._k is None or need > self._k.shape[1]:
                cap = max(need, 2 * (self._k.shape[1] if self._k is not None else 0), 16)
                new_k = k.new_empty(b, cap, *k.shape[2:])
                new_v = v.new_empty(b, cap, *v.shape[2:])
                if self._len:
                    new_k[:, : self._len] = self.keys
                    new_v[:, : self._len] = self.values
                self._k, self._v = new_k, new_v
            self._k[:, self._len: need] = k
            self._v[:, self._len: need] = v
        self._len = need
        return self.keys, self.values

    def __repr__(self):
        shape = None if self._k is None else tuple(self.keys.shape)
        return f"KVCache(seq_len={self._len}, keys={shape}, padded={self.mask is not None})"


# ---------------------------------------------------------------------------------------------- the layer
class Attention(nn.Module):
    """Multi-head attention (MHA / GQA / MQA) with q, k, v, o projections and an interchangeable encoding.

    hidden_size: model width. num_heads: query heads. num_kv_heads: key/value heads (default num_heads; must
    divide num_heads; 1 = MQA). head_dim: channels per head (default hidden_size // num_heads, which must then
    divide evenly; given explicitly, q/o project to and from num_heads * head_dim). encoding: a name ("rope",
    "prope", "hope", "nope") built with head_dim and **encoding_kwargs (e.g. base=, p=, context_length=,
    scaling=), or an `Encoding` instance of matching head_dim; RoPEAttention, PRoPEAttention, HoPEAttention
    and NoPEAttention are this class with another default encoding (pass it by keyword there). bias: bias on
    all four projections. dropout: attention-probability dropout in training. causal: causal mask (False for
    encoders). backend: "auto", "flash", "sdpa" or "eager" (see the module docstring).

    The encoding holds no weights (its buffers are not persistent), so state dicts are the same for every
    encoding and `layer.encoding = other` (an Encoding, or a name built with this layer's head_dim) swaps it
    without touching the weights.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, encoding: str | Encoding = "rope", bias: bool = False,
                 dropout: float = 0.0, causal: bool = True, backend: str = "auto", **encoding_kwargs):
        super().__init__()
        _check_int("hidden_size", hidden_size)
        _check_int("num_heads", num_heads)
        _check_int("num_kv_heads", num_kv_heads, allow_none=True)
        _check_int("head_dim", head_dim, allow_none=True)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), "
                                 "or give head_dim explicitly")
            head_dim = hidden_size // num_heads
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # Probe flash-attn now (once per process), not inside a forward that torch.compile may trace.
        flash_ok = flash_attn_available() if backend in ("auto", "flash") else False
        if backend == "flash" and not flash_ok:
            raise ImportError(f"backend='flash' needs the flash-attn package, which does not import "
                              f"({_flash_error}); use backend='auto' or 'sdpa'")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.dropout, self.causal, self.backend = head_dim, float(dropout), causal, backend
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        if isinstance(encoding, Encoding):
            if encoding_kwargs:
                raise TypeError(f"encoding is an Encoding instance; unexpected keyword arguments "
                                f"{sorted(encoding_kwargs)} (they configure an encoding given by name)")
        elif isinstance(encoding, str):
            encoding = get_encoding(encoding, head_dim=head_dim, **encoding_kwargs)
        self.encoding = encoding

    def __setattr__(self, name, value):
        if name == "encoding":
            value = self._as_encoding(value)
        super().__setattr__(name, value)

    def _as_encoding(self, value):
        if isinstance(value, str):
            value = get_encoding(value, head_dim=self.head_dim)
        if not isinstance(value, Encoding):
            raise TypeError(f"encoding must be an Encoding or one of {sorted(ENCODINGS)}, got "
                            f"{type(value).__name__}")
        if value.head_dim != self.head_dim:
            raise ValueError(f"encoding has head_dim={value.head_dim}, but this layer's head_dim is "
                             f"{self.head_dim}")
        return value

    def new_cache(self) -> KVCache:
        return KVCache()

    def _choose_backend(self, q):
        if self.backend == "auto":
            if _flash_unusable(q) is None:
                return "flash"
            return "sdpa" if hasattr(F, "scaled_dot_product_attention") else "eager"
        if self.backend == "flash":
            why = _flash_unusable(q)
            if why is not None:
                raise ValueError(f"backend='flash' cannot run here: {why}; use backend='auto' or 'sdpa'")
        return self.backend

    def _check_mask(self, attention_mask, batch, seq, past, device):
        """The keep mask as [batch, past + seq] bool (or None), from [batch, past + seq] or [batch, seq]."""
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        m = attention_mask
        if m.is_floating_point() or m.is_complex():
            raise TypeError(f"attention_mask must be a bool or integer 0/1 keep mask (1 = real token), got "
                            f"{m.dtype}; additive float masks are not accepted")
        shapes = [(batch, past + seq)] + ([(batch, seq)] if past else [])
        if m.dim() != 2 or tuple(m.shape) not in shapes:
            want = " or ".join(f"[{b}, {s}]" for b, s in shapes)
            raise ValueError(f"attention_mask must be shaped {want} ([batch, past + seq] or [batch, seq]), "
                             f"got {tuple(m.shape)}")
        if m.device != device:
            raise ValueError(f"attention_mask must be on {device}, got {m.device}")
        if m.dtype != torch.bool:
            if not torch.compiler.is_compiling() and bool(((m != 0) & (m != 1)).any()):
                raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
            m = m != 0
        return m

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """x [batch, seq, hidden_size] -> [batch, seq, hidden_size]; see the module docstring."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor [batch, seq, hidden_size]")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [batch, seq, hidden_size={self.hidden_size}], got {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a posenc.KVCache, got {type(cache).__name__}")
        b, s, _ = x.shape
        if cache is not None:
            cache._check(self, x)
        past = len(cache) if cache is not None else 0

        keep = None
        if attention_mask is not None:
            keep = self._check_mask(attention_mask, b, s, past, x.device)
            if keep.shape[1] == s and past:  # only the new tokens: prepend what the cache remembers
                old = cache.mask if cache.mask is not None else keep.new_ones(b, past)
                keep = torch.cat([old, keep], 1)
        elif cache is not None and cache.mask is not None:
            keep = torch.cat([cache.mask, cache.mask.new_ones(b, s)], 1)

        start = (cache.next_position if cache is not None and cache.next_position is not None
                 else torch.zeros(b, dtype=torch.int64, device=x.device))
        default_positions = positions is None
        if default_positions:
            if keep is None:
                positions = start[:, None] + torch.arange(s, device=x.device)
            else:
                positions = (start[:, None] + keep[:, past:].cumsum(1) - 1).clamp_(min=0)
        else:
            if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or \
                    positions.dtype == torch.bool:
                raise TypeError("positions must be an integer torch.Tensor [seq] or [batch, seq]")
            if tuple(positions.shape) not in ((s,), (b, s), (1, s)):
                raise ValueError(f"positions must be shaped [seq={s}] or [batch={b}, seq={s}], got "
                                 f"{tuple(positions.shape)}")
            if positions.device != x.device:
                raise ValueError(f"positions must be on {x.device}, got {positions.device}")
            positions = positions.to(torch.int64).expand(b, s)

        q, k, v = (rearrange(proj(x), "b s (h d) -> b s h d", d=self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Fresh projections: rotate them in place when autograd is off (inference, decoding).
        q, k = self.encoding.apply(q, k, positions, inplace=not torch.is_grad_enabled())
        backend = self._choose_backend(q)  # before the cache changes: a refusal leaves it as it was

        if cache is not None:
            k, v = cache._append(self, k, v)
            if keep is not None:
                cache.mask = keep
            if default_positions and keep is not None:  # rows count their kept tokens only
                cache.next_position = start + keep[:, past:].sum(1)
            else:
                cache.next_position = positions[:, -1] + 1 if s else start

        dropout_p = self.dropout if self.training else 0.0
        out = _ATTEND[backend](q, k, v, keep, self.causal, dropout_p, self.scale)
        out = self.o_proj(rearrange(out, "b s h d -> b s (h d)"))
        if keep is not None:
            out = out.masked_fill(~keep[:, past:, None], 0.0)
        return out

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, dropout={self.dropout}, backend={self.backend!r}")


class RoPEAttention(Attention):
    """`Attention` with RoPE by default (same arguments)."""

    __init__ = functools.partialmethod(Attention.__init__, encoding="rope")


class PRoPEAttention(Attention):
    """`Attention` with p-RoPE by default (same arguments; p= and the rest go to the encoding)."""

    __init__ = functools.partialmethod(Attention.__init__, encoding="prope")


class HoPEAttention(Attention):
    """`Attention` with HoPE by default (same arguments; context_length= and the rest go to the encoding)."""

    __init__ = functools.partialmethod(Attention.__init__, encoding="hope")


class NoPEAttention(Attention):
    """`Attention` with NoPE by default (same arguments)."""

    __init__ = functools.partialmethod(Attention.__init__, encoding="nope")
