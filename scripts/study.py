"""The conversion study's two ends (scripts/study.sh runs them around `posenc finetune` and `posenc eval`).

    python scripts/study.py prepare --model smollm2 --work /tmp/study --seq-len 4096 --long 16384
        the base model as a transformers directory (WORK/base: GGUF dequantized once, tokenizer saved), and the
        corpus split by document into WORK/train and WORK/heldout: posenc.data's fixed held-out split
        (10%, seed 0), plus a seeded half of the remaining documents of at least --long tokens (the longest
        evaluation length needs whole documents that long; a 10% sample of the standard library holds 3).
        Nothing evaluated is ever trained on.
    python scripts/study.py report --work /tmp/study --out $OUT --runs original,rope,hope,...
        the before/after table (perplexity per length, passkey accuracy per length), training speed and model
        FLOPs utilisation, written as study.json (everything), study.md (the tables), study.png (the plots)
        and logs.jsonl (every run's per-step log, one "run" key added per line).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

from posenc.io import atomic_write, save_png, write_json


def _atomic_text(path: str, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------- prepare
def prepare(args) -> None:
    from posenc import data, training
    from posenc.analysis.loading import load_model

    model, tokenizer, name = load_model(args.model, args.gguf_file, seed=0)  # a GGUF loads saveable
    base = os.path.join(args.work, "base")
    model.save_pretrained(base)
    if tokenizer is not None:
        tokenizer.save_pretrained(base)
    corpus = data.load_corpus(args.text_file, max_documents=args.max_documents)
    train, held = data.split_documents(list(range(len(corpus.documents))), held_out=training.HELD_OUT,
                                       seed=training.SPLIT_SEED)
    lengths = {i: data.encode_text(corpus.documents[i], tokenizer, model.config.vocab_size).numel()
               for i in range(len(corpus.documents))}
    long_train = [i for i in train if lengths[i] >= args.long]
    rng = random.Random(args.seed)
    moved = sorted(rng.sample(long_train, len(long_train) // 2))
    held = sorted(set(held) | set(moved))
    train = [i for i in train if i not in set(moved)]
    for part, idx in (("train", train), ("heldout", held)):
        for i in idx:
            path = os.path.join(args.work, part, corpus.names[i])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not path.endswith(data.TEXT_SUFFIXES):
                path += ".txt"
            with open(path, "w", encoding="utf-8") as f:
                f.write(corpus.documents[i])
    record = {"model": name, "base": base, "corpus": corpus.describe(), "seq_len": args.seq_len, "long": args.long,
              "train_documents": len(train), "train_tokens": sum(lengths[i] for i in train),
              "heldout_documents": len(held), "heldout_tokens": sum(lengths[i] for i in held),
              "heldout_long_documents": sum(lengths[i] >= args.long for i in held),
              "moved_long_documents": [corpus.names[i] for i in moved],
              "rule": "held out: posenc.data.split_documents(held_out=0.1, seed=0), plus a seeded half "
                      f"(seed {args.seed}) of the other documents of >= {args.long} tokens"}
    write_json(record, os.path.join(args.work, "prepare.json"))
    print(f"prepare: {name} -> {base}; train {len(train)} documents ({record['train_tokens']:,} tokens), held out "
          f"{len(held)} ({record['heldout_tokens']:,} tokens, {record['heldout_long_documents']} of >= {args.long})",
          file=sys.stderr)


# ------------------------------------------------------------------------------------------- report
def _by_length(result: dict) -> tuple[dict, dict]:
    """({length: perplexity}, {length: passkey accuracy over depths}) of one encoding's eval result."""
    ppl = {r["length"]: r["perplexity"] for r in result["perplexity"] if "perplexity" in r}
    keys: dict = {}
    for r in result.get("passkey", []):
        if "accuracy" in r:
            keys.setdefault(r["length"], []).append((r["correct"], r["trials"]))
    acc = {L: sum(c for c, _ in v) / sum(t for _, t in v) for L, v in keys.items()}
    return ppl, acc


