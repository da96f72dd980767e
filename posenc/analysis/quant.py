"""What quantizing attention's inputs costs, per rotary frequency band, before and after a positional-encoding patch.

A few rotary pairs carry outsized query/key norms (rotary offset features, Jonasson 2025; systematic outliers,
An et al. 2025). With absmax scales those pairs set the scale, so every other channel is quantized coarsely. This
module measures that on a real model:

- Simulated quantization (quantize, then dequantize) of what attention receives: the queries, the keys *after*
  the rotary map (as a KV cache stores them) and the values. Symmetric, absmax scales (scale = max|x| / qmax)
  at one granularity: "tensor" (one scale), "head" (one per head), "channel" (one per head and channel, over the
  tokens: how KV-cache quantizers such as KIVI scale keys; here calibrated on the whole text), "token" (one per
  head and token). Formats: int8 (qmax 127), int4 (7), and fp8 through torch's float8 dtypes (fp8_e4m3:
  float8_e4m3fn, qmax 448; fp8_e5m2: float8_e5m2, qmax 57344), rounding to nearest, saturating at qmax.
- Injected into the forward through a transformers attention function (`quantized_attention`, a context
  manager), so the change in loss and the KL divergence of the next-token distributions (unquantized ||
  quantized, mean over positions; far less noisy than the change in loss on a short text, whose errors of both
  signs cancel) are the model's own; on exit the model is exactly as before.
- Per layer, head and rotary pair: relative error of q and k, sqrt(sum|x^ - x|^2 / sum|x|^2) over the tokens;
  per head: relative error of v and of the attention output (before o_proj; also with v left unquantized, to see
  what the q/k errors alone do), and the rms error of the attention logits `scaling * q.k` (before soft-capping,
  over the (query, key) positions the mask lets attend). The logit is a sum over pairs, so its error splits into
  per-pair terms d_p = scaling * (q^_p.k^_p - q_p.k_p); "logit error share" of a set of pairs = sum of E d_p^2
  over them / sum over all pairs (cross terms between pairs left out).
- Flags per pair, from `analyze` on the same text: the incomplete band (wavelength longer than the context,
  so no full period within it; HoPE stops rotating these), offset features (offset ratio >= the threshold and more
  than a uniform share of the energy, on q or on k before the rotary map, as `analyze` counts them) and the
  outlier pair (holding the head's largest |q| or |k| channel). The summary sets the logit-error share of each
  flagged set against the share of pairs it holds: if outlier bands dominate the error, the first is much larger.
- Two mitigations, each against its own baseline: keys with per-channel scales (q and v unchanged), and keeping
  the `keep_pairs` pairs with the largest |x| of each head of q and k in full precision (the rest quantized with
  a scale computed without them: a dense-and-sparse split, as in LLM.int8() and KVQuant). "removes" = 1 - mitigated
  error / baseline error.

    from posenc.analysis.quant import QuantScheme, default_schemes, quant_analysis, quantized_attention
    with quantized_attention(model, QuantScheme("int8", "channel")):
        loss = model(input_ids=ids, labels=ids).loss
    result = quant_analysis(model, ids, default_schemes(["int8", "fp8_e4m3"], ["tensor"]))
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from .. import io as _io
from ..hf import current_patch
from . import metrics as M
from .capture import _eager_for, attention_layers

__all__ = ["FORMATS", "GRANULARITIES", "QuantScheme", "fake_quantize", "quantized_attention", "logit_errors",
           "default_schemes", "parse_formats", "parse_granularities", "parse_encodings", "quant_analysis",
           "compare_encodings", "summarize_quant", "plot_quant", "cli_plan"]

# name -> (float8 dtype or None for integers, qmax: the largest magnitude the format holds)
FORMATS = {"int8": (None, 127.0), "int4": (None, 7.0),
           "fp8_e4m3": (torch.float8_e4m3fn, float(torch.finfo(torch.float8_e4m3fn).max)),
           "fp8_e5m2": (torch.float8_e5m2, float(torch.finfo(torch.float8_e5m2).max))}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}
# granularity -> the bhsd axes one scale spans
GRANULARITIES = {"tensor": (0, 1, 2, 3), "head": (0, 2, 3), "channel": (0, 2), "token": (3,)}
_IMPL = "posenc_quant"


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def _pair_channels(head_dim: int, rotary_dim: int | None, interleaved: bool) -> torch.Tensor:
    """[pairs, 2] channel indices of each rotary pair (half-split i, i + rotary_dim/2, or interleaved 2i, 2i+1)."""
    rd = rotary_dim or head_dim
    if rd % 2 or rd > head_dim:
        raise ValueError(f"rotary_dim must be even and at most head_dim {head_dim}; got {rd}")
    i = torch.arange(rd // 2)
    return torch.stack([2 * i, 2 * i + 1], -1) if interleaved else torch.stack([i, i + rd // 2], -1)


def fake_quantize(x: torch.Tensor, format: str = "int8", granularity: str = "tensor", *, keep_pairs: int = 0,
                  rotary_dim: int | None = None, interleaved: bool = False) -> torch.Tensor:
    """Quantize, then dequantize, x [batch, heads, seq, head_dim] (bhsd, as attention receives it); same shape
    and dtype. Symmetric absmax scales at `granularity`; arithmetic in float32 (float64 for float64 input).
    keep_pairs: per head, that many rotary pairs with the largest |x| over batch and tokens pass unchanged, and
    the scales are computed without them."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"x must be a floating [batch, heads, seq, head_dim] tensor, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    format = _ALIASES.get(format, format)
    _check_choice(format, FORMATS, "format")
    _check_choice(granularity, GRANULARITIES, "granularity")
    pairs = _pair_channels(x.shape[-1], rotary_dim, interleaved)
    if not isinstance(keep_pairs, int) or isinstance(keep_pairs, bool) or not 0 <= keep_pairs <= len(pairs):
        raise ValueError(f"keep_pairs must be an integer in [0, {len(pairs)}] (the rotary pairs); got {keep_pairs!r}")
    dtype, qmax = FORMATS[format]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    keep = None
    if keep_pairs:
        pair_max = xf.abs().amax((0, 2))[:, pairs].amax(-1)        # [heads, pairs]
        top = pair_max.topk(keep_pairs, dim=-1).indices              # [heads, keep_pairs]
        keep = torch.zeros(x.shape[1], x.shape[-1], dtype=torch.bool, device=x.device)
        keep.scatter_(1, pairs.to(x.device)[top].flatten(1), True)
        keep = keep[None, :, None, :]
        xf_q = xf.masked_fill(keep, 0.0)
    else:
        xf_q = xf
    scale = xf_q.abs().amax(GRANULARITIES[granularity], keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero slice stays zero
    y = (xf_q / scale).clamp(-qmax, qmax)
    y = y.round() if dtype is None else y.to(dtype).to(xf.dtype)
    out = y * scale
    if keep is not None:
        out = torch.where(keep, xf, out)
    return out.to(x.dtype)


@dataclass(frozen=True)
class QuantScheme:
    """How attention's inputs are quantized. format: int8, int4, fp8_e4m3, fp8_e5m2; granularity: tensor, head,
    channel, token; key_granularity: the keys' own (None: the same); keep_pairs: pairs per head of q and k kept in
    full precision; tensors: which of q, k, v are quantized (e.g. "kv" for a KV cache alone)."""

    format: str = "int8"
    granularity: str = "tensor"
    key_granularity: str | None = None
    keep_pairs: int = 0
    tensors: str = "qkv"

    def __post_init__(self):
        object.__setattr__(self, "format", _ALIASES.get(self.format, self.format))
        _check_choice(self.format, FORMATS, "format")
        _check_choice(self.granularity, GRANULARITIES, "granularity")
        if self.key_granularity is not None:
            _check_choice(self.key_granularity, GRANULARITIES, "key_granularity")
        if not isinstance(self.keep_pairs, int) or isinstance(self.keep_pairs, bool) or self.keep_pairs < 0:
            raise ValueError(f"keep_pairs must be a non-negative integer; got {self.keep_pairs!r}")
        if not isinstance(self.tensors, str) or not self.tensors or set(self.tensors) - set("qkv"):
            raise ValueError(f"tensors must name some of q, k, v (e.g. 'qkv' or 'kv'); got {self.tensors!r}")

    @property
    def label(self) -> str:
        parts = [f"{self.format} {self.granularity}"]
        if self.key_granularity and self.key_granularity != self.granularity:
            parts.append(f"k per-{self.key_granularity}")
        if self.keep_pairs:
            parts.append(f"keep {self.keep_pairs} pairs")
        if self.tensors != "qkv":
            parts.append(f"only {self.tensors}")
        return ", ".join(parts)

    def apply(self, query, key, value, *, rotary_dim=None, interleaved=False):
        """(q, k, v) bhsd, quantized-dequantized as the scheme says."""
        kw = dict(rotary_dim=rotary_dim, interleaved=interleaved)
        if "q" in self.tensors:
            query = fake_quantize(query, self.format, self.granularity, keep_pairs=self.keep_pairs, **kw)
        if "k" in self.tensors:
            key = fake_quantize(key, self.format, self.key_granularity or self.granularity,
                                keep_pairs=self.keep_pairs, **kw)
        if "v" in self.tensors:
            value = fake_quantize(value, self.format, self.granularity, **kw)
        return query, key, value


# --------------------------------------------------------------------------------------------- injection
@dataclass
class _LayerState:
    scheme: QuantScheme | None       # what the forward attends with (None: unquantized)
    observe: object | None           # called with the unquantized inputs: (module, q, k, v, mask, kwargs, eager)
    rotary_dim: int | None
    interleaved: bool


def _attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function: the model's eager attention on quantized-dequantized q, k, v."""
    eager = _eager_for(module)
    state = module.__dict__.get("_posenc_quant")
    if state is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    if state.observe is not None:
        state.observe(module, query, key, value, attention_mask, kwargs, eager)
    if state.scheme is not None:
        query, key, value = state.scheme.apply(query, key, value, rotary_dim=state.rotary_dim,
                                               interleaved=state.interleaved)
    return eager(module, query, key, value, attention_mask, **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(_IMPL, _attention)
    AttentionMaskInterface.register(_IMPL, eager_mask)


@contextlib.contextmanager
def quantized_attention(model, scheme: QuantScheme | None, *, observe=None, rotary_dim: int | None = None,
                        interleaved: bool = False):
    """Within the block, every attention layer of `model` (a transformers model with q/k/v projections) attends
    with q, k (after the rotary map) and v quantized-dequantized by `scheme` (None: unquantized, through the
    model's eager attention). observe(module, q, k, v, mask, kwargs, eager), if given, sees each layer's
    unquantized inputs. The attention implementation is restored on exit."""
    if scheme is not None and not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a QuantScheme or None, got {type(scheme).__name__}")
    layers = attention_layers(model)
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    _register()
    state = _LayerState(scheme, observe, rotary_dim, interleaved)
    previous = model.config._attn_implementation
    for _, _, attn in layers:
        attn._posenc_quant = state
    try:
        model.set_attn_implementation(_IMPL)
        yield
    finally:
        for _, _, attn in layers:
            attn.__dict__.pop("_posenc_quant", None)
        model.set_attn_implementation(previous)


# --------------------------------------------------------------------------------------------- metrics
def _allowed(mask, batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """bool [batch, 1 or heads, q_len, k_len]: which keys each query attends to (eager masks are additive:
    0 where allowed, the dtype's minimum or -inf elsewhere; None: causal)."""
    if mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        return causal.expand(batch, 1, q_len, k_len)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask[..., :k_len]
    return mask.expand(batch, mask.shape[1] if mask.dim() == 4 else 1, q_len, k_len)


def logit_errors(q, k, q_hat, k_hat, allowed, scaling: float, rotary_dim: int | None = None,
                 interleaved: bool = False, chunk_elements: int = 1 << 22) -> dict:
    """Errors of the attention logits scaling * q.k, summed over the positions `allowed` (bool, broadcastable
    to [batch, heads, queries, keys]). q, q_hat: [batch, heads, queries, head_dim]; k, k_hat with kv heads
    (GQA: each kv head serves heads/kv_heads consecutive heads). Float64. Returns per head: "err2" (sum of
    squared logit errors), "pair_err2" [heads, pairs] (sum of squared per-pair errors), "clean2" (sum of
    squared logits) and "count" (positions)."""
    heads, kv = q.shape[1], k.shape[1]
    if heads % kv:
        raise ValueError(f"query heads {heads} must be a multiple of key heads {kv}")
    group = heads // kv
    kw = dict(rotary_dim=rotary_dim, interleaved=interleaved)
    q, q_hat = q.to(torch.float64), q_hat.to(torch.float64)
    k, k_hat = (t.to(torch.float64).repeat_interleave(group, 1) for t in (k, k_hat))
    allowed = allowed.expand(q.shape[0], -1, q.shape[2], k.shape[2])
    qp, qph, kp, kph = (M.rotary_pairs(t, **kw) for t in (q, q_hat, k, k_hat))   # [b, h, s, pairs, 2]
    pairs = qp.shape[-2]
    out = {"err2": torch.zeros(heads, dtype=torch.float64), "pair_err2": torch.zeros(heads, pairs, dtype=torch.float64),
           "clean2": torch.zeros(heads, dtype=torch.float64), "count": torch.zeros(heads, dtype=torch.float64)}
    step = max(1, chunk_elements // max(1, q.shape[0] * pairs * k.shape[2]))
    for h in range(heads):
        a = allowed[:, h if allowed.shape[1] > 1 else 0].to(torch.float64)     # [b, q, k]
        clean = scaling * q[:, h] @ k[:, h].transpose(-1, -2)
        err = scaling * q_hat[:, h] @ k_hat[:, h].transpose(-1, -2) - clean
        out["err2"][h] = (err.square() * a).sum()
        out["clean2"][h] = (clean.square() * a).sum()
        out["count"][h] = a.sum()
        for s in range(0, q.shape[2], step):
            sl = slice(s, s + step)
            d = torch.einsum("bqpc,bkpc->bpqk", qph[:, h, sl], kph[:, h]) - torch.einsum(
                "bqpc,bkpc->bpqk", qp[:, h, sl], kp[:, h])
            out["pair_err2"][h] += (scaling * d).square().mul(a[:, None, sl]).sum((0, 2, 3))
    return out


def _pair_err2(x, x_hat, rotary_dim, interleaved):
    """(sum of squared errors, sum of squares) per head and pair [heads, pairs], over batch and tokens (bhsd)."""
    kw = dict(rotary_dim=rotary_dim, interleaved=interleaved)
    p, ph = M.rotary_pairs(x, **kw), M.rotary_pairs(x_hat, **kw)
    return (ph - p).square().sum((0, 2, 4)), p.square().sum((0, 2, 4))


def _head_err2(x, x_hat, head_axis):
    x, x_hat = x.to(torch.float64), x_hat.to(torch.float64)
    dims = tuple(d for d in range(x.dim()) if d != head_axis)
    return (x_hat - x).square().sum(dims), x.square().sum(dims)


class _Observer:
    """Accumulates, per layer and scheme, the sums the errors are made of (one forward, unquantized activations)."""

    def __init__(self, model, schemes, rotary_dim, interleaved):
        self.layer_of = {id(attn): getattr(attn, "layer_idx", i)
                         for i, (_, _, attn) in enumerate(attention_layers(model))}
        self.schemes, self.rotary_dim, self.interleaved = schemes, rotary_dim, interleaved
        self.sums: dict = {}   # (layer, scheme index) -> {name: tensor}

    def _add(self, key, name, value):
        acc = self.sums.setdefault(key, {})
        acc[name] = acc[name] + value if name in acc else value

    def __call__(self, module, query, key, value, mask, kwargs, eager):
        layer = self.layer_of[id(module)]
        kw = dict(rotary_dim=self.rotary_dim, interleaved=self.interleaved)
        scaling = kwargs.get("scaling")
        scaling = float(scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5))
        with torch.no_grad():
            clean_out, _ = eager(module, query, key, value, mask, **kwargs)    # [b, s, heads, d]
            allowed = _allowed(mask, query.shape[0], query.shape[2], key.shape[2])
            for i, scheme in enumerate(self.schemes):
                qh, kh, vh = scheme.apply(query, key, value, **kw)
                out, _ = eager(module, qh, kh, vh, mask, **kwargs)
                out_qk = eager(module, qh, kh, value, mask, **kwargs)[0] if vh is not value else out
                k_ = (layer, i)
                for name, x, xh in (("q", query, qh), ("k", key, kh)):
                    err2, norm2 = _pair_err2(x, xh, **kw)
                    self._add(k_, f"{name}_pair_err2", err2)
                    self._add(k_, f"{name}_pair_norm2", norm2)
                for name, x, xh in (("q", query, qh), ("k", key, kh), ("v", value, vh)):
                    err2, norm2 = _head_err2(x, xh, 1)
                    self._add(k_, f"{name}_err2", err2)
                    self._add(k_, f"{name}_norm2", norm2)
                err2, norm2 = _head_err2(clean_out, out, 2)
                self._add(k_, "out_err2", err2)
                self._add(k_, "out_norm2", norm2)
                self._add(k_, "out_qk_err2", _head_err2(clean_out, out_qk, 2)[0])
                for name, v in logit_errors(query, key, qh, kh, allowed, scaling, **kw).items():
                    self._add(k_, f"logit_{name}", v)


def _ratio(num, den):
    return (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def _flags(report: dict) -> list[dict]:
    """Per layer, from an `analyze` report: incomplete band [pairs], offset features of q [heads, pairs] and k
    [kv heads, pairs] (offset ratio >= the threshold and more than a uniform energy share, as analyze counts
    them), and the outlier pair of each q head and kv head."""
    threshold = report["settings"]["offset_threshold"]
    out = []
    for entry, freq in zip(report["layers"], report["frequencies"]):
        flags = {"incomplete": [not c for c in freq["completes_period"]]}
        for name in ("q", "k"):
            energy = torch.tensor(entry[f"{name}_energy"], dtype=torch.float64)
            offset = torch.tensor(entry[f"{name}_offset"], dtype=torch.float64)
            flags[f"{name}_offset"] = ((offset >= threshold) & (energy > 1.0 / energy.shape[-1])).tolist()
            flags[f"{name}_outlier"] = entry[f"{name}_outlier_pair"]
        out.append(flags)
    return out


def _head_masks(flags: dict, heads: int, kv_heads: int, pairs: int) -> dict:
    """bool [heads, pairs] per flag, for the logit terms of each query head (a pair is flagged for a head when
    the query head or the kv head it reads has the flag there)."""
    group = heads // kv_heads
    kv_of = torch.arange(heads) // group
    incomplete = torch.tensor(flags["incomplete"][:pairs]).expand(heads, pairs)
    offset = torch.tensor(flags["q_offset"]) | torch.tensor(flags["k_offset"])[kv_of]
    outlier = torch.zeros(heads, pairs, dtype=torch.bool)
    outlier[torch.arange(heads), torch.tensor(flags["q_outlier"])] = True
    outlier[torch.arange(heads), torch.tensor(flags["k_outlier"])[kv_of]] = True
    return {"incomplete": incomplete, "offset": offset, "outlier": outlier}


def _round(x, digits=5):
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _forward(model, input_ids) -> tuple[float, torch.Tensor]:
    """(next-token loss, log-probabilities [batch, seq, vocab] in float64: KL of small errors needs it)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        return float(out.loss), out.logits.double().log_softmax(-1)


def _check_keep_pairs(schemes, pairs: int) -> None:
    most = max(s.keep_pairs for s in schemes)
    if most > pairs:
        raise ValueError(f"keep_pairs={most} exceeds the model's {pairs} rotary pairs per head")


def quant_analysis(model, input_ids: torch.Tensor, schemes, *, report: dict | None = None,
                   interleaved: bool = False, progress=None) -> dict:
    """Measure each QuantScheme on model (a transformers causal LM) and input_ids [batch, seq]: one unquantized
    forward observing every layer, then one quantized forward per scheme for the loss. report: the `analyze`
    report of the same model and text (for the flags; computed when None). progress(done, total, label) is
    called after each forward. Returns a JSON-ready dict (see the module docstring for the definitions)."""
    from .report import analyze
    schemes = list(schemes)
    if not schemes or not all(isinstance(s, QuantScheme) for s in schemes):
        raise TypeError("schemes must be a non-empty list of QuantScheme")
    if report is None:
        report = analyze(model, input_ids, interleaved=interleaved)
    rotary_dims = {fr["rotary_dim"] for fr in report["frequencies"]}
    if len(rotary_dims) != 1:
        raise ValueError(f"layers rotate different numbers of channels {sorted(rotary_dims)}; not supported")
    rotary_dim = rotary_dims.pop()
    _check_keep_pairs(schemes, rotary_dim // 2)
    total = len(schemes) + 1
    observer = _Observer(model, schemes, rotary_dim, interleaved)
    with quantized_attention(model, None, observe=observer, rotary_dim=rotary_dim, interleaved=interleaved):
        clean_loss, clean_logp = _forward(model, input_ids)
    if progress:
        progress(1, total, "unquantized forward, errors of every scheme")
    flags = _flags(report)
    layer_index = {e["layer"]: i for i, e in enumerate(report["layers"])}
    results = []
    for i, scheme in enumerate(schemes):
        with quantized_attention(model, scheme, rotary_dim=rotary_dim, interleaved=interleaved):
            loss, logp = _forward(model, input_ids)
        # KL(unquantized || quantized) of the next-token distributions, mean over positions: unlike the change
        # in loss it does not average errors of both signs away
        kl = float((clean_logp.exp() * (clean_logp - logp)).sum(-1).mean())
        if progress:
            progress(i + 2, total, scheme.label)
        layers, shares = [], {"incomplete": [0.0, 0.0], "offset": [0.0, 0.0], "outlier": [0.0, 0.0]}
        pair_err2_sum, cells = 0.0, 0
        by_pair = {"q_err": [], "k_err": [], "logit_err2": 0.0}
        for layer in sorted(layer_index):
            s = observer.sums[(layer, i)]
            q_pair, k_pair = _ratio(s["q_pair_err2"], s["q_pair_norm2"]), _ratio(s["k_pair_err2"], s["k_pair_norm2"])
            logit_pair = s["logit_pair_err2"] / s["logit_count"][:, None]          # mean square per position
            heads, pairs = logit_pair.shape
            masks = _head_masks(flags[layer_index[layer]], heads, s["k_err2"].numel(), pairs)
            for name, m in masks.items():
                shares[name][0] += float(logit_pair[m].sum())
                shares[name][1] += int(m.sum())
            pair_err2_sum += float(logit_pair.sum())
            cells += logit_pair.numel()
            by_pair["q_err"].append(q_pair)
            by_pair["k_err"].append(k_pair)
            by_pair["logit_err2"] = by_pair["logit_err2"] + logit_pair.sum(0)
            layers.append({
                "layer": layer,
                "q_err": _round(q_pair.tolist()), "k_err": _round(k_pair.tolist()),
                "logit_pair_rms": _round(logit_pair.sqrt().tolist()),
                "q_err_head": _round(_ratio(s["q_err2"], s["q_norm2"]).tolist()),
                "k_err_head": _round(_ratio(s["k_err2"], s["k_norm2"]).tolist()),
                "v_err_head": _round(_ratio(s["v_err2"], s["v_norm2"]).tolist()),
                "out_err_head": _round(_ratio(s["out_err2"], s["out_norm2"]).tolist()),
                "out_qk_err_head": _round(_ratio(s["out_qk_err2"], s["out_norm2"]).tolist()),
                "logit_rms": _round((s["logit_err2"] / s["logit_count"]).sqrt().tolist()),
                "logit_rel": _round(_ratio(s["logit_err2"], s["logit_clean2"]).tolist()),
            })
        mean = lambda key: float(torch.tensor([v for e in layers for v in e[key]]).mean())  # noqa: E731
        results.append({
            "label": scheme.label, "format": scheme.format, "granularity": scheme.granularity,
            "key_granularity": scheme.key_granularity or scheme.granularity, "keep_pairs": scheme.keep_pairs,
            "tensors": scheme.tensors, "loss": loss, "delta_loss": loss - clean_loss, "kl": kl,
            "summary": {
                "q_err": mean("q_err_head"), "k_err": mean("k_err_head"), "v_err": mean("v_err_head"),
                "out_err": mean("out_err_head"), "out_qk_err": mean("out_qk_err_head"),
                "logit_rms": mean("logit_rms"), "logit_rel": mean("logit_rel"),
                "logit_share": {n: v[0] / pair_err2_sum if pair_err2_sum > 0 else float("nan")
                                for n, v in shares.items()},
                "pair_share": {n: v[1] / cells for n, v in shares.items()},
            },
            # over layers and heads: the median of the per-pair relative errors, the share of the logit error
            "by_pair": {"q_err": _round(torch.cat(by_pair["q_err"]).median(0).values.tolist()),
                        "k_err": _round(torch.cat(by_pair["k_err"]).median(0).values.tolist()),
                        "logit_share": _round((by_pair["logit_err2"] / max(pair_err2_sum, 1e-300)).tolist())},
            "layers": layers,
        })
    return {"tokens": int(input_ids.shape[-1]), "loss": clean_loss, "rotary_dim": rotary_dim,
            "pairs": rotary_dim // 2, "flags": flags, "schemes": results,
            "completes_period": report["frequencies"][0]["completes_period"],
            "k_energy": _round(torch.tensor([e["k_energy"] for e in report["layers"]], dtype=torch.float64)
                               .mean((0, 1)).tolist())}


# --------------------------------------------------------------------------------------------- comparison
def default_schemes(formats, granularities, keep_pairs: int = 2) -> list[QuantScheme]:
    """Per format and granularity: the baseline, keys per channel (unless already so) and, if keep_pairs,
    the outlier pairs kept in full precision."""
    out = []
    for f in formats:
        for g in granularities:
            out.append(QuantScheme(f, g))
            if g != "channel":
                out.append(QuantScheme(f, g, key_granularity="channel"))
            if keep_pairs:
                out.append(QuantScheme(f, g, keep_pairs=keep_pairs))
    return out


def _split(text, what):
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise ValueError(f"{what}: empty entry in {text!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{what}: duplicate entry in {text!r}")
    return items


def parse_formats(text: str) -> list[str]:
    """'int8,fp8_e4m3' -> ['int8', 'fp8_e4m3'] (fp8 = fp8_e4m3); ValueError naming the bad entry."""
    out = [_ALIASES.get(f.lower(), f.lower()) for f in _split(text, "--quant")]
    for f in out:
        if f not in FORMATS:
            raise ValueError(f"--quant: unknown format {f!r}; expected some of {', '.join(FORMATS)}")
    if len(set(out)) != len(out):
        raise ValueError(f"--quant: duplicate format in {text!r}")
    return out


def parse_granularities(text: str) -> list[str]:
    out = [g.lower() for g in _split(text, "--granularity")]
    for g in out:
        if g not in GRANULARITIES:
            raise ValueError(f"--granularity: unknown granularity {g!r}; expected some of {', '.join(GRANULARITIES)}")
    return out


def parse_encodings(text: str) -> list[tuple[str, dict | None]]:
    """'original,hope:2048,prope:0.25' (posenc.specs grammar) -> [(canonical text, posenc.patch kwargs, or None
    for the model as loaded)]; ValueError naming the bad spec."""
    from ..specs import parse_specs
    return [(str(s), s.patch_kwargs()) for s in parse_specs(text)]


def compare_encodings(model, input_ids, schemes, encodings, *, report: dict | None = None, analyze_kwargs=None,
                      progress=None) -> dict:
    """quant_analysis of the model under each encoding of `encodings` ([(label, posenc.patch kwargs or None)],
    None = the model as loaded), side by side. report: the `analyze` report of the model as loaded (reused for
    "original"). The model is left as it came (unpatched, or patched again with its own patch)."""
    from .. import hf
    from .report import analyze
    analyze_kwargs = dict(analyze_kwargs or {})
    encodings, schemes = list(encodings), list(schemes)
    if report is not None:
        _check_keep_pairs(schemes, report["frequencies"][0]["rotary_dim"] // 2)
    as_loaded = current_patch(model) if any(kw is not None for _, kw in encodings) else None
    per = len(schemes) + 1
    done = [0]

    def step(_d, _t, label, enc):
        done[0] += 1
        if progress:
            progress(done[0], per * len(encodings), f"{enc}: {label}")

    def restore():
        (hf.patch(model, **as_loaded) if as_loaded else hf.unpatch(model))

    out, changed = [], False
    try:
        for label, kwargs in encodings:
            if kwargs is not None:
                hf.patch(model, **kwargs)   # replaces any earlier patch
                changed = True
            elif changed:
                restore()
                changed = False
            rep = report if kwargs is None and report is not None else analyze(model, input_ids, **analyze_kwargs)
            result = quant_analysis(model, input_ids, schemes, report=rep,
                                    interleaved=analyze_kwargs.get("interleaved", False),
                                    progress=lambda d, t, lab, enc=label: step(d, t, lab, enc))
            result["encoding"] = label
            result["rope_type"] = rep["frequencies"][0]["rope_type"]
            out.append(result)
    finally:
        if changed:
            restore()
    return {"definitions": "q, k after the rotary map and v, quantized then dequantized; symmetric absmax scales; "
                           "errors relative (sqrt of summed squares over the tokens), logit error rms in logit "
                           "units; see posenc.analysis.quant", "encodings": out}


# --------------------------------------------------------------------------------------------- output
def _pct(x):
    return "n/a" if x != x else f"{100 * x:.0f}%"


def _removed(base: float, mitigated: float) -> str:
    if not base or base != base or mitigated != mitigated:
        return "n/a"
    return f"{100 * (1 - mitigated / base):.0f}%".replace("-0%", "0%")


def summarize_quant(comparison: dict) -> str:
    """The comparison as text: one line per encoding and scheme, then what each mitigation removes."""
    encs = comparison["encodings"]
    first = encs[0]
    pairs = first["pairs"]
    bands = sum(first["flags"][0]["incomplete"])
    w = max(16, *(len(e["encoding"]) for e in encs))
    lines = ["", f"quantization of attention inputs (q, k after the rotary map, v; simulated, symmetric absmax "
                 f"scales), {first['tokens']} tokens; errors relative, logit error rms in logit units; "
                 f"'band': share of the per-pair logit error in the {bands}/{pairs} pairs without a full period in "
                 f"context (their share of the pairs in brackets); 'offset', 'outlier': the same for offset-feature "
                 f"pairs and each head's outlier pair; 'out qk': attention-output error with v left unquantized; KL: "
                 f"KL(unquantized || quantized) of the next-token distributions, mean over positions",
             f"{'encoding':<{w}} {'scheme':<34} {'q err':>6} {'k err':>6} {'v err':>6} {'logit':>7} {'out qk':>7} "
             f"{'out err':>7} {'KL':>8} {'Δloss':>8} {'band':>10} {'offset':>10} {'outlier':>10}"]
    for e in encs:
        lines.append(f"{e['encoding']:<{w}} {'(unquantized: loss ' + format(e['loss'], '.4f') + ')':<34}")
        for r in e["schemes"]:
            s = r["summary"]
            share = lambda n: f"{_pct(s['logit_share'][n])} ({_pct(s['pair_share'][n])})"  # noqa: E731
            lines.append(f"{'':<{w}} {r['label']:<34} {s['q_err']:>6.4f} {s['k_err']:>6.4f} {s['v_err']:>6.4f} "
                         f"{s['logit_rms']:>7.4f} {s['out_qk_err']:>7.4f} {s['out_err']:>7.4f} {r['kl']:>8.2e} "
                         f"{r['delta_loss']:>+8.4f} "
                         f"{share('incomplete'):>10} {share('offset'):>10} {share('outlier'):>10}")
    lines.append("mitigations: share of the baseline's logit rms / attention-output error with v unquantized "
                 "(out qk) / KL removed")
    for e in encs:
        base = {}
        for r in e["schemes"]:
            key = (r["format"], r["granularity"])
            if r["key_granularity"] == r["granularity"] and not r["keep_pairs"] and r["tensors"] == "qkv":
                base[key] = r
                continue
            b = base.get(key)
            if b is None:
                continue
            bs, rs = b["summary"], r["summary"]
            lines.append(f"  {e['encoding']}, {r['label']}: {_removed(bs['logit_rms'], rs['logit_rms'])} / "
                         f"{_removed(bs['out_qk_err'], rs['out_qk_err'])} / {_removed(b['kl'], r['kl'])}")
    return "\n".join(lines)


def plot_quant(comparison: dict, directory: str) -> list[str]:
    """PNGs into directory: quant_by_pair.png (per baseline scheme: k and q relative error and the share of the
    logit error by rotary pair, one line per encoding) and quant_k_err_<encoding>.png (k relative error per
    layer, kv head and pair, first scheme). Needs matplotlib; returns the paths written (each via a temp file)."""
    plt = _io.pyplot()
    os.makedirs(directory, exist_ok=True)
    encs = comparison["encodings"]
    paths = []

    def save(fig, name):
        fig.tight_layout()
        try:
            paths.append(_io.save_png(fig, os.path.join(directory, name), dpi=110))
        finally:
            plt.close(fig)

    base = [i for i, r in enumerate(encs[0]["schemes"])
            if r["key_granularity"] == r["granularity"] and not r["keep_pairs"]] or [0]
    cols = (("k_err", "k relative error (median over layers, heads)", True),
            ("q_err", "q relative error (median over layers, heads)", True),
            ("logit_share", "share of the logit error", False))
    fig, axes = plt.subplots(len(base), 3, figsize=(14, 3.2 * len(base)), squeeze=False)
    cut = sum(encs[0]["completes_period"])
    for row, i in enumerate(base):
        for col, (key, title, log) in enumerate(cols):
            ax = axes[row][col]
            for e in encs:
                ax.plot(e["schemes"][i]["by_pair"][key], marker=".", lw=1.2, label=e["encoding"])
            if key == "logit_share":
                ax.plot(encs[0]["k_energy"], color="grey", ls=":", lw=1,
                        label=f"k energy share ({encs[0]['encoding']})")
            if cut < encs[0]["pairs"]:
                ax.axvspan(cut - 0.5, encs[0]["pairs"] - 0.5, color="red", alpha=0.07, lw=0,
                           label="no full period in context")
            if log:
                ax.set_yscale("log")
            ax.set(title=f"{encs[0]['schemes'][i]['label']}: {title}", xlabel="rotary pair (fast → slow)")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    save(fig, "quant_by_pair.png")
    for e in encs:
        layers = e["schemes"][0]["layers"]
        rows = [h for layer in layers for h in layer["k_err"]]
        fig, ax = plt.subplots(figsize=(min(14.0, 0.15 * e["pairs"] + 4), min(12.0, 0.08 * len(rows) + 2)))
        im = ax.imshow([[math.log10(max(v, 1e-6)) for v in r] for r in rows], aspect="auto", cmap="magma",
                       interpolation="nearest")
        per = len(layers[0]["k_err"])
        ax.set_yticks(list(range(0, len(rows), per)), [str(layer["layer"]) for layer in layers])
        if cut < e["pairs"]:
            ax.axvline(cut - 0.5, color="cyan", lw=1, ls="--")
        ax.set(title=f"{e['encoding']}, {e['schemes'][0]['label']}: log10 k relative error", xlabel="rotary pair",
               ylabel="layer (rows: kv heads)")
        fig.colorbar(im, ax=ax)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in e["encoding"])
        save(fig, f"quant_k_err_{safe}.png")
    return paths


def cli_plan(quant: str | None, granularity: str | None, keep_pairs: int | None, encoding: str | None):
    """What `posenc analyze --quant ...` asks for: (schemes, encodings), or None without --quant. ValueError
    (one line, naming the flag) on a bad value or on a quantization flag without --quant."""
    if quant is None:
        extra = [flag for flag, value in (("--granularity", granularity), ("--keep-pairs", keep_pairs),
                                          ("--encoding", encoding)) if value is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} only apply with --quant FORMATS (e.g. --quant int8,fp8_e4m3)")
        return None
    schemes = default_schemes(parse_formats(quant), parse_granularities(granularity or "tensor"),
                              2 if keep_pairs is None else keep_pairs)
    try:
        encodings = parse_encodings(encoding or "original")
    except ValueError as e:
        raise ValueError(f"--encoding: {e}") from None
    return schemes, encodings
