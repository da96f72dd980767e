"""`analyze`: one forward with hooks -> a JSON-ready report; `summarize` (text) and `plot_report` (PNGs).

Definitions (all per layer and head, averaged over the tokens of the text):
- frequency energy: share of E|q|^2 (E|k|^2) carried by each rotary pair; frequency norm: mean pair norm
  (Barbero et al. 2024, figs. 3-4). "Low-frequency half" = the slower half of the pairs; "incomplete band" =
  the pairs whose wavelength exceeds the context length (they never complete a period; HoPE drops them).
- offset ratio: |E x_pair| / sqrt(E|x_pair|^2) on q/k before the rotary map; an offset feature is a pair with
  ratio >= `offset_threshold` that also carries more than its uniform share of the energy (Jonasson 2025).
  Outlier pair: the pair holding the largest |q| (|k|) channel of the head.
- sink share: attention on the first token, averaged over queries 1..n-1; a sink head has share > `sink_threshold`;
  "first token on top": the first token is the most-attended key for more than half of the queries 1..n-1;
  also the share of heads above 0.3, the sink rate of Gu et al. 2024 ("When Attention Sink Emerges").
- value drain: |v| at the first token / median |v| of the others, per kv head (Guo et al. 2024).
- massive activations: max |residual| / median |residual| after each decoder layer; entries at least
  `massive_threshold` times the median are massive (Sun et al. 2024; An et al. 2025; Guo et al. 2024).
"""
from __future__ import annotations

import math
import os

import torch

from ..frequencies import ROPE_PARAMS, rope_frequencies
from .. import io as _io
from . import metrics as M
from .capture import UnsupportedModelError, capture

__all__ = ["analyze", "layer_frequencies", "summarize", "write_json", "plot_report"]


def _rope_params(config, layer: int) -> dict:
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):  # one rope per layer type (Gemma 3/4)
        types = getattr(config, "layer_types", None)
        key = types[layer] if types and layer < len(types) and types[layer] in rp else next(iter(rp))
        rp = dict(rp[key])
    return rp


def _model_inv_freq(model, config, layer: int) -> torch.Tensor | None:
    """The inv_freq buffer of the model's rotary module for this layer (per layer type where there are
    several): the frequencies the model actually rotates by, a posenc patch included."""
    buffers = {}
    for module in model.modules():
        if "rotary" in type(module).__name__.lower():
            buffers.update({n: b for n, b in module.named_buffers(recurse=False) if n.endswith("inv_freq")})
    types = getattr(config, "layer_types", None)
    key = f"{types[layer]}_inv_freq" if types and layer < len(types) else None
    found = buffers.get(key) if key else None
    return (found if found is not None else buffers.get("inv_freq"))


def layer_frequencies(config, layer: int, head_dim: int, model=None) -> dict:
    """The inverse frequencies (float64, fastest first) one layer rotates by, with the rope type, base,
    rotary_dim and the original context length. Taken from the model's rotary buffer when `model` is given
    and has one (source "model"), else computed from the config (source "config"), falling back to default
    RoPE with a note for a rope type posenc does not know."""
    rp = _rope_params(config, layer)
    base = float(rp.get("rope_theta", getattr(config, "rope_theta", 10_000.0)))
    rope_type = rp.get("rope_type", "default")
    if isinstance(rp.get("posenc"), dict):  # a posenc.patch: name the encoding it put in
        rope_type = f"posenc:{rp['posenc'].get('encoding', '?')}"
    prf = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    note = None
    try:
        allowed = ROPE_PARAMS[rope_type]
        params = {k: rp[k] for k in allowed if rp.get(k) is not None}
        if "max_position_embeddings" in allowed:
            params["max_position_embeddings"] = config.max_position_embeddings
        inv, _ = rope_frequencies(head_dim, base, rope_type, partial_rotary_factor=prf, **params)
    except (KeyError, ValueError, TypeError) as e:
        note = f"rope type {rope_type!r} not understood ({e}); default RoPE frequencies assumed"
        inv, _ = rope_frequencies(head_dim, base, "default", partial_rotary_factor=prf)
    source = "config"
    buffer = _model_inv_freq(model, config, layer) if model is not None else None
    if buffer is not None and buffer.dim() == 1:
        inv, source, note = buffer.detach().to("cpu", torch.float64), "model", None
    context = rp.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
    return {"inv_freq": inv, "rope_type": rope_type, "base": base, "rotary_dim": 2 * inv.numel(),
            "context_length": int(context) if context else None, "note": note, "source": source}


