"""Forward hooks that record what the analysis needs from a transformers model, layer by layer.

Per attention layer it records
- q, k before the rotary map: the output of `q_norm`/`k_norm` where the model has them (Qwen3, Gemma 3/4),
  else of `q_proj`/`k_proj`, viewed as bshd;
- q, k, v as attention receives them (after the rotary map, whichever implementation the model uses,
  a posenc patch included) and the attention probabilities: through a registered transformers attention
  function that calls the model's own eager attention (so masks, sliding windows and soft-capping are the
  model's), for the duration of one forward only;
- the residual stream after the decoder layer (the layer module's output).

Supported: decoder models whose attention modules have separate `q_proj`, `k_proj`, `v_proj` projections
and dispatch through transformers' attention interface (Llama, Mistral, Qwen2/3, Gemma 1-4, SmolLM, OLMo...).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["UnsupportedModelError", "LayerCapture", "attention_layers", "capture"]

_IMPL = "posenc_analysis"


class UnsupportedModelError(ValueError):
    """The model's layout is not one the hooks understand."""


@dataclass
class LayerCapture:
    """What one forward left for one layer (detached, on the CPU, bshd except probs [b, heads, q, k])."""

    index: int
    q: torch.Tensor | None = None          # before the rotary map
    k: torch.Tensor | None = None
    q_rot: torch.Tensor | None = None      # as attention received them
    k_rot: torch.Tensor | None = None
    v: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    residual: torch.Tensor | None = None   # decoder layer output [b, s, hidden]
    extra: dict = field(default_factory=dict)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, decoder layer, attention module) for every attention module with q/k/v projections, in order."""
    found = []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj")):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            found.append((name, model.get_submodule(parent) if parent else model, module))
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        raise UnsupportedModelError(
            f"{type(model).__name__}: no attention module with separate q_proj/k_proj/v_proj projections"
            + (f" (found {', '.join(kinds)})" if kinds else "")
            + "; supported are Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma 1-4, SmolLM, OLMo, ...)")
    return found


def _head_dim(attn: nn.Module, config) -> int:
    d = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if not d:
        d = config.hidden_size // config.num_attention_heads
    return int(d)


def _is_bhsd(x: torch.Tensor, heads: int | None) -> bool:
    """Whether a per-head norm's 4-D input is [batch, heads, seq, head_dim] (Gemma 3/4 transpose before the
    norm) rather than [batch, seq, heads, head_dim] (Qwen3). The head count (from the projection's width) says
    which axis is which; only where it equals the sequence length do the strides decide (the sequence axis of
    a view of the projection has the larger stride). Strides alone cannot: with one kv head they are equal."""
    if heads is not None and (x.shape[1] == heads) != (x.shape[2] == heads):
        return x.shape[1] == heads
    return x.stride(1) < x.stride(2)


def _eager_for(module: nn.Module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _recorder(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function: the model's eager attention, recording its inputs and output."""
    out, weights = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    rec = getattr(module, "_posenc_capture", None)
    if rec is not None:
        rec.q_rot = query.detach().transpose(1, 2).float().cpu()
        rec.k_rot = key.detach().transpose(1, 2).float().cpu()
        rec.v = value.detach().transpose(1, 2).float().cpu()
        rec.probs = weights.detach().float().cpu()
    return out, weights


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(_IMPL, _recorder)
    AttentionMaskInterface.register(_IMPL, eager_mask)


@contextlib.contextmanager
def capture(model: nn.Module):
    """Within the block, each forward of `model` fills the yielded list of LayerCapture (one per attention
    layer). The model's attention implementation and hooks are restored on exit."""
    layers = attention_layers(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    _register()
    records = [LayerCapture(index=getattr(attn, "layer_idx", i)) for i, (_, _, attn) in enumerate(layers)]
    handles = []

    def heads_view(rec, attr, head_dim, heads):
        def hook(_module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            x = inputs[0] if inputs else None
            if out.dim() == 4 and isinstance(x, torch.Tensor) and x.dim() == 4 and _is_bhsd(x, heads):
                out = out.transpose(1, 2)
            setattr(rec, attr, out.detach().reshape(*out.shape[:2], -1, head_dim).float().cpu())
        return hook

    def residual_hook(rec):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            rec.residual = out.detach().float().cpu()
        return hook

    for rec, (_, layer, attn) in zip(records, layers):
        head_dim = _head_dim(attn, config)
        for attr in ("q", "k"):
            proj = getattr(attn, f"{attr}_proj")
            out_features = getattr(proj, "out_features", None)
            heads = out_features // head_dim if out_features else None
            src = getattr(attn, f"{attr}_norm", None)
            if not isinstance(src, nn.Module):
                src = proj
            handles.append(src.register_forward_hook(heads_view(rec, attr, head_dim, heads)))
        if layer is not model:
            handles.append(layer.register_forward_hook(residual_hook(rec)))
        attn._posenc_capture = rec
    previous = config._attn_implementation
    try:
        model.set_attn_implementation(_IMPL)
        yield records
    finally:
        for h in handles:
            h.remove()
        for _, _, attn in layers:
            attn.__dict__.pop("_posenc_capture", None)
        model.set_attn_implementation(previous)
