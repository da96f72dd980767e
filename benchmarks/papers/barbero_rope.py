"""Barbero et al. 2024, "Round and Round We Go! What makes Rotary Positional Encodings useful?", with posenc.

(a) Does RoPE make attention decay with distance? The activation a(r) = <R(r) q, k> (query r tokens after
    the key) for all-ones q = k decays (RoFormer's argument: a(r) = 2 * sum_i cos(r * theta_i)), but for
    Gaussian q, k ~ N(0, I) its mean is 0 at every r and its spread is sqrt(D) at every r: no decay.
    Computed with posenc.RoPE's own rotation (the fused op).
(b) On a real model (SmolLM2-135M; --quick: a random tiny Llama), which rotary frequencies carry the
    query/key norm (the paper: the lowest, used as semantic channels), and which heads use the highest
    frequencies (the paper: positional heads, e.g. previous-token heads). Per head: attention on the
    previous token, the share of |q|^2 and |k|^2 in the fastest pairs, their correlation over heads, and an
    ablation: the previous-token attention recomputed from the captured rotated q/k with the fastest (or, as
    a control, the slowest) pairs left out of the logits.

    python benchmarks/papers/barbero_rope.py [--quick] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import papers_common as C  # noqa: E402


# ------------------------------------------------------------------------------ (a) decay with distance
def rope_activation(q: torch.Tensor, k: torch.Tensor, distances: torch.Tensor, encoding) -> torch.Tensor:
    """a[n, j] = <R(distances[j]) q[n], k[n]>: the query rotated to position r, the key at position 0 (relative
    distance r), through encoding.apply (the fused op). q, k: [N, D]; distances: int [R]. Returns [N, R]."""
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be [N, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    n, d = q.shape
    r = distances.numel()
    qq = q[:, None, None, :].expand(n, r, 1, d).contiguous()
    positions = distances.to(torch.int64)[None].expand(n, r)
    q_rot, _ = encoding.apply(qq, qq, positions=positions)
    return (q_rot[:, :, 0, :] * k[:, None, :]).sum(-1)


def activation_curves(head_dim: int, base: float, distances: torch.Tensor, samples: int, seed: int,
                      chunk: int = 64) -> dict:
    """All-ones and Gaussian activations against distance: {"ones": [R], "gauss_mean": [R], "gauss_std": [R],
    "gauss_sem": [R]} (float64 lists; std over samples, sem = std / sqrt(samples))."""
    import posenc
    enc = posenc.RoPE(head_dim, base)
    ones = torch.ones(1, head_dim, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(distances.numel(), dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        q = torch.randn(m, head_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(m, head_dim, generator=gen, dtype=torch.float64)
        a = rope_activation(q, k, distances, enc)
        total += a.sum(0)
        total_sq += (a * a).sum(0)
    mean = total / samples
    std = ((total_sq - samples * mean ** 2) / (samples - 1)).clamp_min(0).sqrt()
    return {"ones": rope_activation(ones, ones, distances, enc)[0].tolist(), "gauss_mean": mean.tolist(),
            "gauss_std": std.tolist(), "gauss_sem": (std / math.sqrt(samples)).tolist()}


def band_means(values: list[float], distances: list[int], edges: list[int]) -> list[float]:
    """Mean |value| over each band [edges[i], edges[i+1]) of distances."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        xs = [abs(v) for v, r in zip(values, distances) if lo <= r < hi]
        out.append(sum(xs) / len(xs) if xs else float("nan"))
    return out


# ----------------------------------------------------------------------------------- (b) a real model
def previous_token_share(probs: torch.Tensor) -> torch.Tensor:
    """Attention on the previous token, mean over queries 1..n-1 and the batch: probs [b, h, q, k] -> [h]."""
    if probs.dim() != 4 or probs.shape[-2] < 2:
        raise ValueError(f"expected probs [batch, heads, queries >= 2, keys], got {tuple(probs.shape)}")
    n = probs.shape[-2]
    t = torch.arange(1, n)
    return probs[:, :, t, t - 1].to(torch.float64).mean((0, 2))


