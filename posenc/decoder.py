"""A tiny decoder-only language model built from posenc's attention layers, for experiments and examples.

Pre-norm (RMSNorm) blocks of attention + SwiGLU MLP, tied input/output embeddings by default. The encoding is
one argument (a name with its keyword arguments, or an Encoding instance shared by every layer), so the same
model can be trained with RoPE, p-RoPE, HoPE or NoPE and compared:

    model = posenc.TinyDecoder(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4,
                               encoding="hope", context_length=512)
    logits = model(ids)                                  # ids [batch, seq] -> [batch, seq, vocab_size]
    out = model.generate(ids, max_new_tokens=16)         # greedy, with a KV cache
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache
from .encodings import Encoding, get_encoding

__all__ = ["TinyDecoder"]


class _Block(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, intermediate_size, encoding, dropout, backend,
                 encoding_kwargs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, num_kv_heads, encoding=encoding, dropout=dropout,
                              backend=backend, **encoding_kwargs)
        self.mlp_norm = nn.RMSNorm(hidden_size)
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, h, positions, attention_mask, cache):
        h = h + self.attn(self.attn_norm(h), positions, attention_mask, cache)
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, -1)
        return h + self.down(F.silu(gate) * up)


class TinyDecoder(nn.Module):
    """Decoder-only LM: embedding, num_layers x (RMSNorm, Attention, RMSNorm, SwiGLU), RMSNorm, LM head.

    forward(input_ids [batch, seq] int, positions=None, attention_mask=None, cache=None) -> logits
    [batch, seq, vocab_size] (float32 parameters unless converted). positions / attention_mask follow
    `posenc.Attention`; cache is the list `new_cache()` returns (one KVCache per layer).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int | None = None, intermediate_size: int | None = None,
                 encoding: str | Encoding = "rope", dropout: float = 0.0, tie_embeddings: bool = True,
                 backend: str = "auto", **encoding_kwargs):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        intermediate_size = intermediate_size or 4 * hidden_size
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            _Block(hidden_size, num_heads, num_kv_heads, intermediate_size, encoding, dropout, backend,
                   encoding_kwargs) for _ in range(num_layers))
        self.norm = nn.RMSNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _apply(self, fn, recurse=True):
        # to_empty (meta-device initialisation) gives every parameter a new tensor, which would untie them.
        tied = self.lm_head.weight is self.embed.weight
        super()._apply(fn, recurse)
        if tied:
            self.lm_head.weight = self.embed.weight
        return self

    @property
    def attentions(self) -> list[Attention]:
        return [block.attn for block in self.layers]

    def set_encoding(self, encoding: str | Encoding, **encoding_kwargs):
        """Swap every layer's encoding (a name built with these keyword arguments, or one shared instance);
        weights are untouched."""
        for attn in self.attentions:
            if isinstance(encoding, str):
                attn.encoding = get_encoding(encoding, head_dim=attn.head_dim, **encoding_kwargs)
            elif encoding_kwargs:
                raise TypeError("keyword arguments configure an encoding given by name, not an instance")
            else:
                attn.encoding = encoding

    def new_cache(self) -> list[KVCache]:
        """One empty KVCache per layer."""
        return [KVCache() for _ in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: list[KVCache] | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
            raise TypeError("input_ids must be an integer tensor [batch, seq]")
        if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers)):
            raise ValueError(f"cache must be a list of {len(self.layers)} KVCache (model.new_cache())")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype != torch.bool and \
                not attention_mask.is_floating_point() and not attention_mask.is_complex():
            # Check the values and convert once here rather than in every layer (which check the shape).
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
            attention_mask = attention_mask != 0
        h = self.embed(input_ids)
        for i, block in enumerate(self.layers):
            h = block(h, positions, attention_mask, None if cache is None else cache[i])
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Greedy decoding with a KV cache; returns [batch, seq + max_new_tokens]. Left-pad batched prompts
        and pass their attention_mask."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cache = self.new_cache()
        logits = self(input_ids, attention_mask=attention_mask, cache=cache)
        out = [input_ids]
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            logits = self(token, cache=cache)
        return torch.cat(out, 1)