def _load_json(path: str):
    with open(path) as f:
        return json.load(f)


def collect(work: str, runs: list[str]) -> dict:
    before = _load_json(os.path.join(work, "eval-before.json"))
    before_by_spec = {r["encoding"]: r for r in before["results"]}
    rows = []
    for run in runs:
        spec = run.replace("_", ":")  # directory-safe names: prope_0.25 is prope:0.25
        ft_dir = os.path.join(work, f"ft-{run}")
        record = _load_json(os.path.join(ft_dir, "finetune.json"))
        after = _load_json(os.path.join(work, f"eval-after-{run}.json"))
        assert [r["encoding"] for r in after["results"]] == [spec], f"eval-after-{run}.json should hold {spec} only"
        with open(os.path.join(ft_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if line.strip()]
        ppl_b, acc_b = _by_length(before_by_spec[spec])
        ppl_a, acc_a = _by_length(after["results"][0])
        rows.append({"run": run, "encoding": spec, "perplexity_before": ppl_b, "perplexity_after": ppl_a,
                     "passkey_before": acc_b, "passkey_after": acc_a,
                     "heldout_loss_before": record["final"]["eval_loss_before"],
                     "heldout_loss_after": record["final"]["eval_loss"],
                     "train_loss_last10": record["final"]["train_loss_last10"],
                     "tokens_per_s": record["speed"]["tokens_per_s"],
                     "flops_per_token": record["speed"]["flops_per_token"],
                     "mfu": record["speed"]["mfu_h200"], "device": record["device"],
                     "rotary_backend": record.get("rotary_backend"),
                     "loaded_patch_after": after["model"].get("loaded_patch"), "log": log, "finetune": record})
    lengths = sorted({L for r in rows for L in (*r["perplexity_before"], *r["perplexity_after"])})
    key_lengths = sorted({L for r in rows for L in (*r["passkey_before"], *r["passkey_after"])})
    speed = {r["run"]: r["tokens_per_s"] for r in rows}
    return {"rows": rows, "lengths": lengths, "passkey_lengths": key_lengths,
            "rope_over_original_tokens_per_s": (speed["rope"] / speed["original"]
                                                if speed.get("rope") and speed.get("original") else None),
            "mfu_formula": "tokens/s x (6 N + 12 L H Q T) / 989e12 (H200 bf16 dense peak); N = matmul parameters "
                           "(all but the input embedding, the tied output projection counted once), L layers, "
                           "H query heads, Q head dim, T = row length; attention counted in full (not halved for "
                           "the causal or document masks)",
            "eval_settings": before["settings"], "eval_text": before["text"], "model": before["model"]}


def _fmt(x, digits=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def tables(study: dict) -> str:
    rows, lengths, klengths = study["rows"], study["lengths"], study["passkey_lengths"]
    out = ["Perplexity on held-out documents, before -> after fine-tuning (lower is better)", "",
           "| encoding | " + " | ".join(f"{L}" for L in lengths) + " | held-out loss (train split) |",
           "|---" * (len(lengths) + 2) + "|"]
    for r in rows:
        cells = [f"{_fmt(r['perplexity_before'].get(L))} -> {_fmt(r['perplexity_after'].get(L))}" for L in lengths]
        out.append(f"| {r['encoding']} | " + " | ".join(cells)
                   + f" | {_fmt(r['heldout_loss_before'], 3)} -> {_fmt(r['heldout_loss_after'], 3)} |")
    if klengths:
        out += ["", "Passkey retrieval accuracy (mean over depths), before -> after", "",
                "| encoding | " + " | ".join(f"{L}" for L in klengths) + " |", "|---" * (len(klengths) + 1) + "|"]
        for r in rows:
            cells = [f"{_fmt(r['passkey_before'].get(L))} -> {_fmt(r['passkey_after'].get(L))}" for L in klengths]
            out.append(f"| {r['encoding']} | " + " | ".join(cells) + " |")
    out += ["", "Fine-tuning speed (median tokens/s over the steps after the first tenth)", "",
            "| encoding | tokens/s | FLOPs/token | MFU (H200 bf16 peak) | last-10-step train loss |",
            "|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        out.append(f"| {r['encoding']} | {_fmt(r['tokens_per_s'], 0)} | {r['flops_per_token']:.3g} | {mfu} | "
                   f"{_fmt(r['train_loss_last10'], 3)} |")
    ratio = study["rope_over_original_tokens_per_s"]
    if ratio:
        backends = sorted({r["rotary_backend"] for r in rows if r["run"] != "original" and r["rotary_backend"]})
        out += ["", f"posenc rope (fused op) / transformers' own rope, tokens per second: {ratio:.3f} "
                    f"(posenc's op: {'; '.join(backends) or 'unknown'})"]
    out += ["", "MFU = " + study["mfu_formula"]]
    return "\n".join(out) + "\n"


def plot(study: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(study["rows"]):
        c = colors[i % len(colors)]
        for key, style, when in (("perplexity_before", "--", "before"), ("perplexity_after", "-", "after")):
            pts = sorted(r[key].items())
            if pts:
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, color=c, marker="o", ms=3,
                             label=f"{r['encoding']} ({when})")
        for key, style in (("passkey_before", "--"), ("passkey_after", "-")):
            pts = sorted(r[key].items())
            if pts:
                axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, color=c, marker="o", ms=3)
        steps = [(e["step"], e["loss"]) for e in r["log"] if "loss" in e]
        if steps:
            axes[2].plot([s for s, _ in steps], [v for _, v in steps], color=c, lw=1, label=r["encoding"])
    if not study["passkey_lengths"]:
        axes[1].text(0.5, 0.5, "no passkey prompt fits these lengths", ha="center", transform=axes[1].transAxes)
    trained = study["rows"][0]["finetune"]["args"]["seq_len"] if study["rows"] else None
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        if trained:
            ax.axvline(trained, color="grey", lw=0.8, ls=":")
    axes[0].set_yscale("log")
    axes[0].set(title="held-out perplexity (dashed: before, solid: after)", xlabel="context length (tokens)",
                ylabel="perplexity")
    axes[1].set(title="passkey accuracy (dashed: before, solid: after)", xlabel="context length (tokens)",
                ylabel="accuracy", ylim=(-0.05, 1.05))
    axes[2].set(title="fine-tuning loss", xlabel="step", ylabel="train loss")
    axes[0].legend(fontsize=6, ncol=2)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def report(args) -> None:
    study = collect(args.work, args.runs.split(","))
    os.makedirs(args.out, exist_ok=True)
    logs = "".join(json.dumps({"run": r["run"], **e}) + "\n" for r in study["rows"] for e in r["log"])
    _atomic_text(os.path.join(args.out, "logs.jsonl"), logs)
    prepared = os.path.join(args.work, "prepare.json")
    if os.path.isfile(prepared):
        study["prepare"] = _load_json(prepared)
    slim = dict(study, rows=[{k: v for k, v in r.items() if k != "log"} for r in study["rows"]])
    write_json(slim, os.path.join(args.out, "study.json"), default=str)
    text = tables(study)
    _atomic_text(os.path.join(args.out, "study.md"), text)
    if not args.no_plot:
        plot(study, os.path.join(args.out, "study.png"))
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--model", default="smollm2")
    a.add_argument("--gguf-file")
    a.add_argument("--text-file")
    a.add_argument("--max-documents", type=int)
    a.add_argument("--work", required=True)
    a.add_argument("--seq-len", type=int, default=4096)
    a.add_argument("--long", type=int, default=16384, help="documents this long are needed for the longest length")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=prepare)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--runs", required=True, help="comma-separated run names (ft-NAME, eval-after-NAME.json)")
    r.add_argument("--no-plot", action="store_true", help="tables and JSON only")
    r.set_defaults(func=report)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
