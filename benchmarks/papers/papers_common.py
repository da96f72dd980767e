"""What the paper scripts share: the command line (--quick, --json, --plot, --threads), atomic output files,
a progress bar on stderr, mean/spread over seeds, a tiny decoder with a sane initialisation, and the text
the real-model scripts read.

Each script is run as `python benchmarks/papers/<name>.py [--quick] [--json PATH] [--plot PATH.png]`; the
tests import them (this directory on sys.path) and call their functions on tiny inputs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from posenc import io as IO
from posenc import progress


# ------------------------------------------------------------------------------------------ command line
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (what CI runs); the "
                   "numbers it prints are not the result")
    p.add_argument("--json", metavar="PATH", help="write the results here (JSON)")
    p.add_argument("--plot", metavar="PATH.png", help="write the figure here (PNG, needs matplotlib)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: these models are tiny, and a "
                   "second thread mostly waits on the first, badly so on a shared machine)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then check the output paths before any long work (a user error: one line, exit code 2)."""
    args = p.parse_args(argv)
    for name, suffix in (("json", None), ("plot", ".png")):
        if getattr(args, name) is not None:
            try:
                IO.check_writable_file(getattr(args, name), f"--{name}", suffix)
            except ValueError as e:
                p.error(str(e))
    if args.threads <= 0:
        p.error(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)
    # Tiny models trained on a CPU reach softmax probabilities below float32's normal range; subnormal
    # arithmetic in the matmuls of the backward pass is then ~50x slower. Flushing them changes nothing
    # measurable (they are < 1e-38) and keeps the full modes inside their time budget.
    torch.set_flush_denormal(True)
    return args


# ------------------------------------------------------------------------------------------ output files
def write_json(path: str, obj) -> None:
    """obj as JSON at path, atomically (posenc.io)."""
    IO.write_json(obj, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (posenc.io), imported only when a plot is asked for."""
    try:
        return IO.pyplot()
    except ImportError as e:
        raise SystemExit(f"--plot: {e}") from None


def save_figure(fig, path: str) -> None:
    """fig as a PNG at path, atomically (posenc.io)."""
    plt = pyplot()
    try:
        fig.tight_layout()
        IO.save_png(fig, path, dpi=110)
    finally:
        plt.close(fig)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table; floats with 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
        return str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    width = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, width))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in width])] + [line(r) for r in cells])


def Progress(total: int, label: str) -> progress.Progress:
    """posenc's progress bar on stderr, in the argument order the scripts use: .step(note=...), .close()."""
    return progress.Progress(label, total)


# --------------------------------------------------------------------------------------------- statistics
def mean_std(values) -> dict:
    """{"mean", "std" (sample standard deviation, 0 for one value), "min", "max", "n"} of a list of numbers."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std needs at least one value")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(xs), "max": max(xs), "n": len(xs)}


def ranks(xs: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (for Spearman's correlation)."""
    xs = xs.to(torch.float64)
    order = xs.argsort()
    r = torch.empty_like(xs)
    r[order] = torch.arange(len(xs), dtype=torch.float64)
    for v in xs.unique():
        tie = xs == v
        if int(tie.sum()) > 1:
            r[tie] = r[tie].mean()
    return r


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(torch.float64) - x.double().mean(), y.to(torch.float64) - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


# ------------------------------------------------------------------------------------------------- models
def tiny_decoder(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, encoding: str,
                 seed: int, **encoding_kwargs):
    """posenc.TinyDecoder seeded, with its tied embedding drawn at std hidden**-0.5 (so initial logits are
    O(1)) instead of nn.Embedding's N(0, 1), whose logits start at std ~sqrt(hidden): a loss of ~10 nats
    and underflowing softmax probabilities at step 0."""
    import posenc
    torch.manual_seed(seed)
    model = posenc.TinyDecoder(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                               num_heads=num_heads, encoding=encoding, **encoding_kwargs)
    with torch.no_grad():
        model.embed.weight.normal_(0.0, hidden_size ** -0.5)
    return model


# ----------------------------------------------------------------------------------- text for real models
def real_model_inputs(tokenizer, vocab_size: int, n_tokens: int) -> tuple[torch.Tensor, dict]:
    """input_ids [2, n] (no padding): the first n tokens of posenc.analysis.DEFAULT_TEXT (English prose) and
    of the standard library's textwrap.py (code), and a description of what was read. n is cut to the
    shorter of the two."""
    import hashlib
    from posenc.analysis import DEFAULT_TEXT
    from posenc.data import encode_text, stdlib_files
    root, _ = stdlib_files()
    with open(os.path.join(root, "textwrap.py"), encoding="utf-8") as f:
        code = f.read()
    rows = [encode_text(DEFAULT_TEXT, tokenizer, vocab_size), encode_text(code, tokenizer, vocab_size)]
    n = min(n_tokens, *(len(r) for r in rows))
    ids = torch.stack([r[:n] for r in rows])
    described = {"rows": ["posenc.analysis.DEFAULT_TEXT", "stdlib textwrap.py"], "tokens_per_row": n,
                 "sha256_textwrap": hashlib.sha256(code.encode()).hexdigest()[:16]}
    return ids, described
