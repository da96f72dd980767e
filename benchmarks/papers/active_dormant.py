"""Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in
LLMs", on the Bigram-Backcopy (BB) task with posenc's layers.

BB task: a sequence starts with BOS; after a non-trigger token the next one is drawn from a bigram
transition matrix P, after one of the k trigger tokens (the k most frequent tokens under P's stationary
distribution) the next token copies the token before the trigger. Only the trigger positions need attention
(to the previous token); the paper finds that a small transformer trained on it makes its heads *dormant*
on non-trigger tokens by parking their attention on BOS (an attention sink), while BOS's value state shrinks
(value-state drain) and its residual-stream norm grows (residual-state peak); with ReLU instead of softmax
attention the sink does not form, with SGD instead of Adam the peak does not.

Model: posenc.TinyDecoder (RoPE, pre-RMSNorm, SwiGLU MLP, untied embeddings), one head per layer. The ReLU variant replaces each
layer's posenc.Attention with ReLUAttention below: the same projections and the same posenc encoding
(`self.encoding.apply`), only softmax(q k^T / sqrt(d)) becomes relu(q k^T / sqrt(d)) / (number of keys the
query sees), so that a head can output nothing without attending anywhere. Measured on a fixed evaluation
batch every few steps, per layer: the share of attention on BOS from non-trigger queries (dormant) and from
trigger queries (active), |v| at BOS over the median |v| of the other tokens, |h| (residual stream after the
block) at BOS over the median of the others; and the losses on non-trigger (bigram) and trigger (backcopy)
positions, next to the bigram loss floor.

    python benchmarks/papers/active_dormant.py [--quick] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import papers_common as C  # noqa: E402

import posenc  # noqa: E402
from posenc.analysis import metrics as M  # noqa: E402


# ------------------------------------------------------------------------------------------------- task
class BigramBackcopy:
    """Tokens 0..vocab-1 and BOS = vocab. P: a random bigram matrix (rows: softmax of Gaussian logits with
    scale `peak`, so each token has a few likely successors); triggers: the `triggers` most frequent tokens
    under P's stationary distribution."""

    def __init__(self, vocab: int = 64, triggers: int = 3, seed: int = 0, peak: float = 2.0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.bos, self.vocab_size = vocab, vocab, vocab + 1
        self.P = torch.softmax(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * peak, -1)
        pi = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        for _ in range(1000):
            pi = pi @ self.P
        self.stationary = pi
        self.triggers = pi.argsort(descending=True)[:triggers].sort().values
        self.is_trigger = torch.zeros(vocab + 1, dtype=torch.bool)
        self.is_trigger[self.triggers] = True
        first = pi.clone()
        first[self.triggers] = 0  # the first token is not a trigger (nothing before it to copy)
        self.first = first / first.sum()

    def batch(self, gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
        """[batch, length] token ids: BOS, a non-trigger token, then the BB rule."""
        if length < 3:
            raise ValueError(f"length must be >= 3, got {length}")
        x = torch.empty(batch, length, dtype=torch.int64)
        x[:, 0] = self.bos
        x[:, 1] = torch.multinomial(self.first.expand(batch, -1), 1, generator=gen)[:, 0]
        for t in range(1, length - 1):
            nxt = torch.multinomial(self.P[x[:, t]], 1, generator=gen)[:, 0]
            x[:, t + 1] = torch.where(self.is_trigger[x[:, t]], x[:, t - 1], nxt)
        return x

    def bigram_floor(self, x: torch.Tensor) -> float:
        """Mean -log P(next | current) over the non-trigger positions 1..n-2 of x: the best possible loss
        there."""
        cur, nxt = x[:, 1:-1], x[:, 2:]
        keep = ~self.is_trigger[cur]
        return float(-torch.log(self.P[cur[keep], nxt[keep]]).mean())


# -------------------------------------------------------------------------------------------- attention
def softmax_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T * scale): q, k [b, s, h, d] (rotated) -> [b, h, s, s]."""
    s = q.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def relu_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal relu(q k^T * scale) / (t + 1) for query t (it sees t + 1 keys): [b, h, s, s]."""
    s = q.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    seen = torch.arange(1, s + 1, device=q.device, dtype=scores.dtype)[:, None]
    return torch.relu(scores).masked_fill(~mask, 0.0) / seen


class ReLUAttention(posenc.Attention):
    """posenc.Attention (same projections, same encoding) with ReLU attention weights instead of softmax.
    No padding mask, no cache, no GQA: what this experiment needs, refused otherwise."""

    def forward(self, x, positions=None, attention_mask=None, cache=None):
        if attention_mask is not None or cache is not None or self.num_kv_heads != self.num_heads:
            raise ValueError("ReLUAttention takes no attention_mask or cache, and needs num_kv_heads == num_heads")
        b, s, _ = x.shape
        q, k, v = self.projections(x, positions)
        w = relu_weights(q, k, self.scale)
        return self.o_proj(torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, s, -1))

    def projections(self, x, positions=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = self.encoding.apply(q, k, positions)
        return q, k, v


def make_model(task: BigramBackcopy, attention: str, hidden: int, layers: int, seed: int):
    """TinyDecoder (RoPE, one head per layer) with softmax attention, or with every layer's attention
    swapped for ReLUAttention (weights copied, so both start from the same initialisation)."""
    # Untied input/output embeddings: with tied ones, BOS (never a target) has its output logit pushed down
    # at every position, which grows its input embedding too - a norm at BOS that is no residual peak.
    model = C.tiny_decoder(task.vocab_size, hidden, layers, 1, "rope", seed, tie_embeddings=False)
    if attention == "relu":
        for block in model.layers:
            old = block.attn
            new = ReLUAttention(old.hidden_size, old.num_heads, encoding=old.encoding)
            new.load_state_dict(old.state_dict())
            block.attn = new
    elif attention != "softmax":
        raise ValueError(f"attention must be 'softmax' or 'relu', got {attention!r}")
    return model


@torch.no_grad()
def internals(model, ids: torch.Tensor) -> list[dict]:
    """Per block: q, k (rotated), v [b, s, h, d], attention weights [b, h, s, s] recomputed from the block's
    own projections and encoding, the residual stream after the block [b, s, hidden], and how far the
    recomputed attention output is from what the block's attention returned (a check of the capture)."""
    seen = [{} for _ in model.layers]
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.attn.register_forward_hook(
            lambda m, inp, out, i=i: seen[i].update(x=inp[0].detach(), out=out.detach())))
        hooks.append(block.register_forward_hook(lambda m, inp, out, i=i: seen[i].update(h=out.detach())))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    result = []
    for block, rec in zip(model.layers, seen):
        attn = block.attn
        if isinstance(attn, ReLUAttention):
            q, k, v = attn.projections(rec["x"])
            w = relu_weights(q, k, attn.scale)
        else:
            b, s, _ = rec["x"].shape
            q = attn.q_proj(rec["x"]).view(b, s, attn.num_heads, attn.head_dim)
            k = attn.k_proj(rec["x"]).view(b, s, attn.num_kv_heads, attn.head_dim)
            v = attn.v_proj(rec["x"]).view(b, s, attn.num_kv_heads, attn.head_dim)
            q, k = attn.encoding.apply(q, k)
            w = softmax_weights(q, k, attn.scale)
        out = attn.o_proj(torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2))
        result.append({"q": q, "k": k, "v": v, "weights": w, "h": rec["h"],
                       "recompute_error": float((out - rec["out"]).abs().max())})
    return result