def attention_probs(q_rot: torch.Tensor, k_rot: torch.Tensor, scale: float, drop_pairs=()) -> torch.Tensor:
    """Causal softmax(q k^T * scale) from rotated q [b, s, h, d] and k [b, s, hk, d] (bshd, half-split pairs),
    leaving the pairs in drop_pairs out of the logits. Returns [b, h, s, s] float64."""
    q, k = q_rot.to(torch.float64), k_rot.to(torch.float64)
    d = q.shape[-1]
    keep = torch.ones(d, dtype=torch.float64)
    for i in drop_pairs:
        keep[i] = keep[i + d // 2] = 0.0
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q * keep, k) * scale
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def fastest_share(q_energy: torch.Tensor, k_energy: torch.Tensor, n_fast: int) -> torch.Tensor:
    """Per query head: the mean of its query's and its kv head's share of squared norm in the n_fast fastest
    pairs. q_energy [h, pairs], k_energy [hk, pairs] (posenc.analysis.metrics.frequency_energy)."""
    group = q_energy.shape[0] // k_energy.shape[0]
    kq = k_energy.repeat_interleave(group, 0)
    return 0.5 * (q_energy[:, :n_fast].sum(-1) + kq[:, :n_fast].sum(-1))


def model_statistics(records, n_fast: int, prev_threshold: float = 0.3) -> dict:
    """Per layer and head, from posenc.analysis.capture records: q/k energy per pair, previous-token
    attention, fastest-pair share, and previous-token attention with the fastest / slowest n_fast pairs left
    out of the logits."""
    from posenc.analysis import metrics as M
    layers = []
    for r in records:
        d = r.q.shape[-1]
        pairs = d // 2
        scale = d ** -0.5
        qe, ke = M.frequency_energy(r.q), M.frequency_energy(r.k)
        full = attention_probs(r.q_rot, r.k_rot, scale)
        fast = attention_probs(r.q_rot, r.k_rot, scale, drop_pairs=range(n_fast))
        slow = attention_probs(r.q_rot, r.k_rot, scale, drop_pairs=range(pairs - n_fast, pairs))
        layers.append({
            "layer": r.index, "q_energy": qe.tolist(), "k_energy": ke.tolist(),
            "prev": previous_token_share(r.probs).tolist(),
            "fast_share": fastest_share(qe, ke, n_fast).tolist(),
            "prev_without_fastest": previous_token_share(fast).tolist(),
            "prev_without_slowest": previous_token_share(slow).tolist(),
            "recompute_error": float((full - r.probs.to(torch.float64)).abs().max()),
        })
    pairs = len(layers[0]["q_energy"][0])
    q_energy = torch.tensor([e["q_energy"] for e in layers], dtype=torch.float64)  # [L, h, pairs]
    k_energy = torch.tensor([e["k_energy"] for e in layers], dtype=torch.float64)  # [L, hk, pairs]
    per_pair_q, per_pair_k = q_energy.mean((0, 1)), k_energy.mean((0, 1))
    quarter = max(1, pairs // 4)
    prev = torch.tensor([v for e in layers for v in e["prev"]], dtype=torch.float64)
    fshare = torch.tensor([v for e in layers for v in e["fast_share"]], dtype=torch.float64)
    no_fast = torch.tensor([v for e in layers for v in e["prev_without_fastest"]], dtype=torch.float64)
    no_slow = torch.tensor([v for e in layers for v in e["prev_without_slowest"]], dtype=torch.float64)
    heads = len(layers[0]["prev"])
    prev_heads = (prev > prev_threshold).nonzero().flatten().tolist()
    summary = {
        "pairs": pairs, "n_fast": n_fast, "prev_threshold": prev_threshold,
        "q_energy_per_pair": per_pair_q.tolist(), "k_energy_per_pair": per_pair_k.tolist(),
        "q_share_slowest_quarter": float(per_pair_q[-quarter:].sum()),
        "q_share_fastest_quarter": float(per_pair_q[:quarter].sum()),
        "k_share_slowest_quarter": float(per_pair_k[-quarter:].sum()),
        "k_share_fastest_quarter": float(per_pair_k[:quarter].sum()),
        "q_share_slowest_half": float(per_pair_q[pairs // 2:].sum()),
        "k_share_slowest_half": float(per_pair_k[pairs // 2:].sum()),
        "top_pairs_q": per_pair_q.argsort(descending=True)[:3].tolist(),
        "top_pairs_k": per_pair_k.argsort(descending=True)[:3].tolist(),
        "pearson_prev_fast": C.pearson(prev, fshare), "spearman_prev_fast": C.spearman(prev, fshare),
        "prev_heads": [(h // heads, h % heads) for h in prev_heads],
        "fast_share_prev_heads": float(fshare[prev_heads].mean()) if prev_heads else float("nan"),
        "fast_share_median_all": float(fshare.median()),
        "fast_share_uniform": n_fast / pairs,
        "prev_heads_prev": float(prev[prev_heads].mean()) if prev_heads else float("nan"),
        "prev_heads_without_fastest": float(no_fast[prev_heads].mean()) if prev_heads else float("nan"),
        "prev_heads_without_slowest": float(no_slow[prev_heads].mean()) if prev_heads else float("nan"),
        "max_recompute_error": max(e["recompute_error"] for e in layers),
    }
    return {"layers": layers, "summary": summary}


def real_model(spec: str, n_tokens: int) -> dict:
    from posenc.analysis import capture, load_model
    model, tok, name = load_model(spec)
    ids, text = C.real_model_inputs(tok, model.config.vocab_size, n_tokens)
    with torch.no_grad(), capture(model) as records:
        model(input_ids=ids, use_cache=False)
    pairs = records[0].q.shape[-1] // 2
    out = model_statistics(records, n_fast=max(1, pairs // 8))
    out["model"], out["text"] = name, text
    # where the peak sits against the training context: wavelength 2*pi / inv_freq of each pair
    from posenc.analysis import layer_frequencies
    fr = layer_frequencies(model.config, 0, 2 * pairs, model)
    out["wavelengths"] = (2 * math.pi / fr["inv_freq"]).tolist()
    out["context_length"] = fr["context_length"]
    return out


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model for part (b) (default: smollm2; --quick: tiny-llama)")
    args = C.parse(p, argv)
    head_dim, base = 128, 10_000.0
    max_r, samples, n_tokens = (256, 256, 48) if args.quick else (4096, 2000, 160)
    spec = args.model or ("tiny-llama" if args.quick else "smollm2")

    distances = torch.arange(max_r + 1)
    bar = C.Progress(2, "barbero_rope")
    curves = activation_curves(head_dim, base, distances, samples, seed=0)
    bar.step(note="(a) done, loading the model")
    part_b = real_model(spec, n_tokens)
    bar.step()
    bar.close()

    dist = distances.tolist()
    show = [r for r in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if r <= max_r]
    rows = [[r, curves["ones"][r], curves["gauss_mean"][r], curves["gauss_sem"][r], curves["gauss_std"][r],
             math.sqrt(head_dim)] for r in show]
    print(f"(a) RoPE activation <R(r)q, k>, D={head_dim}, base={base:g}; Gaussian: {samples} samples (seed 0)")
    print(C.table(["r", "ones", "gauss mean", "± sem", "gauss std", "sqrt(D)"], rows))
    edges = [e for e in (0, 16, 64, 256, 1024, 4097) if e <= max_r + 1]
    edges = edges if edges[-1] == max_r + 1 else edges + [max_r + 1]
    bands_ones = band_means(curves["ones"], dist, edges)
    bands_gauss = band_means(curves["gauss_mean"], dist, edges)
    print("mean |activation| by distance band: " + ", ".join(
        f"[{lo},{hi}): ones {a:.2f}, gauss mean {b:.2f}" for lo, hi, a, b in
        zip(edges[:-1], edges[1:], bands_ones, bands_gauss)))

    s = part_b["summary"]
    print(f"\n(b) {part_b['model']}: {part_b['text']['tokens_per_row']} tokens x 2 rows; {s['pairs']} pairs per "
          f"head, 'fastest' = pairs 0..{s['n_fast'] - 1}")
    print(f"share of |q|^2 in the slowest quarter of pairs {s['q_share_slowest_quarter']:.2f}, fastest quarter "
          f"{s['q_share_fastest_quarter']:.2f}; |k|^2: {s['k_share_slowest_quarter']:.2f} / "
          f"{s['k_share_fastest_quarter']:.2f}; top q pairs {s['top_pairs_q']}, top k pairs {s['top_pairs_k']}")
    top = s["top_pairs_q"][0]
    print(f"slowest half of the pairs: {s['q_share_slowest_half']:.2f} of |q|^2, {s['k_share_slowest_half']:.2f} of "
          f"|k|^2; the top pair {top} has wavelength {part_b['wavelengths'][top]:.0f} tokens (context "
          f"{part_b['context_length']}); pairs from "
          f"{sum(w <= (part_b['context_length'] or 0) for w in part_b['wavelengths'])} on complete no period in it")
    print(f"heads with previous-token attention > {s['prev_threshold']}: {len(s['prev_heads'])} "
          f"{s['prev_heads'][:12]}")
    rows = [["previous-token heads", s["fast_share_prev_heads"], s["prev_heads_prev"],
             s["prev_heads_without_fastest"], s["prev_heads_without_slowest"]],
            ["all heads (median share)", s["fast_share_median_all"], float("nan"), float("nan"), float("nan")],
            ["uniform share", s["fast_share_uniform"], float("nan"), float("nan"), float("nan")]]
    print(C.table(["heads", "fastest-pair share", "prev attn", "w/o fastest", "w/o slowest"], rows))
    print(f"correlation over heads of previous-token attention and fastest-pair share: Pearson "
          f"{s['pearson_prev_fast']:.2f}, Spearman {s['spearman_prev_fast']:.2f}; recomputed attention matches "
          f"the captured one to {s['max_recompute_error']:.1e}")

    result = {"settings": {"head_dim": head_dim, "base": base, "max_distance": max_r, "samples": samples,
                           "seed": 0, "model": spec, "quick": args.quick},
              "activation": {"distances": dist, **curves, "band_edges": edges, "band_ones": bands_ones,
                             "band_gauss_mean": bands_gauss},
              "model": part_b}
    if args.json:
        C.write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return 0


def plot(result: dict, path: str) -> None:
    plt = C.pyplot()
    a, m = result["activation"], result["model"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    r = a["distances"]
    ax[0].plot(r, a["ones"], lw=0.8, label="q = k = 1")
    mean = torch.tensor(a["gauss_mean"])
    std = torch.tensor(a["gauss_std"])
    ax[0].plot(r, mean, lw=0.8, color="C1", label="Gaussian q, k: mean")
    ax[0].fill_between(r, mean - std, mean + std, color="C1", alpha=0.2, label="± 1 std over samples")
    ax[0].set(xscale="symlog", xlabel="relative distance r", ylabel="<R(r) q, k>",
              title=f"RoPE activation, D={result['settings']['head_dim']}")
    ax[0].legend(fontsize=7)
    s = m["summary"]
    ax[1].plot(s["q_energy_per_pair"], marker=".", label="q")
    ax[1].plot(s["k_energy_per_pair"], marker=".", label="k")
    ax[1].set(xlabel="rotary pair (fast → slow)", ylabel="share of |x|², mean over layers and heads",
              title=f"{m['model'].split('/')[-1]}: norm by frequency")
    ax[1].legend(fontsize=7)
    prev = [v for e in m["layers"] for v in e["prev"]]
    fast = [v for e in m["layers"] for v in e["fast_share"]]
    layer = [e["layer"] for e in m["layers"] for _ in e["prev"]]
    sc = ax[2].scatter(fast, prev, c=layer, s=12, cmap="viridis")
    fig.colorbar(sc, ax=ax[2], label="layer")
    ax[2].set(xlabel=f"share of |q|², |k|² in the {s['n_fast']} fastest pairs", ylabel="attention on previous token",
              title=f"per head (Spearman {s['spearman_prev_fast']:.2f})")
    C.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