def _mean(xs):
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def analyze(model, input_ids: torch.Tensor, *, context_length: int | None = None, sink_threshold: float = 0.5,
            early_layers: int = 2, massive_threshold: float = 100.0, offset_threshold: float = 0.7,
            interleaved: bool = False, tokens: list[str] | None = None) -> dict:
    """Run input_ids [batch, seq] through model (a transformers causal LM) once, with hooks, and measure.
    tokens: the token strings of the first row (for the summary), if known. Returns a JSON-ready dict: "model", "text", "layers" (one entry per attention layer) and "summary"."""
    config = model.config
    with torch.no_grad(), capture(model) as records:
        model(input_ids=input_ids, use_cache=False)
    missing = [r.index for r in records if r.probs is None or r.q is None]
    if missing:
        raise UnsupportedModelError(f"layers {missing} did not go through the attention interface; the model is "
                                    "not supported")
    for r in records:  # the pre-rotary hooks infer the layout; attention's own inputs are the check
        if r.q.shape != r.q_rot.shape or r.k.shape != r.k_rot.shape or r.q.shape[2] % r.k.shape[2]:
            raise UnsupportedModelError(
                f"layer {r.index}: the hooks read q {tuple(r.q.shape)} / k {tuple(r.k.shape)} before the rotary "
                f"map but attention received q {tuple(r.q_rot.shape)} / k {tuple(r.k_rot.shape)} (bshd); this "
                "model's layout is not supported")
    layers, freq_by_layer = [], []
    for r in records:
        head_dim = r.q.shape[-1]
        fr = layer_frequencies(config, r.index, head_dim, model)
        L = context_length or fr["context_length"] or input_ids.shape[-1]
        fr["context_length"] = L
        freq_by_layer.append(fr)
        rd = fr["rotary_dim"]
        kw = dict(rotary_dim=rd, interleaved=interleaved)
        entry = {"layer": r.index, "heads": r.q.shape[2], "kv_heads": r.k.shape[2]}
        for name, x in (("q", r.q), ("k", r.k)):
            entry[f"{name}_energy"] = M.frequency_energy(x, **kw).tolist()
            entry[f"{name}_norm"] = M.frequency_norms(x, **kw).tolist()
            entry[f"{name}_offset"] = M.offset_ratio(x, **kw).tolist()
            entry[f"{name}_outlier_pair"] = M.outlier_pair(x, **kw).tolist()
            # the rotation leaves pair norms unchanged: a check that the hooks saw the right tensors
            rot = r.q_rot if name == "q" else r.k_rot
            entry[f"{name}_rotation_mismatch"] = float(
                (M.frequency_norms(rot, **kw) - M.frequency_norms(x, **kw)).abs().max()
                / M.frequency_norms(x, **kw).abs().max().clamp_min(1e-30))
        entry["sink_share"] = M.sink_share(r.probs).tolist()
        entry["sink_argmax"] = M.sink_argmax_fraction(r.probs).tolist()
        entry["value_drain"] = M.value_drain(r.v).tolist()
        entry["massive"] = M.massive_activations(r.residual) if r.residual is not None else None
        layers.append(entry)

    report = {
        "model": {"type": getattr(config, "model_type", type(model).__name__), "layers": len(layers),
                  "heads": layers[0]["heads"], "kv_heads": layers[0]["kv_heads"],
                  "head_dim": records[0].q.shape[-1]},
        "text": {"tokens": int(input_ids.shape[-1]), "first_token": tokens[0] if tokens else None,
                 "token_strings": list(tokens) if tokens else None},
        "frequencies": [{"inv_freq": fr["inv_freq"].tolist(), "rope_type": fr["rope_type"], "base": fr["base"],
                         "rotary_dim": fr["rotary_dim"], "context_length": fr["context_length"],
                         "completes_period": M.completes_period(fr["inv_freq"], fr["context_length"]).tolist(),
                         "note": fr["note"], "source": fr["source"]} for fr in freq_by_layer],
        "settings": {"sink_threshold": sink_threshold, "early_layers": early_layers,
                     "massive_threshold": massive_threshold, "offset_threshold": offset_threshold,
                     "interleaved": interleaved},
        "layers": layers,
    }
    report["summary"] = _summary(report)
    return report