# ---------------------------------------------------------------------------------------------- metrics
def sink_share(weights: torch.Tensor, queries: torch.Tensor, sink: int = 0) -> tuple[float, float]:
    """(mean share of attention on key `sink` = w[sink] / sum(w), over the selected queries whose weights do
    not all vanish; fraction of the selected queries whose weights all vanish). weights [b, h, s, s];
    queries [b, s] bool (which query positions to average over; mean over heads too)."""
    total = weights.sum(-1)  # [b, h, s]
    sel = queries[:, None, :].expand_as(total)
    live = sel & (total > 0)
    if int(sel.sum()) == 0:
        return float("nan"), float("nan")
    share = (weights[..., sink] / total.clamp_min(torch.finfo(weights.dtype).tiny))[live]
    return (float(share.double().mean()) if share.numel() else float("nan"),
            float(1 - live.sum() / sel.sum()))


def norm_ratio(x: torch.Tensor, token: int = 0) -> float:
    """|x| at `token` over the median |x| of the other tokens, mean over heads: x [b, s, hidden] or
    [b, s, h, d] (posenc.analysis.metrics.value_drain)."""
    if x.dim() == 3:
        x = x[:, :, None, :]
    return float(M.value_drain(x, sink=token).mean())


def measure(model, task: BigramBackcopy, ids: torch.Tensor) -> dict:
    """Everything the plot shows, on the evaluation batch ids [b, s]."""
    model.eval()
    with torch.no_grad():
        logits = model(ids[:, :-1])
    model.train()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    trig = task.is_trigger[inputs]
    trig[:, 0] = False
    markov = ~trig
    markov[:, 0] = False  # position 0 (BOS) predicts the first token: neither kind
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    correct = logits.argmax(-1) == targets
    layers = []
    for rec in internals(model, inputs):
        dormant, dormant_zero = sink_share(rec["weights"], markov)
        active, active_zero = sink_share(rec["weights"], trig)
        w = rec["weights"]
        total = w.sum(-1).clamp_min(1e-30)
        t = torch.arange(1, w.shape[-1])
        prev = (w[:, :, t, t - 1] / total[:, :, t])  # [b, h, s-1]
        prev_active = float(prev[trig[:, None, 1:].expand_as(prev)].mean()) if bool(trig.any()) else float("nan")
        prev_dormant = float(prev[markov[:, None, 1:].expand_as(prev)].mean())
        layers.append({"sink_dormant": dormant, "sink_active": active, "zero_rows_dormant": dormant_zero,
                       "zero_rows_active": active_zero, "prev_active": prev_active, "prev_dormant": prev_dormant,
                       "value_ratio": norm_ratio(rec["v"]), "residual_ratio": norm_ratio(rec["h"]),
                       "residual_bos_norm": float(rec["h"][:, 0].norm(dim=-1).mean()),
                       "massive_ratio": M.massive_activations(rec["h"])["ratio"],
                       "recompute_error": rec["recompute_error"]})
    emb = model.embed.weight.detach().norm(dim=-1)
    return {"embed_ratio": float(emb[task.bos] / emb[:task.bos].median()),
            "loss_markov": float(nll[markov].mean()), "loss_backcopy": float(nll[trig].mean()),
            "acc_backcopy": float(correct[trig].double().mean()), "layers": layers}


