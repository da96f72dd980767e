"""Length generalisation: RoPE, p-RoPE, HoPE and NoPE in one small decoder (posenc.TinyDecoder), trained from
scratch at length L and evaluated at L, 2L and 4L.

HoPE (Chen et al. 2024) and p-RoPE (Barbero et al. 2024) leave the slowest rotary pairs unrotated; HoPE's
argument is that pairs that never complete a period within the training length meet unseen angles beyond
it, so leaving them unrotated should extrapolate better than RoPE. Three tasks:

- copy: [BOS] x1..xn [SEP] x1..xn, loss and accuracy on the copied half (n up to (L-2)/2 in training, n at
  its maximum for each evaluation length);
- associative recall (multi-query): [BOS] k1 v1 .. kn vn [SEP] then each key again, the model must give its
  value (n up to (L-2)/4 pairs in training, the maximum at each evaluation length);
- language modelling of the Python standard library's sources (posenc.data.load_corpus), UTF-8 bytes,
  windows inside held-out files; loss over the whole window and over the positions beyond L.

Accuracy is teacher-forced next-token argmax on the target positions; every number is the mean and spread
over seeds (each seed: model initialisation and training data).

    python benchmarks/papers/length_generalization.py [--quick] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import papers_common as C  # noqa: E402

IGNORE = -100


# ------------------------------------------------------------------------------------------------ tasks
class Copy:
    """Token ids: content 0..vocab-1, then BOS, SEP, PAD."""

    name = "copy"

    def __init__(self, vocab: int = 64):
        self.vocab = vocab
        self.bos, self.sep, self.pad = vocab, vocab + 1, vocab + 2
        self.vocab_size = vocab + 3

    @staticmethod
    def max_items(length: int) -> int:
        return (length - 2) // 2

    def batch(self, gen: torch.Generator, batch: int, length: int, n: int | None = None):
        """(ids [batch, length], targets [batch, length] with IGNORE off the copied half): targets[p] is the
        token to predict after ids[..p]. n: items to copy (default: uniform in 1..max_items per row)."""
        n_max = self.max_items(length)
        if n_max < 1:
            raise ValueError(f"copy needs length >= 4, got {length}")
        ids = torch.full((batch, length), self.pad, dtype=torch.int64)
        targets = torch.full((batch, length), IGNORE, dtype=torch.int64)
        counts = (torch.randint(1, n_max + 1, (batch,), generator=gen) if n is None
                  else torch.full((batch,), n, dtype=torch.int64))
        content = torch.randint(0, self.vocab, (batch, n_max), generator=gen)
        for b in range(batch):
            m = int(counts[b])
            x = content[b, :m]
            ids[b, 0] = self.bos
            ids[b, 1:m + 1] = x
            ids[b, m + 1] = self.sep
            ids[b, m + 2:2 * m + 2] = x
            targets[b, m + 1:2 * m + 1] = x  # after SEP and after each copied token: the next one to copy
        return ids, targets


class Recall:
    """Multi-query associative recall. Token ids: keys 0..keys-1, values keys..keys+values-1, BOS, SEP, PAD."""

    name = "recall"

    def __init__(self, keys: int = 48, values: int = 48):
        self.keys, self.values = keys, values
        self.bos, self.sep, self.pad = keys + values, keys + values + 1, keys + values + 2
        self.vocab_size = keys + values + 3

    @staticmethod
    def max_items(length: int) -> int:
        return (length - 2) // 4

    def batch(self, gen: torch.Generator, batch: int, length: int, n: int | None = None):
        """(ids, targets) as Copy.batch; n key-value pairs with distinct keys, then every key once more in
        a random order, each followed by its value (the target at the key's position)."""
        n_max = self.max_items(length)
        if n_max < 1:
            raise ValueError(f"recall needs length >= 6, got {length}")
        if n_max > self.keys:
            raise ValueError(f"length {length} needs {n_max} distinct keys, only {self.keys} exist")
        ids = torch.full((batch, length), self.pad, dtype=torch.int64)
        targets = torch.full((batch, length), IGNORE, dtype=torch.int64)
        counts = (torch.randint(1, n_max + 1, (batch,), generator=gen) if n is None
                  else torch.full((batch,), n, dtype=torch.int64))
        for b in range(batch):
            m = int(counts[b])
            k = torch.randperm(self.keys, generator=gen)[:m]
            v = self.keys + torch.randint(0, self.values, (m,), generator=gen)
            order = torch.randperm(m, generator=gen)
            ids[b, 0] = self.bos
            ids[b, 1:2 * m + 1:2], ids[b, 2:2 * m + 2:2] = k, v
            ids[b, 2 * m + 1] = self.sep
            start = 2 * m + 2
            ids[b, start:start + 2 * m:2], ids[b, start + 1:start + 2 * m + 1:2] = k[order], v[order]
            targets[b, start:start + 2 * m:2] = v[order]
        return ids, targets


class Text:
    """Byte-level language modelling of the standard library's sources, split by whole files."""

    name = "lm"
    vocab_size = 256

    def __init__(self, max_documents: int, max_tokens: int):
        from posenc.data import encode_documents, load_corpus, split_documents
        corpus = load_corpus(max_documents=max_documents)
        docs = encode_documents(corpus, None, 256, max_tokens=max_tokens)
        self.train, self.held = split_documents(docs, held_out=0.15, seed=0)
        self.described = {**corpus.describe(), "documents_used": len(docs), "tokens": sum(len(d) for d in docs),
                          "train_tokens": sum(len(d) for d in self.train),
                          "held_out_tokens": sum(len(d) for d in self.held)}
        self._weights = torch.tensor([float(max(0, len(d) - 1)) for d in self.train])

    def batch(self, gen: torch.Generator, batch: int, length: int, n=None):
        """Random training windows of length+1 tokens inside one document: (ids, targets = ids shifted)."""
        rows = []
        while len(rows) < batch:
            i = int(torch.multinomial(self._weights, 1, generator=gen))
            d = self.train[i]
            if len(d) <= length:
                continue
            s = int(torch.randint(0, len(d) - length, (1,), generator=gen))
            rows.append(d[s:s + length + 1])
        w = torch.stack(rows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def eval_batch(self, length: int, count: int):
        from posenc.data import windows
        w = windows(self.held, length + 1, max_windows=count)
        if len(w) == 0:
            raise ValueError(f"no held-out document has {length + 1} tokens")
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


# ----------------------------------------------------------------------------------- training and metrics
def masked_loss_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Mean cross-entropy and argmax accuracy over the positions whose target is not IGNORE, and their
    count. logits [b, s, V], targets [b, s]."""
    keep = targets != IGNORE
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no target position")
    loss = F.cross_entropy(logits[keep].float(), targets[keep])
    acc = float((logits[keep].argmax(-1) == targets[keep]).double().mean())
    return loss, acc, n


def position_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position, mean over the batch (IGNORE positions left out): [s] (nan where none)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")
    keep = (targets != IGNORE).double()
    return (nll.double() * keep).sum(0) / keep.sum(0)


# row name -> (posenc encoding, keyword arguments); HoPE's context length is the training length
ENCODINGS = {"rope": ("rope", {}), "prope0.25": ("prope", {"p": 0.25}), "prope0.75": ("prope", {"p": 0.75}),
             "hope": ("hope", None), "nope": ("nope", {})}


def encoding_args(name: str, train_length: int) -> tuple[str, dict]:
    """(posenc encoding name, its keyword arguments) for a row name of ENCODINGS."""
    enc, kwargs = ENCODINGS[name]
    return enc, ({"context_length": train_length} if kwargs is None else dict(kwargs))


def train_model(task, encoding: str, seed: int, *, length: int, steps: int, batch: int, hidden: int,
                layers: int, heads: int, lr: float, base: float = 10_000.0):
    """A TinyDecoder trained with AdamW (linear warmup, cosine decay) on task batches of `length`."""
    name, kwargs = encoding_args(encoding, length)
    model = C.tiny_decoder(task.vocab_size, hidden, layers, heads, name, seed, base=base, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(steps):
        ids, targets = task.batch(gen, batch, length)
        loss, _, _ = masked_loss_accuracy(model(ids), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, task, length: int, count: int, seed: int = 12345) -> dict:
    """Loss and accuracy on the target positions of `count` task sequences of `length` tokens, each at the
    task's maximum n for that length."""
    ids, targets = task.batch(torch.Generator().manual_seed(seed + length), count, length,
                              n=task.max_items(length))
    logits = torch.cat([model(ids[i:i + 64]) for i in range(0, len(ids), 64)])
    loss, acc, n = masked_loss_accuracy(logits, targets)
    return {"loss": float(loss), "acc": acc, "targets": n}


@torch.no_grad()
def evaluate_text(model, task: "Text", train_length: int, multiples=(1, 2, 4), count: int = 64) -> dict:
    """Held-out windows of max(multiples) * train_length tokens, run once: a causal model's prediction at
    position p does not depend on what follows, so the loss at evaluation length m * L is the mean over
    positions < m * L of the same windows (comparable across lengths). Per length: loss, accuracy, and the
    loss over the positions [L, m * L) the model never trained at."""
    longest = max(multiples) * train_length
    ids, targets = task.eval_batch(longest, count)
    logits = torch.cat([model(ids[i:i + 32]) for i in range(0, len(ids), 32)])
    per_pos = position_losses(logits, targets)
    correct = (logits.argmax(-1) == targets).double().mean(0)
    out = {}
    for m in multiples:
        n = m * train_length
        out[str(n)] = {"loss": float(per_pos[:n].mean()), "acc": float(correct[:n].mean()),
                       "targets": int(len(ids) * n),
                       "loss_beyond_train": float(per_pos[train_length:n].mean()) if m > 1 else float("nan")}
    out[str(longest)]["loss_by_position"] = per_pos.tolist()
    return out


# --------------------------------------------------------------------------------------------------- main
def settings(quick: bool) -> dict:
    if quick:
        return dict(encodings=["rope", "prope0.25", "hope", "nope"], seeds=[0], hidden=32, layers=1, heads=2,
                    lr=3e-3, batch=8, eval_count=16,
                    tasks={"copy": dict(length=16, steps=8), "recall": dict(length=16, steps=8),
                           "lm": dict(length=32, steps=8)},
                    corpus=dict(max_documents=12, max_tokens=60_000))
    return dict(encodings=["rope", "prope0.25", "hope", "nope"], seeds=[0, 1, 2], hidden=64,
                layers=2, heads=2, lr=3e-3, batch=32, eval_count=256,
                tasks={"copy": dict(length=32, steps=500), "recall": dict(length=32, steps=500),
                       "lm": dict(length=64, steps=300)},
                corpus=dict(max_documents=120, max_tokens=1_500_000))


def run(cfg: dict, progress=None) -> dict:
    tasks = {"copy": Copy(), "recall": Recall()}
    tasks["lm"] = Text(**cfg["corpus"])
    runs = []
    for tname, tcfg in cfg["tasks"].items():
        task, L = tasks[tname], tcfg["length"]
        for enc in cfg["encodings"]:
            for seed in cfg["seeds"]:
                t0 = time.time()
                model = train_model(task, enc, seed, length=L, steps=tcfg["steps"], batch=cfg["batch"],
                                    hidden=cfg["hidden"], layers=cfg["layers"], heads=cfg["heads"], lr=cfg["lr"])
                if isinstance(task, Text):
                    evals = evaluate_text(model, task, L, count=cfg["eval_count"] // 4)
                else:
                    evals = {str(m * L): evaluate(model, task, m * L, cfg["eval_count"]) for m in (1, 2, 4)}
                runs.append({"task": tname, "encoding": enc, "seed": seed, "train_length": L,
                             "rotated_pairs": model.attentions[0].encoding.rotated_pairs,
                             "pairs": model.attentions[0].head_dim // 2, "seconds": time.time() - t0,
                             "eval": evals})
                if progress:
                    progress.step(note=f"{tname} {enc} seed {seed}")
    return {"runs": runs, "corpus": tasks["lm"].described}


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (task, encoding, evaluation length): mean and spread over seeds of loss and accuracy
    (and, for text, of the loss beyond the training length)."""
    rows, keys = [], []
    for r in runs:
        for length in r["eval"]:
            key = (r["task"], r["encoding"], int(length))
            if key not in keys:
                keys.append(key)
    for task, enc, length in keys:
        evs = [r["eval"][str(length)] for r in runs if r["task"] == task and r["encoding"] == enc]
        row = {"task": task, "encoding": enc, "length": length, "loss": C.mean_std([e["loss"] for e in evs]),
               "acc": C.mean_std([e["acc"] for e in evs])}
        if "loss_beyond_train" in evs[0]:
            row["loss_beyond_train"] = C.mean_std([e["loss_beyond_train"] for e in evs])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    args = C.parse(p, argv)
    cfg = settings(args.quick)
    total = len(cfg["tasks"]) * len(cfg["encodings"]) * len(cfg["seeds"])
    bar = C.Progress(total, "length_generalization")
    t0 = time.time()
    result = run(cfg, bar)
    bar.close()
    rows = aggregate(result["runs"])
    print(f"TinyDecoder hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads (head_dim "
          f"{cfg['hidden'] // cfg['heads']}), base 1e4, AdamW lr {cfg['lr']}, batch {cfg['batch']}; seeds "
          f"{cfg['seeds']}; mean ± std over seeds; {time.time() - t0:.0f} s")
    for task, tcfg in cfg["tasks"].items():
        L = tcfg["length"]
        pairs = {r["encoding"]: f"{r['rotated_pairs']}/{r['pairs']}" for r in result["runs"] if r["task"] == task}
        print(f"\n{task}: trained at L={L} for {tcfg['steps']} steps; rotating pairs: "
              + ", ".join(f"{k} {v}" for k, v in pairs.items()))
        lengths = sorted({row["length"] for row in rows if row["task"] == task})
        metric = "loss" if task == "lm" else "acc"
        headers = ["encoding"] + [f"{metric} @{n}" for n in lengths]
        if task == "lm":
            headers += [f"loss on [{L},{n}) @{n}" for n in lengths if n > L]
        table = []
        for enc in cfg["encodings"]:
            by = {row["length"]: row for row in rows if row["task"] == task and row["encoding"] == enc}
            line = [enc] + [f"{by[n][metric]['mean']:.3f} ± {by[n][metric]['std']:.3f}" for n in lengths]
            if task == "lm":
                line += [f"{by[n]['loss_beyond_train']['mean']:.3f} ± {by[n]['loss_beyond_train']['std']:.3f}"
                         for n in lengths if n > L]
            table.append(line)
        if task == "recall":  # what picking one of the n values in the context at random would score
            table.append(["1/n (a context value at random)"] + [f"{1 / Recall.max_items(n):.3f}" for n in lengths])
        print(C.table(headers, table))
    out = {"settings": {**cfg, "quick": args.quick}, "corpus": result["corpus"], "rows": rows,
           "runs": result["runs"], "seconds": time.time() - t0}
    if args.json:
        C.write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)
    return 0


def plot(out: dict, path: str) -> None:
    plt = C.pyplot()
    rows, cfg = out["rows"], out["settings"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for a, task in zip(ax, ("copy", "recall", "lm")):
        metric = "loss" if task == "lm" else "acc"
        for enc in cfg["encodings"]:
            rs = sorted((r for r in rows if r["task"] == task and r["encoding"] == enc), key=lambda r: r["length"])
            if not rs:
                continue
            x = [r["length"] for r in rs]
            a.errorbar(x, [r[metric]["mean"] for r in rs], yerr=[r[metric]["std"] for r in rs], marker="o",
                       capsize=3, label=enc)
        L = cfg["tasks"][task]["length"]
        if task == "recall":
            xs = [L, 2 * L, 4 * L]
            a.plot(xs, [1 / Recall.max_items(x) for x in xs], color="gray", ls="--", lw=1, label="1/n (guess)")
        a.axvline(L, color="gray", ls=":", lw=1)
        a.set(xscale="log", xlabel="evaluation length (tokens)", ylabel=metric,
              title=f"{task} (trained at {L}; mean ± std over {len(cfg['seeds'])} seeds)")
        a.set_xticks([L, 2 * L, 4 * L], [str(x) for x in (L, 2 * L, 4 * L)])
        a.minorticks_off()
        a.legend(fontsize=7)
    C.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
