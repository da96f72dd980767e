"""An et al. 2025, "Systematic Outliers in Large Language Models", on SmolLM2-135M (--quick: a random tiny
Llama), with posenc.analysis's hooks.

The paper's picture: massive activations (residual entries thousands of times the median) appear in a few
fixed dimensions, at the first token (and a few delimiter-like tokens), written by one early layer's MLP
(whose down projection has outlier weights in those dimensions), and persist until the last layers; from the
layer after they appear, attention heads sink on exactly those tokens, whose value states are small (value
drains): the outliers act together as a context-aware scaling of attention. Here, per layer: the largest
residual entries (token, dimension, value) over the median, which tokens and dimensions are massive, where
they come from (the MLP or the attention output of the layer where they first appear, and the down
projection's weights into those dimensions), the attention the massive tokens receive, and their value
norms. Then the same for the model patched to HoPE, p-RoPE or NoPE (posenc.patch, no fine-tune), with the
text's loss; `--finetuned DIR [DIR ...]` adds models that `posenc finetune` wrote (run with the patch they
were saved with).

    python benchmarks/papers/systematic_outliers.py [--quick] [--json out.json] [--plot out.png] [--finetuned DIR ...]
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import papers_common as C  # noqa: E402


# ----------------------------------------------------------------------------------------------- metrics
def massive_entries(h: torch.Tensor, threshold: float) -> list[tuple[int, int, int, float]]:
    """(row, token, dim, value) of every entry of h [b, s, hidden] with |value| >= threshold x the median
    |entry| of h, largest first."""
    mag = h.abs().to(torch.float64)
    median = float(mag.median())
    idx = (mag >= threshold * median).nonzero().tolist()
    out = [(b, t, d, float(h[b, t, d])) for b, t, d in idx]
    return sorted(out, key=lambda e: -abs(e[3]))


def attention_received(probs: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """Per head, the attention that queries put on the given key tokens (summed over them), averaged over the
    queries after the first of them, over the batch rows that have any: probs [b, h, q, k]; tokens: per row
    a list of key positions. Returns [h] (nan if no row has a token)."""
    per_row = []
    for b, toks in enumerate(tokens):
        if not toks:
            continue
        first = min(toks)
        if first + 1 >= probs.shape[-2]:
            continue
        w = probs[b, :, first + 1:, :][..., toks].sum(-1)  # [h, queries after the first token]
        per_row.append(w.to(torch.float64).mean(-1))
    if not per_row:
        return torch.full((probs.shape[1],), float("nan"), dtype=torch.float64)
    return torch.stack(per_row).mean(0)


def value_norm_ratio(v: torch.Tensor, tokens: list[list[int]]) -> float:
    """Median over kv heads of: mean |v| at the given tokens over the median |v| of the other tokens.
    v [b, s, hk, d]."""
    norms = v.to(torch.float64).norm(dim=-1)  # [b, s, hk]
    at, rest = [], []
    for b in range(norms.shape[0]):
        mask = torch.zeros(norms.shape[1], dtype=torch.bool)
        mask[list(tokens[b]) if b < len(tokens) else []] = True
        at.append(norms[b][mask])
        rest.append(norms[b][~mask])
    at, rest = torch.cat(at), torch.cat(rest)
    if at.numel() == 0 or rest.numel() == 0:
        return float("nan")
    return float((at.mean(0) / rest.median(0).values.clamp_min(1e-30)).median())


def outlier_lineup(records, mlp_out: list[torch.Tensor], down_weights: list[torch.Tensor],
                   threshold: float = 100.0) -> dict:
    """Where the massive activations, sinks and drains are, and whether they line up. records: the
    posenc.analysis.capture list; mlp_out[l]: layer l's MLP output [b, s, hidden]; down_weights[l]: its
    down projection weight [hidden, intermediate] (None where unknown).

    The "onset" layer is the one whose output raises the largest |residual| entry the most (where the
    massive activation is written); the massive tokens and dimensions are those over the threshold in at
    least half of the layers from the onset on; entries over the threshold before the onset are listed
    apart ("early")."""
    layers = []
    for r in records:
        entries = massive_entries(r.residual, threshold)
        med = float(r.residual.abs().median())
        top = massive_entries(r.residual, 0.0)[0]
        layers.append({"layer": r.index, "ratio": abs(top[3]) / max(med, 1e-30), "median": med, "top": top,
                       "massive": entries[:20], "count": len(entries)})
    rows = records[0].residual.shape[0]
    index = [e["layer"] for e in layers]
    out = {"threshold": threshold, "layers_with_massive": [e["layer"] for e in layers if e["count"]],
           "per_layer": layers}
    peaks = [abs(e["top"][3]) for e in layers]
    jumps = [peaks[0]] + [b - a for a, b in zip(peaks[:-1], peaks[1:])]
    onset_i = max(range(len(layers)), key=lambda i: jumps[i])
    span = [e for e in layers[onset_i:] if e["count"]]
    massive_tokens = [[] for _ in range(rows)]
    dims = []
    if span:
        counts_tok, counts_dim = {}, {}
        for e in span:
            for b, t, d, _ in e["massive"]:
                counts_tok.setdefault((b, t), set()).add(e["layer"])
                counts_dim.setdefault(d, set()).add(e["layer"])
        half = (len(layers) - onset_i) / 2
        for (b, t), ls in sorted(counts_tok.items()):
            if len(ls) >= half:
                massive_tokens[b].append(t)
        dims = sorted(d for d, ls in counts_dim.items() if len(ls) >= half)
    early = sorted({(b, t, d) for e in layers[:onset_i] for b, t, d, _ in e["massive"]})
    b, t, d, value = layers[onset_i]["top"]
    before = float(records[onset_i - 1].residual[b, t, d]) if onset_i > 0 else 0.0
    mlp = float(mlp_out[onset_i][b, t, d]) if mlp_out[onset_i] is not None else float("nan")
    origin = {"layer": index[onset_i], "row": b, "token": t, "dim": d, "value": value, "before": before,
              "mlp_output": mlp, "attention_output": value - before - mlp}
    w = down_weights[onset_i]
    if w is not None:
        wm = w.abs().to(torch.float64)
        origin["down_proj_max_into_dim"] = float(wm[d].max())
        origin["down_proj_median"] = float(wm.median())
        origin["down_proj_rows_with_larger_max"] = int((wm.max(1).values > wm[d].max()).sum())
    out.update(onset_layer=index[onset_i], origin=origin, tokens=massive_tokens, dims=dims,
               early=[list(x) for x in early], massive=bool(span) and any(massive_tokens))
    # sinks and drains per layer: attention received by the massive tokens (the first token when none)
    targets = massive_tokens if any(massive_tokens) else [[0] for _ in range(rows)]
    per_layer = []
    for r in records:
        recv = attention_received(r.probs, targets)
        first_tok = attention_received(r.probs, [[0] for _ in range(rows)])
        top_keys = r.probs.to(torch.float64).mean((1, 2)).argmax(-1).tolist()  # most-attended key per row
        per_layer.append({"layer": r.index, "attention_on_massive": float(recv.mean()),
                          "attention_on_first": float(first_tok.mean()),
                          "heads_over_half_on_massive": int((recv > 0.5).sum()),
                          "value_ratio_massive": value_norm_ratio(r.v, targets),
                          "most_attended_key": top_keys,
                          "most_attended_is_massive": [k in targets[b] for b, k in enumerate(top_keys)]})
    out["attention"] = per_layer
    n = records[0].residual.shape[1]
    # what "no sink" looks like: the share uniform causal attention gives the first token
    out["uniform_share_first_token"] = sum(1 / (t + 1) for t in range(1, n)) / (n - 1)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    after = [p for p in per_layer if p["layer"] > out["onset_layer"]]
    upto = [p for p in per_layer if p["layer"] <= out["onset_layer"]]
    out["summary"] = {
        "attention_on_massive_after": mean([p["attention_on_massive"] for p in after]),
        "attention_on_massive_upto": mean([p["attention_on_massive"] for p in upto]),
        "value_ratio_massive_after": mean([p["value_ratio_massive"] for p in after
                                           if not math.isnan(p["value_ratio_massive"])]),
        "value_ratio_massive_upto": mean([p["value_ratio_massive"] for p in upto
                                          if not math.isnan(p["value_ratio_massive"])]),
        "most_attended_is_massive_after": mean([float(all(p["most_attended_is_massive"])) for p in after]),
        "max_ratio": max(e["ratio"] for e in layers),
    }
    return out


# ------------------------------------------------------------------------------------------------- runs
def token_names(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    """The token strings of each row (the ids themselves without a tokenizer)."""
    if tokenizer is None:
        return [[str(int(i)) for i in row] for row in ids]
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]


def text_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of logits [b, s, vocab] on ids [b, s]."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def capture_model(model, ids: torch.Tensor):
    """(records, mlp outputs, down projection weights, loss) for one forward of ids [b, s]."""
    from posenc.analysis import attention_layers, capture
    decoder_layers = [layer for _, layer, _ in attention_layers(model)]
    mlp_out = [None] * len(decoder_layers)
    hooks = []
    for i, layer in enumerate(decoder_layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None:
            hooks.append(mlp.register_forward_hook(
                lambda m, inp, o, i=i: mlp_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().float())))
    try:
        with torch.no_grad(), capture(model) as records:
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    loss = text_loss(logits, ids)
    down = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in decoder_layers]
    down = [d.weight.detach() if d is not None else None for d in down]
    return records, mlp_out, down, loss


VARIANTS = [("original", None, {}), ("hope", "hope", {}), ("p-rope 0.25", "prope", {"p": 0.25}),
            ("p-rope 0.75", "prope", {"p": 0.75}), ("nope", "nope", {})]


def run_variants(model, ids, threshold: float, progress=None) -> list[dict]:
    import posenc
    results = []
    for label, name, kwargs in VARIANTS:
        if name is not None:
            posenc.patch(model, name, **kwargs)
        try:
            records, mlp_out, down, loss = capture_model(model, ids)
        finally:
            if name is not None:
                posenc.unpatch(model)
        line = outlier_lineup(records, mlp_out, down, threshold)
        line.update(label=label, loss=loss, patch=None if name is None else {"encoding": name, **kwargs})
        results.append(line)
        if progress:
            progress.step(note=label)
    return results


def finetune_record(directory: str) -> dict | None:
    """What finetune.json in directory says about the run (None without one): encoding, steps, sequence
    length, global batch, lr, seed, dtype, the held-out loss before and after. ValueError if it cannot be
    read."""
    path = os.path.join(directory, "finetune.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k, {}), dict) for k in ("args", "final")):
        raise ValueError(f"{path} does not hold posenc finetune's record (a JSON object with args and final)")
    a, final = rec.get("args", {}), rec.get("final", {})
    return {"encoding": rec.get("encoding"), "command": rec.get("command"), "steps": a.get("steps"),
            "seq_len": a.get("seq_len"), "global_batch": rec.get("global_batch"), "lr": rec.get("lr"),
            "seed": a.get("seed"), "dtype": a.get("dtype"), "device": rec.get("device"),
            "eval_loss_before": final.get("eval_loss_before"), "eval_loss": final.get("eval_loss")}


def _check_finetuned(directory: str, model, base_config, record: dict | None, patch: dict | None) -> None:
    """ValueError unless the fine-tuned model has the analysed model's shape (the same text must mean the same
    tokens) and reloads with the encoding finetune.json names (else the analysis would run another one)."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    ours, theirs = ([getattr(c, k, None) for k in keys] for c in (base_config, model.config))
    if ours != theirs:
        raise ValueError(f"{directory} is not a fine-tune of the analysed model ({', '.join(keys)}: {theirs}, "
                         f"analysed model: {ours})")
    if record is None or record["encoding"] is None:
        return
    from posenc.specs import parse_spec
    spec = parse_spec(record["encoding"])
    if spec.name == "original":
        ok, loads = patch is None, "loads patched"
    else:
        ok = patch is not None and patch["encoding"] == spec.name and all(
            patch.get(k) == v for k, v in spec.options.items())
        loads = "loads unpatched (the analysis would run RoPE)" if patch is None else f"loads with {patch}"
    if not ok:
        raise ValueError(f"{directory} was fine-tuned with {record['encoding']!r} but {loads}")