# --------------------------------------------------------------------------------------------- training
RUNS = {"softmax + Adam": ("softmax", "adam"), "ReLU + Adam": ("relu", "adam"), "softmax + SGD": ("softmax", "sgd")}


def train(task, attention: str, optimizer: str, *, hidden: int, layers: int, steps: int, batch: int,
          length: int, eval_every: int, seed: int, adam_lr: float, sgd_lr: float, eval_ids: torch.Tensor,
          progress=None) -> dict:
    model = make_model(task, attention, hidden, layers, seed)
    if optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=adam_lr, weight_decay=1e-4, betas=(0.9, 0.99))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=sgd_lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(100 + seed)
    history = []
    model.train()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            history.append({"step": step, **measure(model, task, eval_ids)})
        if step == steps:
            break
        x = task.batch(gen, batch, length + 1)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress.step()
    return {"attention": attention, "optimizer": optimizer, "seed": seed, "history": history}


def settings(quick: bool) -> dict:
    if quick:
        return dict(vocab=16, triggers=3, hidden=32, layers=2, length=16, batch=16, steps=20, eval_every=10,
                    eval_batch=32, seeds=[0], adam_lr=1e-3, sgd_lr=0.03)
    return dict(vocab=64, triggers=3, hidden=64, layers=2, length=64, batch=16, steps=5000, eval_every=250,
                eval_batch=128, seeds=[0], adam_lr=1e-2, sgd_lr=0.03)


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1, help="seeds per run (default 1; each adds ~the same time)")
    args = C.parse(p, argv)
    if args.seeds <= 0:
        p.error(f"--seeds must be positive, got {args.seeds}")
    cfg = settings(args.quick)
    cfg["seeds"] = list(range(args.seeds))
    task = BigramBackcopy(cfg["vocab"], cfg["triggers"], seed=0)
    eval_ids = task.batch(torch.Generator().manual_seed(999), cfg["eval_batch"], cfg["length"] + 1)
    floor = task.bigram_floor(eval_ids)
    bar = C.Progress(len(RUNS) * len(cfg["seeds"]) * cfg["steps"], "active_dormant")
    t0 = time.time()
    runs = []
    for label, (attention, optimizer) in RUNS.items():
        for seed in cfg["seeds"]:
            r = train(task, attention, optimizer, hidden=cfg["hidden"], layers=cfg["layers"], steps=cfg["steps"],
                      batch=cfg["batch"], length=cfg["length"], eval_every=cfg["eval_every"], seed=seed,
                      adam_lr=cfg["adam_lr"], sgd_lr=cfg["sgd_lr"], eval_ids=eval_ids, progress=bar)
            runs.append({"label": label, **r})
    bar.close()
    print(f"Bigram-Backcopy: vocab {cfg['vocab']}, triggers {task.triggers.tolist()}, length {cfg['length']}; "
          f"TinyDecoder hidden {cfg['hidden']}, {cfg['layers']} layers x 1 head, RoPE; {cfg['steps']} steps of "
          f"batch {cfg['batch']}; AdamW lr {cfg['adam_lr']}, SGD lr {cfg['sgd_lr']} momentum 0.9; seeds "
          f"{cfg['seeds']}; bigram loss floor {floor:.3f}; {time.time() - t0:.0f} s")
    rows = []
    for r in runs:
        first, last = r["history"][0], r["history"][-1]
        for i, (a, b) in enumerate(zip(first["layers"], last["layers"])):
            rows.append([r["label"], r["seed"], i, f"{a['sink_dormant']:.2f} -> {b['sink_dormant']:.2f}",
                         f"{b['sink_active']:.2f}", f"{b['zero_rows_dormant']:.2f}",
                         f"{a['value_ratio']:.2f} -> {b['value_ratio']:.2f}",
                         f"{a['residual_ratio']:.2f} -> {b['residual_ratio']:.2f}", f"{last['embed_ratio']:.2f}",
                         f"{last['loss_markov']:.3f}", f"{last['acc_backcopy']:.2f}"])
    print(C.table(["run", "seed", "layer", "BOS share (dormant)", "BOS (active)", "zero rows", "|v| BOS/median",
                   "|h| BOS/median", "|emb| BOS/median", "bigram loss", "backcopy acc"], rows))
    out = {"settings": {**cfg, "quick": args.quick}, "triggers": task.triggers.tolist(), "bigram_floor": floor,
           "runs": runs, "seconds": time.time() - t0}
    if args.json:
        C.write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)
    return 0