def _summary(report: dict) -> dict:
    s = report["settings"]
    layers = report["layers"]
    later = [e for e in layers if e["layer"] >= s["early_layers"]] or layers
    out = {"later_layers_from": later[0]["layer"]}

    # sinks and drains
    shares = [(e["layer"], h, v) for e in later for h, v in enumerate(e["sink_share"])]
    sink_heads = [(l, h) for l, h, v in shares if v > s["sink_threshold"]]
    out["sink"] = {"heads": len(shares), "sink_heads": len(sink_heads),
                   "fraction": len(sink_heads) / len(shares), "mean_share": _mean(v for *_, v in shares),
                   "first_token_on_top": sum(v > 0.5 for e in later for v in e["sink_argmax"]),
                   "heads_over_0.3": sum(v > 0.3 for *_, v in shares),  # Gu et al. 2024's sink rate, eps=0.3
                   "per_layer_mean": [_mean(e["sink_share"]) for e in layers],
                   "early_sink_heads": sum(v > s["sink_threshold"] for e in layers if e not in later
                                           for v in e["sink_share"])}
    drains_sink, drains_other = [], []
    for e in later:
        group = e["heads"] // e["kv_heads"]
        sinky = {h // group for h, v in enumerate(e["sink_share"]) if v > s["sink_threshold"]}
        for kv, ratio in enumerate(e["value_drain"]):
            (drains_sink if kv in sinky else drains_other).append(ratio)
    med = lambda xs: float(torch.tensor(xs).median()) if xs else float("nan")  # noqa: E731
    out["value_drain"] = {"median_all": med(drains_sink + drains_other), "median_sink_kv_heads": med(drains_sink),
                          "median_other_kv_heads": med(drains_other), "kv_heads_with_sink": len(drains_sink)}

    # massive activations
    massive = [(e["layer"], e["massive"]) for e in layers if e["massive"]]
    if massive:
        top_layer, top = max(massive, key=lambda m: m[1]["ratio"])
        dims, toks = set(), set()
        for _, m in massive:
            for tok, dim, val in m["top"]:
                if abs(val) >= s["massive_threshold"] * m["median"]:
                    dims.add(dim)
                    toks.add(tok)
        out["massive"] = {"max_ratio": top["ratio"], "layer": top_layer, "max": top["max"], "entry": top["top"][0],
                          "layers_over_threshold": [l for l, m in massive if m["ratio"] >= s["massive_threshold"]],
                          "dims": sorted(dims), "tokens": sorted(toks)}

    # frequency bands and offsets, over the later layers
    for name in ("q", "k"):
        energy = torch.tensor([e[f"{name}_energy"] for e in later], dtype=torch.float64)  # [L, heads, pairs]
        pairs = energy.shape[-1]
        complete = torch.tensor([report["frequencies"][layers.index(e)]["completes_period"] for e in later])
        incomplete = ~complete[:, None, :].expand_as(energy)
        per_pair = energy.mean((0, 1))
        total = energy.sum(-1)  # < 1 with partial rotary
        offsets = torch.tensor([e[f"{name}_offset"] for e in later], dtype=torch.float64)
        feats = (offsets >= s["offset_threshold"]) & (energy > 1.0 / pairs)
        outl = torch.tensor([e[f"{name}_outlier_pair"] for e in later])  # [L, heads]
        outl_incomplete = torch.gather(incomplete, -1, outl[..., None])[..., 0]
        out[name] = {
            "low_half_share": float((energy[..., pairs // 2:].sum(-1) / total).mean()),
            "incomplete_band_share": float(((energy * incomplete).sum(-1) / total).mean()),
            "incomplete_band_pairs": int(incomplete[0, 0].sum()), "pairs": pairs,
            "top_pairs": per_pair.argsort(descending=True)[:3].tolist(),
            "offset_features": int(feats.sum()),
            "offset_features_in_incomplete_band": int((feats & incomplete).sum()),
            "outlier_heads": int(outl.numel()), "outliers_in_incomplete_band": int(outl_incomplete.sum()),
        }
    return out


def write_json(report: dict, path: str) -> None:
    """The report as JSON at path, atomically (posenc.io)."""
    _io.write_json(report, path)


def _fmt_pct(x):
    return "n/a" if x != x else f"{100 * x:.0f}%"


def summarize(report: dict, name: str | None = None) -> str:
    """The report as a short text: headline findings, then one line per layer."""
    m, s, st = report["model"], report["summary"], report["settings"]
    fr = report["frequencies"][0]
    bases = list(dict.fromkeys(f["base"] for f in report["frequencies"]))
    lines = [f"model: {name or m['type']}  ({m['type']}, {m['layers']} layers, {m['heads']} heads / "
             f"{m['kv_heads']} kv heads, head_dim {m['head_dim']}, rotary_dim {fr['rotary_dim']}, "
             f"rope {fr['rope_type']} base {'/'.join(f'{b:g}' for b in bases)}, context {fr['context_length']})",
             f"text: {report['text']['tokens']} tokens"
             + (f", first token {report['text']['first_token']!r}" if report["text"]["first_token"] else "")]
    notes = {f["note"] for f in report["frequencies"] if f["note"]}
    lines += [f"note: {n}" for n in sorted(notes)]
    sk = s["sink"]
    lines.append(f"attention sinks: {sk['sink_heads']}/{sk['heads']} heads in layers >= {s['later_layers_from']} put "
                 f"> {st['sink_threshold']:g} of their attention on the first token (mean share "
                 f"{_fmt_pct(sk['mean_share'])}); {sk['early_sink_heads']} such heads before; the first token "
                 f"is the most-attended key of most queries in {sk['first_token_on_top']}/{sk['heads']} heads; "
                 f"share > 0.3 (Gu et al.'s sink rate) in {sk['heads_over_0.3']}/{sk['heads']}")
    vd = s["value_drain"]
    f2 = lambda x: "n/a" if x != x else f"{x:.2f}"  # noqa: E731
    lines.append(f"value drains: |v| at the first token / median |v| elsewhere: median {f2(vd['median_all'])} "
                 f"(kv heads serving sink heads: {f2(vd['median_sink_kv_heads'])}, others: "
                 f"{f2(vd['median_other_kv_heads'])})")
    if "massive" in s:
        ma = s["massive"]
        tok, dim, val = ma["entry"]
        strings = report["text"].get("token_strings")
        named = lambda t: f"{t} {strings[t]!r}" if strings and t < len(strings) else str(t)  # noqa: E731
        lines.append(f"massive activations: max |residual| / median = {ma['max_ratio']:.0f} (layer {ma['layer']}, "
                     f"token {named(tok)}, dim {dim}, value {val:.1f}); layers >= {st['massive_threshold']:g}x: "
                     f"{len(ma['layers_over_threshold'])}/{m['layers']}"
                     + (f"; dims {ma['dims'][:8]} at tokens {', '.join(named(t) for t in ma['tokens'][:8])}"
                        if ma["dims"] else "; no massive entries"))
    for name in ("q", "k"):
        b = s[name]
        lines.append(f"{name} norm by frequency: slowest half of pairs carries {_fmt_pct(b['low_half_share'])}; the "
                     f"{b['incomplete_band_pairs']}/{b['pairs']} pairs without a full period in context carry "
                     f"{_fmt_pct(b['incomplete_band_share'])}; top pairs {b['top_pairs']}; outlier channel in the "
                     f"incomplete band in {b['outliers_in_incomplete_band']}/{b['outlier_heads']} heads; "
                     f"offset features: {b['offset_features']} "
                     f"({b['offset_features_in_incomplete_band']} in the incomplete band)")
    lines.append("")
    lines.append(f"{'layer':>5} {'sink mean':>9} {'sink heads':>10} {'v drain':>8} {'massive':>8} "
                 f"{'(tok,dim)':>11} {'q slow½':>7} {'k slow½':>7}")
    for e in report["layers"]:
        pairs = len(e["q_energy"][0])
        half = lambda en: _mean(sum(h[pairs // 2:]) / sum(h) for h in en)  # noqa: E731
        ma = e["massive"]
        where = f"({ma['top'][0][0]},{ma['top'][0][1]})" if ma else "-"
        lines.append(f"{e['layer']:>5} {_mean(e['sink_share']):>9.2f} "
                     f"{sum(v > st['sink_threshold'] for v in e['sink_share']):>5}/{e['heads']:<4} "
                     f"{_mean(e['value_drain']):>8.2f} {ma['ratio'] if ma else float('nan'):>8.0f} {where:>11} "
                     f"{_fmt_pct(half(e['q_energy'])):>7} {_fmt_pct(half(e['k_energy'])):>7}")
    return "\n".join(lines)


def plot_report(report: dict, directory: str) -> list[str]:
    """Heatmap PNGs into directory (created): sinks, value drains, q/k energy by frequency, k offsets, massive
    activations. Needs matplotlib; returns the paths written."""
    plt = _io.pyplot()
    os.makedirs(directory, exist_ok=True)
    layers = report["layers"]
    paths = []

    def save(fig, name):
        path = os.path.join(directory, name)
        fig.tight_layout()
        try:
            paths.append(_io.save_png(fig, path, dpi=110))
        finally:
            plt.close(fig)

    def heat(data, title, xlabel, ylabel, name, cmap="viridis", vmin=None, vmax=None, cut=None, yticks=None):
        fig, ax = plt.subplots(figsize=(min(14.0, max(4.0, 0.12 * len(data[0]) + 3)),
                                        min(12.0, max(3.0, 0.1 * len(data) + 2))))
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if cut is not None:
            ax.axvline(cut - 0.5, color="red", lw=1, ls="--", label="no full period in context →")
            ax.legend(loc="upper right", fontsize=7)
        if yticks:
            ax.set_yticks(*yticks)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.colorbar(im, ax=ax)
        save(fig, name)

    heat([e["sink_share"] for e in layers], "attention on the first token", "head", "layer", "sink_share.png",
         vmin=0, vmax=1)
    heat([[math.log10(max(v, 1e-6)) for v in e["value_drain"]] for e in layers],
         "log10 |v| at first token / median |v|", "kv head", "layer", "value_drain.png", cmap="coolwarm_r")
    cut = sum(report["frequencies"][0]["completes_period"])
    for name in ("q", "k"):
        rows = [h for e in layers for h in e[f"{name}_energy"]]
        per = len(layers[0][f"{name}_energy"])
        ticks = (list(range(0, len(rows), per)), [str(e["layer"]) for e in layers])
        heat(rows, f"{name}: share of |{name}|² per rotary pair (rows: layer × head)", "pair (fast → slow)",
             "layer", f"freq_energy_{name}.png", cmap="magma", cut=cut, yticks=ticks)
    rows = [h for e in layers for h in e["k_offset"]]
    per = len(layers[0]["k_offset"])
    heat(rows, "k offset ratio |E k_pair| / rms (before rotary)", "pair (fast → slow)", "layer",
         "offset_k.png", vmin=0, vmax=1, cut=cut,
         yticks=(list(range(0, len(rows), per)), [str(e["layer"]) for e in layers]))
    if all(e["massive"] for e in layers):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([e["layer"] for e in layers], [e["massive"]["ratio"] for e in layers])
        ax.set_yscale("log")
        ax.axhline(report["settings"]["massive_threshold"], color="red", ls="--", lw=1)
        ax.set(title="max |residual| / median |residual|", xlabel="layer", ylabel="ratio")
        save(fig, "massive.png")
    return paths