def run_finetuned(directory: str, record: dict | None, base_config, ids, threshold: float) -> dict:
    """The line-up of a model directory from posenc finetune, run with the patch it carries when reloaded
    (checked against finetune.json's encoding: _check_finetuned), and the text's loss of the same weights
    with the patch removed (loss_unpatched: what the patch does to this forward; None when unpatched)."""
    import posenc
    from posenc.analysis import load_model
    from posenc.hf import current_patch
    model, _, path = load_model(directory)
    patch = current_patch(model)
    _check_finetuned(directory, model, base_config, record, patch)
    records, mlp_out, down, loss = capture_model(model, ids)
    line = outlier_lineup(records, mlp_out, down, threshold)
    unpatched = None
    if patch is not None:
        posenc.unpatch(model)
        with torch.no_grad():
            unpatched = text_loss(model(input_ids=ids, use_cache=False).logits, ids)
    line.update(label=f"fine-tuned ({os.path.basename(os.path.normpath(directory))})", loss=loss, patch=patch,
                loss_unpatched=unpatched, path=path, finetune=record)
    return line


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: smollm2 (--quick: tiny-llama)")
    p.add_argument("--finetuned", metavar="DIR", nargs="+", action="extend", default=[],
                   help="also analyse these model directories (written by posenc finetune)")
    p.add_argument("--threshold", type=float, default=100.0, help="massive = |h| >= this x the median (100)")
    args = C.parse(p, argv)
    finetuned = []
    for d in args.finetuned:
        if not os.path.isfile(os.path.join(d, "config.json")):
            p.error(f"--finetuned: {d} has no config.json (give the directory posenc finetune wrote)")
        try:
            finetuned.append((d, finetune_record(d)))
        except ValueError as e:
            p.error(f"--finetuned: {e}")
    from posenc.analysis import load_model
    spec = args.model or ("tiny-llama" if args.quick else "smollm2")
    n_tokens = 48 if args.quick else 160
    bar = C.Progress(len(VARIANTS) + 1 + len(args.finetuned), "systematic_outliers")
    model, tok, name = load_model(spec)
    ids, text = C.real_model_inputs(tok, model.config.vocab_size, n_tokens)
    bar.step(note="loaded")
    results = run_variants(model, ids, args.threshold, bar)
    for d, record in finetuned:
        try:
            results.append(run_finetuned(d, record, model.config, ids, args.threshold))
        except ValueError as e:
            bar.close()
            p.error(f"--finetuned: {e}")
        bar.step(note=os.path.basename(os.path.normpath(d)))
    bar.close()
    print(f"{name}: {text['tokens_per_row']} tokens x 2 rows ({', '.join(text['rows'])}); massive: |h| >= "
          f"{args.threshold:g} x median")
    base = results[0]
    names = token_names(tok, ids)
    o = base["origin"]
    print(f"largest jump of max |h|: layer {o['layer']} (token {names[o['row']][o['token']]!r}, dim {o['dim']}): "
          f"{o['before']:.1f} -> {o['value']:.1f}; the layer's MLP wrote {o['mlp_output']:.1f}, its attention "
          f"{o['attention_output']:.1f}; down_proj's largest |weight| into dim {o['dim']} is "
          f"{o.get('down_proj_max_into_dim', float('nan')):.3f} (median {o.get('down_proj_median', float('nan')):.4f}, "
          f"{o.get('down_proj_rows_with_larger_max', -1)} output dims have a larger one)")
    print(f"massive from layer {o['layer']} on (>= {args.threshold:g}x the median in half of the layers): dims "
          f"{base['dims']}, tokens " + "; ".join(f"row {b}: {[names[b][t] for t in ts]}" for b, ts in enumerate(base['tokens'])))
    early = sorted({(b, t) for b, t, _ in base["early"]})
    print(f"before layer {o['layer']}: {len(base['early'])} entries over the threshold, dims "
          f"{sorted({d for _, _, d in base['early']})}, at tokens " + ", ".join(f"{b}:{names[b][t]!r}" for b, t in early[:12]))
    rows = []
    for e in base["per_layer"]:
        a = base["attention"][[x["layer"] for x in base["attention"]].index(e["layer"])]
        b, t, d, v = e["top"]
        rows.append([e["layer"], f"{e['ratio']:.0f}", f"({b},{t},{d})", f"{v:.1f}", a["attention_on_massive"],
                     a["attention_on_first"], a["heads_over_half_on_massive"], a["value_ratio_massive"],
                     "yes" if all(a["most_attended_is_massive"]) else "no"])
    print(C.table(["layer", "max/median", "(row,tok,dim)", "value", "attn on massive tok", "attn on tok 0",
                   "heads > 0.5", "|v| massive/median", "top key massive"], rows))
    print(f"(uniform causal attention would put {base['uniform_share_first_token']:.3f} on the first token)")
    print("\nunder posenc.patch (no fine-tune), and the fine-tuned models (held-out loss: posenc finetune's, "
          "before -> after):")
    rows = []
    for r in results:
        s = r.get("summary", {})
        top = max(r["per_layer"], key=lambda e: e["ratio"])
        ft = r.get("finetune")
        held = (f"{ft['eval_loss_before']:.3f} -> {ft['eval_loss']:.3f}" if ft and ft["eval_loss_before"] is not None
                and ft["eval_loss"] is not None else "-")
        rows.append([r["label"], r["loss"], held, f"{top['ratio']:.0f}", str(r["onset_layer"]), str(r["dims"][:4]),
                     s.get("attention_on_massive_after", float("nan")), s.get("value_ratio_massive_after", float("nan")),
                     s.get("most_attended_is_massive_after", float("nan"))])
    for r in results[len(VARIANTS):]:
        removed = f" ({r['loss_unpatched']:.3f} with the patch removed)" if r["loss_unpatched"] is not None else ""
        print(f"{r['label']}: reloaded with patch {r['patch']}; the text's loss {r['loss']:.3f}{removed}")
    print(C.table(["model", "loss", "held-out loss", "max/median", "onset layer", "dims", "attn on massive (after)",
                   "|v| massive/median", "top key massive (share of layers)"], rows))
    out = {"settings": {"model": spec, "threshold": args.threshold, "quick": args.quick, "tokens": n_tokens},
           "model": name, "text": text, "token_strings": names, "results": results}
    if args.json:
        C.write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)
    return 0


def plot(out: dict, path: str) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    for i, r in enumerate(out["results"]):
        layers = [e["layer"] for e in r["per_layer"]]
        style = dict(marker=".", color=f"C{i % 10}", label=r["label"], ls="--" if "finetune" in r else "-")
        ax[0].plot(layers, [e["ratio"] for e in r["per_layer"]], **style)
        ax[1].plot(layers, [a["attention_on_massive"] for a in r["attention"]], **style)
        ax[2].plot(layers, [a["value_ratio_massive"] for a in r["attention"]], **style)
    ax[0].axhline(out["settings"]["threshold"], color="gray", ls=":", lw=1)
    ax[0].set(yscale="log", xlabel="layer", ylabel="max |h| / median |h|", title="massive activations")
    ax[1].set(xlabel="layer", ylabel="attention on the massive tokens", title="attention sinks", ylim=(0, 1))
    ax[2].set(yscale="log", xlabel="layer", ylabel="|v| at massive tokens / median", title="value drains")
    for a in ax:
        a.legend(fontsize=7)
    C.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