def plot(out: dict, path: str) -> None:
    plt = C.pyplot()
    runs = out["runs"]
    n_layers = len(runs[0]["history"][0]["layers"])
    panels = [("sink_dormant", "attention on BOS (non-trigger queries)", False),
              ("value_ratio", "|v| at BOS / median |v|", True),
              ("residual_ratio", "|h| at BOS / median |h| (after block)", True),
              ("loss", "loss (bigram solid, backcopy dashed)", False)]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    colors = {label: f"C{i}" for i, label in enumerate(RUNS)}
    for r in runs:
        steps = [h["step"] for h in r["history"]]
        for a, (key, title, log) in zip(ax, panels):
            if key == "loss":
                a.plot(steps, [h["loss_markov"] for h in r["history"]], color=colors[r["label"]], label=r["label"])
                a.plot(steps, [h["loss_backcopy"] for h in r["history"]], color=colors[r["label"]], ls="--")
                continue
            for i in range(n_layers):
                a.plot(steps, [h["layers"][i][key] for h in r["history"]], color=colors[r["label"]],
                       alpha=0.4 + 0.6 * (i + 1) / n_layers, lw=0.8 + i * 0.6,
                       label=f"{r['label']}, layer {i}" if r["seed"] == runs[0]["seed"] else None)
            a.set(yscale="log" if log else "linear")
    ax[3].axhline(out["bigram_floor"], color="gray", ls=":", lw=1, label="bigram floor")
    for a, (_, title, _) in zip(ax, panels):
        a.set(xlabel="training step", title=title)
    ax[0].legend(fontsize=6)
    ax[3].legend(fontsize=7)
    C.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
