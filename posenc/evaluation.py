"""Long-context evaluation of one model under several positional encodings, side by side, from one load.

For each encoding spec (`original`, `rope`, `hope[:L]`, `prope[:p]`, `nope`, each optionally `@layers`; see
posenc.specs) the model is patched, measured, and put back as it was loaded. `original` is always the model as
loaded: a checkpoint saved patched (e.g. by `posenc finetune --encoding nope`) is measured with its patch.

- perplexity per context length L: non-overlapping windows of L tokens, each inside one document
  (posenc.data.windows), perplexity = exp(mean next-token NLL over the L-1 predicted tokens of every window),
  plus the loss by position inside the window (equal-width buckets; token-weighted they average back to the
  whole);
- passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a random 5-digit key is stated once in
  filler text at depth d of a prompt of at most L tokens (answer included), then asked for; greedy decoding;
  accuracy per (L, d) over seeded trials. Every encoding sees the same prompts and the same windows.

    model, tok, name = load_eval_model("smollm2", device="cuda", dtype=torch.bfloat16)
    result = evaluate(model, tok, parse_specs("original,hope,nope"), [512, 1024, 2048], passkey=True)
    print(format_table(result))

`run_eval` is the `posenc eval` command without argparse: it checks every input before the long work, and
writes the JSON and PNGs only at the end, each through a temporary file.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import data as D
from . import io as IO
from .hf import current_patch
from .specs import EncodingSpec, parse_specs

__all__ = ["EvalError", "load_eval_model", "trained_context", "learned_position_limit", "token_losses",
           "perplexity", "position_buckets", "TextEncoder", "passkey_prompt", "passkey_answer_correct",
           "greedy_generate", "passkey", "current_patch", "applied", "check_specs", "prepare_windows", "evaluate",
           "format_table", "plot_result", "run_eval", "DEFAULT_LENGTHS", "DEFAULT_DEPTHS"]

DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Tokens per forward pass when the batch size is not given (windows of length L go L-at-a-time up to this).
_TOKENS_PER_BATCH = {"cuda": 65_536, "cpu": 8_192}
_CE_TOKENS = 32_768  # tokens per cross-entropy call: bounds the float32 copy of the logits

Progress = Callable[[int, int, str], None]


class EvalError(ValueError):
    """A user error (bad model, encoding, length, text or output path): the CLI prints it as one line."""


# ------------------------------------------------------------------------------------------------ the model
def load_eval_model(spec: str, gguf_file: str | None = None, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, tokenizer or None, description) for evaluation: what `posenc analyze` loads (a transformers
    directory, a .gguf, a JSON config or preset for random weights, "smollm2"), loaded with SDPA attention,
    or a PEFT adapter directory (adapter_config.json; the base is the same directory when it also holds a
    config.json, else the adapter's base_model_name_or_path), merged into its base for speed. Eval mode, on
    `device` in `dtype`. Raises posenc.analysis.ModelLoadError (a ValueError) when nothing loads."""
    from .analysis.loading import ModelLoadError, load_model
    import posenc  # noqa: F401  (registers the "posenc" rope type before a patched checkpoint loads)
    adapter = isinstance(spec, str) and os.path.isfile(os.path.join(spec, "adapter_config.json"))
    if not adapter:
        model, tok, name = load_model(spec, gguf_file, seed=seed, attn_implementation="sdpa")
    else:
        try:
            with open(os.path.join(spec, "adapter_config.json")) as f:
                base = json.load(f).get("base_model_name_or_path") or ""
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ModelLoadError(f"cannot read {spec}/adapter_config.json: {e}") from None
        if os.path.isfile(os.path.join(spec, "config.json")):
            base = spec
        elif base and not os.path.isabs(base) and os.path.isdir(os.path.join(spec, base)):
            base = os.path.join(spec, base)
        if not base or not os.path.isdir(base):
            raise ModelLoadError(f"{spec} holds a PEFT adapter whose base model {base!r} is not a local directory "
                                 "(save the base with save_pretrained next to it, or fix base_model_name_or_path)")
        model, tok, base_name = load_model(base, gguf_file, seed=seed, attn_implementation="sdpa")
        try:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, spec).merge_and_unload()
        except (ValueError, KeyError, OSError, ImportError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load the PEFT adapter in {spec}: {e}") from None
        if tok is None:
            try:
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(spec)
            except (ValueError, KeyError, OSError, ImportError, TypeError):
                tok = None
        name = f"{spec} (LoRA adapter merged into {base_name})"
    return model.to(device=device, dtype=dtype).eval(), tok, name


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def trained_context(config) -> int | None:
    """The context length the model was pretrained on: original_max_position_embeddings where the rope is
    scaled, else max_position_embeddings (n_positions for GPT-2-like configs); None if the config has none."""
    rp = getattr(config, "rope_parameters", None) or {}
    groups = [rp] if "rope_type" in rp or "rope_theta" in rp else [v for v in rp.values() if isinstance(v, dict)]
    for params in groups:
        if params.get("original_max_position_embeddings"):
            return int(params["original_max_position_embeddings"])
    for name in ("original_max_position_embeddings", "max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def learned_position_limit(model) -> int | None:
    """Positions a model with a learned absolute position table (GPT-2's wpe, OPT's embed_positions) can
    take; None for models without one (RoPE models take any length)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and leaf in ("wpe", "embed_positions", "position_embeddings"):
            config = _text_config(model)
            return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
                       or module.num_embeddings)
    return None


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------ perplexity
def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, L-1] float32: the NLL of each next token of each row of ids [b, L] (predicting ids[:, 1:])."""
    logits = model(input_ids=ids.to(_device(model)), use_cache=False).logits
    targets = ids[:, 1:].to(logits.device)
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    step = max(1, _CE_TOKENS // targets.shape[0])
    for start in range(0, targets.shape[1], step):
        stop = min(start + step, targets.shape[1])
        chunk = logits[:, start:stop].float()
        out[:, start:stop] = F.cross_entropy(chunk.flatten(0, 1), targets[:, start:stop].flatten(),
                                             reduction="none").view(chunk.shape[:2])
    return out


def position_buckets(length: int, buckets: int) -> list[tuple[int, int]]:
    """[start, end) ranges of predicted-token positions 1..length-1 in `buckets` near-equal parts."""
    n = max(1, min(buckets, length - 1))
    edges = [1 + round(i * (length - 1) / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def perplexity(model, windows: torch.Tensor, *, batch_size: int | None = None, buckets: int = 8,
               progress: Callable[[], None] | None = None) -> dict:
    """Perplexity of the model on windows [n, L] (n >= 1): {"windows", "tokens" (predicted), "loss" (mean
    NLL), "perplexity" (exp of it), "loss_sem" (standard error of the mean over windows), "window_losses",
    "buckets": [{"start", "end", "tokens", "loss"}]}; sums in float64."""
    n, length = windows.shape
    if n == 0 or length < 2:
        raise ValueError(f"perplexity needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    batch_size = batch_size or max(1, _TOKENS_PER_BATCH.get(_device(model).type, 8192) // length)
    per_position = torch.zeros(length - 1, dtype=torch.float64)
    per_window = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            losses = token_losses(model, windows[start:start + batch_size]).double().cpu()
            per_position += losses.sum(0)
            per_window += losses.mean(1).tolist()
            if progress is not None:
                progress()
    tokens = n * (length - 1)
    loss = float(per_position.sum()) / tokens
    sem = (float(torch.tensor(per_window, dtype=torch.float64).std()) / math.sqrt(n)) if n > 1 else None
    rows = [{"start": a, "end": b, "tokens": n * (b - a), "loss": float(per_position[a - 1:b - 1].sum()) / (n * (b - a))}
            for a, b in position_buckets(length, buckets)]
    return {"windows": n, "tokens": tokens, "loss": loss, "perplexity": _exp(loss), "loss_sem": sem,
            "window_losses": per_window, "buckets": rows}


# ------------------------------------------------------------------------------------------------ passkey
# The prompt's text (written for this project). The key is stated once, at depth d of the filler.
PASSKEY_INTRO = ("A pass key of five digits is hidden in the text below. Remember it; you will be asked for it "
                 "at the end.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_FILLER = (
    "The river ran slowly past the old mill, as it did every summer.",
    "A cart full of apples rolled along the road towards the market.",
    "In the square the clock struck the hour and the pigeons rose together.",
    "Someone had left a blue bicycle leaning against the bakery wall.",
    "Clouds gathered over the hills, but no rain fell that afternoon.",
    "The teacher wrote the date on the board and opened a window.",
    "Two dogs chased each other around the fountain until they were tired.",
    "At the harbour the ferry sounded its horn and left on time.",
)


@dataclass
class TextEncoder:
    """Text <-> token ids for prompts: a transformers tokenizer, or (None) UTF-8 bytes folded into the
    vocabulary, as posenc.data does for random models."""
    tokenizer: object
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return D.encode_text(text, self.tokenizer, self.vocab_size).tolist()

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace")
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prefix(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (a BOS token, for Llama's), else []."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        if tok is None or bos is None:
            return []
        try:
            first = tok("a", add_special_tokens=True)["input_ids"][:1]
        except (TypeError, ValueError):
            return []
        return [bos] if first == [bos] else []


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit key of one trial: fixed by (seed, length, depth, trial), the same for every encoding."""
    return random.Random(f"passkey:{seed}:{length}:{depth!r}:{trial}").randint(10_000, 99_999)


def passkey_answer_tokens(enc: TextEncoder) -> int:
    """Tokens generated for an answer: the key with a leading space, and one more."""
    return max(len(enc.encode(f" {k}")) for k in (10_000, 99_999, 54_321)) + 1


def passkey_prompt(enc: TextEncoder, length: int, depth: float, key: int) -> list[int] | None:
    """Token ids of a passkey prompt with at most length - passkey_answer_tokens(enc) tokens (the answer
    fits inside L): intro, whole filler sentences with the needle after a fraction `depth` of them, the
    question. None if even the prompt without filler does not fit."""
    budget = length - passkey_answer_tokens(enc)
    head = enc.prefix() + enc.encode(PASSKEY_INTRO)
    needle = enc.encode(" " + PASSKEY_NEEDLE.format(key=key))
    question = enc.encode(" " + PASSKEY_QUESTION)
    room = budget - len(head) - len(needle) - len(question)
    if room < 0:
        return None
    sentences = [enc.encode(" " + s) for s in PASSKEY_FILLER]
    filler, i = [], 0
    while room >= len(sentences[i % len(sentences)]):
        filler.append(sentences[i % len(sentences)])
        room -= len(filler[-1])
        i += 1
    cut = round(depth * len(filler))
    before = [t for s in filler[:cut] for t in s]
    after = [t for s in filler[cut:] for t in s]
    return head + before + needle + after + question


def passkey_answer_correct(answer: str, key: int) -> bool:
    """Whether the first number in the generated answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == str(key)


def _forward_last(model, ids, cache=None):
    """(last logits [b, V], cache) of one forward with the KV cache. transformers >= 5.2x names the cache
    `cache` (`past_key_values` before, still accepted with a warning)."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    kwargs = {"input_ids": ids, name: cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    cache = getattr(out, "cache", None) if name == "cache" else getattr(out, "past_key_values", None)
    return out.logits[:, -1], cache


def greedy_generate(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """[b, max_new_tokens] greedy continuation of ids [b, n] (rows of equal length, no padding), with the
    model's KV cache."""
    with torch.inference_mode():
        logits, cache = _forward_last(model, ids.to(_device(model)))
        nxt = logits.argmax(-1)
        tokens = [nxt]
        for _ in range(max_new_tokens - 1):
            logits, cache = _forward_last(model, nxt[:, None], cache)
            nxt = logits.argmax(-1)
            tokens.append(nxt)
    return torch.stack(tokens, 1).cpu()


def passkey_plan(enc: TextEncoder, lengths, depths, trials: int, seed: int) -> dict:
    """{length: [(depth, trial, key, prompt ids)] or None where no prompt fits}: the prompts every encoding
    gets."""
    plan = {}
    for length in lengths:
        cases = []
        for depth in depths:
            for trial in range(trials):
                key = passkey_key(seed, length, depth, trial)
                prompt = passkey_prompt(enc, length, depth, key)
                if prompt is None:
                    cases = None
                    break
                cases.append((depth, trial, key, prompt))
            if cases is None:
                break
        plan[length] = cases
    return plan


def _passkey_batches(cases, batch_size):
    """Cases grouped by prompt length (no padding needed), in batches of at most batch_size."""
    by_len: dict[int, list] = {}
    for case in cases:
        by_len.setdefault(len(case[3]), []).append(case)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def passkey(model, enc: TextEncoder, plan: dict, *, batch_size: int | None = None,
            progress: Callable[[], None] | None = None) -> list[dict]:
    """Accuracy per (length, depth) on the prompts of passkey_plan: [{"length", "depth", "trials",
    "correct", "accuracy", "prompt_tokens" (mean), "answers" (the first few decoded answers)}]; lengths
    without a prompt that fits give {"length", "skipped": reason}."""
    rows = []
    answer_tokens = passkey_answer_tokens(enc)
    for length, cases in plan.items():
        if cases is None:
            rows.append({"length": length, "skipped": f"the passkey prompt does not fit in {length} tokens"})
            continue
        bs = batch_size or max(1, _TOKENS_PER_BATCH.get(_device(model).type, 8192) // length)
        results = {}
        for batch in _passkey_batches(cases, bs):
            generated = greedy_generate(model, torch.tensor([c[3] for c in batch]), answer_tokens)
            for case, ids in zip(batch, generated.tolist()):
                text = enc.decode(ids)
                results[case[:2]] = (passkey_answer_correct(text, case[2]), text, len(case[3]))
            if progress is not None:
                progress()
        for depth in dict.fromkeys(c[0] for c in cases):
            mine = [results[c[:2]] for c in cases if c[0] == depth]
            correct = sum(r[0] for r in mine)
            rows.append({"length": length, "depth": depth, "trials": len(mine), "correct": correct,
                         "accuracy": correct / len(mine), "prompt_tokens": sum(r[2] for r in mine) / len(mine),
                         "answers": [r[1] for r in mine[:3]]})
    return rows


def _passkey_batch_count(plan, batch_size, device_type):
    total = 0
    for length, cases in plan.items():
        if cases:
            bs = batch_size or max(1, _TOKENS_PER_BATCH.get(device_type, 8192) // length)
            total += sum(1 for _ in _passkey_batches(cases, bs))
    return total


# ------------------------------------------------------------------------------------------------ encodings
@contextlib.contextmanager
def applied(model, spec: EncodingSpec, loaded: dict | None = None):
    """The model under one spec for the duration of the block, given the model as loaded (`loaded`: its
    current_patch(), read before any spec; None = unpatched): "original" leaves it as it is, any other spec
    patches it (spec.patch_kwargs(); patching replaces the loaded patch). Afterwards, whatever happens inside,
    the model is as loaded again (patched with `loaded`, or unpatched)."""
    import posenc
    if spec.name == "original":  # the model as loaded (it may not be patchable at all)
        yield model
        return
    posenc.patch(model, **spec.patch_kwargs())  # checks everything before it changes the model
    try:
        yield model
    finally:
        if loaded is None:
            posenc.unpatch(model)
        else:
            posenc.patch(model, **loaded)


def check_specs(model, specs: list[EncodingSpec], loaded: dict | None = None) -> None:
    """Apply each spec once and put the model back as loaded (cheap), so that an encoding the model cannot
    take fails before any long work, with patch's message naming the spec. `loaded`: current_patch(model),
    read before any check."""
    for spec in specs:
        try:
            with applied(model, spec, loaded):
                pass
        except (ValueError, TypeError) as e:
            raise EvalError(f"encoding {str(spec)!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ text
def prepare_windows(corpus: D.Corpus, tokenizer, vocab_size: int, lengths, max_windows: int,
                    seed: int = 0) -> tuple[dict, dict]:
    """({length: windows [n, L]}, a record of what was read). Documents are taken in a seeded shuffle of the
    corpus and tokenized one at a time until every length has max_windows documents reaching it (so that
    capped windows come from different documents) or the corpus is used up; a document is not tokenized
    when its UTF-8 byte count (a bound on its token count, plus slack for a tokenizer's prefix) is below
    every length still short of documents."""
    order = list(range(len(corpus.documents)))
    random.Random(seed).shuffle(order)
    reaching = {L: 0 for L in lengths}
    docs, tokens = [], 0
    for i in order:
        short = [L for L in lengths if reaching[L] < max_windows]
        if not short:
            break
        text = corpus.documents[i]
        if len(text) * 4 + 8 < min(short) or len(text.encode("utf-8")) + 8 < min(short):
            continue
        ids = D.encode_text(text, tokenizer, vocab_size)
        docs.append(ids)
        tokens += ids.numel()
        for L in lengths:
            reaching[L] += ids.numel() >= L
    record = dict(corpus.describe(), documents_tokenized=len(docs), tokens_read=tokens,
                  longest_document_tokens=max((d.numel() for d in docs), default=0),
                  document_order=f"seeded shuffle (seed {seed})")
    return {L: D.windows(docs, L, max_windows) for L in lengths}, record


# ------------------------------------------------------------------------------------------------ the run
def evaluate(model, tokenizer, specs: list[EncodingSpec], lengths, *, windows: dict | None = None,
             text: dict | None = None, corpus: D.Corpus | None = None, max_windows: int = 8, batch_size: int | None = None,
             buckets: int = 8, passkey_depths=None, passkey_trials: int = 0, seed: int = 0,
             progress: Progress | None = None) -> dict:
    """Every spec on the same windows and passkey prompts; between specs, and afterwards, the model is as it
    was found (unpatched, or patched as loaded), and "original" measures it so.

    windows: {length: [n, L] token windows} (text: the record of what they were read from); default: from
      `corpus` (default the standard library) via prepare_windows. Lengths with no window are skipped.
    passkey_trials: prompts per (length, depth), 0 = no passkey; passkey_depths default DEFAULT_DEPTHS.
    Returns {"model", "settings", "text", "results": [{"encoding", "perplexity": [...], "passkey": [...],
    "seconds"}]} (see perplexity() and passkey() for the rows)."""
    lengths = sorted(set(lengths))
    if not lengths or any(not isinstance(L, int) or L < 2 for L in lengths):
        raise ValueError(f"lengths must be integers >= 2, got {lengths!r}")
    specs = list(specs)
    if not specs:
        raise ValueError("give at least one encoding spec")
    config = _text_config(model)
    vocab = int(config.vocab_size)
    if windows is None:
        windows, text = prepare_windows(corpus or D.load_corpus(), tokenizer, vocab, lengths, max_windows, seed)
    else:
        text = dict(text or {"source": "windows given by the caller"})
    text["windows"] = {str(L): int(windows[L].shape[0]) if L in windows else 0 for L in lengths}
    enc = TextEncoder(tokenizer, vocab)
    depths = tuple(DEFAULT_DEPTHS if passkey_depths is None else passkey_depths)
    plan = passkey_plan(enc, lengths, depths, passkey_trials, seed) if passkey_trials else {}
    dev_type = _device(model).type
    ppl_batches = sum(math.ceil(windows[L].shape[0] / (batch_size or max(1, _TOKENS_PER_BATCH.get(dev_type, 8192)
                                                                            // L)))
                      for L in lengths if L in windows and windows[L].shape[0])
    steps_per_spec = ppl_batches + _passkey_batch_count(plan, batch_size, dev_type)
    total, done = steps_per_spec * len(specs), 0

    loaded = current_patch(model)
    check_specs(model, specs, loaded)
    results = []
    for spec in specs:
        label = str(spec)

        def step(label=label):
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, label)

        t0 = time.perf_counter()
        with applied(model, spec, loaded):
            ppl = []
            for L in lengths:
                w = windows.get(L)
                if w is None or w.shape[0] == 0:
                    ppl.append({"length": L, "skipped": f"no document reaches {L} tokens"})
                    continue
                ppl.append({"length": L, **perplexity(model, w, batch_size=batch_size, buckets=buckets,
                                                      progress=step)})
            keys = passkey(model, enc, plan, batch_size=batch_size, progress=step) if plan else []
        results.append({"encoding": label, "perplexity": ppl, "passkey": keys,
                        "seconds": round(time.perf_counter() - t0, 3)})
    param = next(model.parameters())
    return {
        "model": {"model_type": getattr(config, "model_type", None), "trained_context": trained_context(config),
                  "learned_position_limit": learned_position_limit(model), "loaded_patch": loaded,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "attn_implementation": getattr(config, "_attn_implementation", None)},
        "settings": {"lengths": lengths, "encodings": [str(s) for s in specs], "max_windows": max_windows,
                     "batch_size": batch_size, "buckets": buckets, "device": str(param.device),
                     "dtype": str(param.dtype).replace("torch.", ""), "seed": seed,
                     "passkey": ({"depths": list(depths), "trials": passkey_trials,
                                  "answer_tokens": passkey_answer_tokens(enc)} if plan else None),
                     "torch": torch.__version__},
        "text": text,
        "results": results,
    }


# ------------------------------------------------------------------------------------------------ output
def _passkey_by_length(rows) -> dict:
    out = {}
    for r in rows:
        if "skipped" in r:
            out[r["length"]] = None
        else:
            out.setdefault(r["length"], []).append(r["accuracy"])
    return {L: (None if v is None else sum(v) / len(v)) for L, v in out.items()}


def format_table(result: dict) -> str:
    """Length x encoding: perplexity, then (with passkey) mean accuracy over depths."""
    lengths, names = result["settings"]["lengths"], [r["encoding"] for r in result["results"]]
    width = max([11] + [len(n) + 2 for n in names])
    text = result["text"]
    digest = text.get("sha256", "")[:12]
    lines = [f"perplexity (exp of mean next-token loss) on {text.get('source')}"
             + (f" ({text.get('documents_tokenized')} documents, {text.get('tokens_read')} tokens read, "
                f"sha256 {digest})" if digest else ""),
             f"{'length':>7} {'windows':>8}" + "".join(f"{n:>{width}}" for n in names)]
    for L in lengths:
        cells = []
        for r in result["results"]:
            row = next(p for p in r["perplexity"] if p["length"] == L)
            cells.append("skipped" if "skipped" in row else f"{row['perplexity']:.3f}")
        lines.append(f"{L:>7} {text['windows'][str(L)]:>8}" + "".join(f"{c:>{width}}" for c in cells))
    pk = result["settings"].get("passkey")
    if pk:
        lines.append(f"passkey accuracy (mean over depths {', '.join(f'{d:g}' for d in pk['depths'])}; "
                     f"{pk['trials']} trials each)")
        lines.append(f"{'length':>7} {'':>8}" + "".join(f"{n:>{width}}" for n in names))
        by = [_passkey_by_length(r["passkey"]) for r in result["results"]]
        for L in lengths:
            cells = ["skipped" if b.get(L) is None else f"{b[L]:.2f}" for b in by]
            lines.append(f"{L:>7} {'':>8}" + "".join(f"{c:>{width}}" for c in cells))
    trained = result["model"].get("trained_context")
    if trained:
        lines.append(f"trained context: {trained} tokens")
    return "\n".join(lines)


def _safe_name(spec: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "_", spec.replace("@", "_at_").replace(":", "_")).strip("_")


def plot_result(result: dict, directory: str) -> list[str]:
    """PNGs in `directory`: perplexity vs length (one line per encoding, the trained context marked), loss by
    position at the longest evaluated length, and a passkey heatmap (depth x length) per encoding. Each file
    is written to a temporary name and renamed into place. Returns the paths."""
    plt = IO.pyplot()
    os.makedirs(directory, exist_ok=True)
    figures = []
    trained = result["model"].get("trained_context")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["results"]:
        pts = [(p["length"], p["perplexity"]) for p in r["perplexity"] if "skipped" not in p]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=r["encoding"])
    if trained:
        ax.axvline(trained, color="grey", linestyle="--", label=f"trained context ({trained})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity vs context length ({result['text'].get('source')})")
    ax.legend()
    figures.append(("perplexity.png", fig))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    longest = None
    for r in result["results"]:
        rows = [p for p in r["perplexity"] if "skipped" not in p]
        if rows:
            row = rows[-1]
            longest = row["length"]
            ax.plot([(b["start"] + b["end"]) / 2 for b in row["buckets"]], [b["loss"] for b in row["buckets"]],
                    marker="o", label=f"{r['encoding']} (L={row['length']})")
    if trained and longest and trained < longest:
        ax.axvline(trained, color="grey", linestyle="--", label=f"trained context ({trained})")
    ax.set_xlabel("position in window")
    ax.set_ylabel("mean next-token loss")
    ax.set_title("loss by position, longest length evaluated")
    ax.legend()
    figures.append(("loss_by_position.png", fig))

    for r in result["results"]:
        cells = [p for p in r["passkey"] if "skipped" not in p]
        if not cells:
            continue
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for c in cells:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.5 + 0.5 * len(depths)))
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        for (i, j), v in zip(((i, j) for i in range(len(depths)) for j in range(len(lengths))), grid.flatten()):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black")
        ax.set_xlabel("prompt length L")
        ax.set_ylabel("depth of the key")
        ax.set_title(f"passkey accuracy: {r['encoding']}")
        fig.colorbar(im, ax=ax)
        figures.append((f"passkey_{_safe_name(r['encoding'])}.png", fig))

    paths = []
    for name, fig in figures:
        try:
            fig.tight_layout()
            paths.append(IO.save_png(fig, os.path.join(directory, name), dpi=120))
        finally:
            plt.close(fig)
    return paths


def _parse_list(text, kind, what):
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"expected {what} separated by commas, got {text!r}") from None
    if not values:
        raise EvalError(f"expected {what} separated by commas, got {text!r}")
    return values


def run_eval(model: str, *, encodings: str = "original", lengths="256,512,1024,2048", text_path: str | None = None,
             max_documents: int | None = None, max_windows: int = 8, buckets: int = 8, passkey_on: bool = False,
             passkey_trials: int = 5, passkey_depths="0,0.25,0.5,0.75,1", gguf_file: str | None = None,
             device: str | None = None, dtype: str | None = None, batch_size: int | None = None, seed: int = 0,
             json_path: str | None = None, plot_dir: str | None = None, progress: Progress | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """The `posenc eval` command: checks every input first (EvalError, one line, before loading anything
    big), loads once, evaluates every encoding, writes the JSON / PNGs at the end. Returns the result."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    try:
        specs = parse_specs(encodings)
    except ValueError as e:
        raise EvalError(str(e)) from None
    lengths = sorted(set(_parse_list(lengths, int, "context lengths (integers)")))
    if lengths[0] < 2:
        raise EvalError(f"context lengths must be at least 2 tokens, got {lengths[0]}")
    depths = sorted(set(_parse_list(passkey_depths, float, "passkey depths (numbers in [0, 1])")))
    if not all(0 <= d <= 1 for d in depths):
        raise EvalError(f"passkey depths must lie in [0, 1], got {passkey_depths!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype not in dtypes:
        raise EvalError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    if text_path is not None and not os.path.exists(text_path):
        raise EvalError(f"text path {text_path} does not exist (give a text file or a directory of text files)")
    try:
        if json_path is not None:
            IO.check_writable_file(json_path, "--json")
        if plot_dir is not None:
            IO.check_writable_dir(plot_dir, "--plot")
    except ValueError as e:
        raise EvalError(str(e)) from None
    if plot_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EvalError("--plot needs matplotlib: pip install matplotlib") from None
    try:
        corpus = D.load_corpus(text_path, max_documents=max_documents)
    except (ValueError, TypeError) as e:
        raise EvalError(str(e)) from None

    from .analysis.loading import ModelLoadError
    t0 = time.perf_counter()
    try:
        net, tokenizer, name = load_eval_model(model, gguf_file, device=device, dtype=dtypes[dtype], seed=seed)
    except ModelLoadError as e:
        raise EvalError(str(e)) from None
    log(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    limit = learned_position_limit(net)
    if limit is not None and lengths[-1] > limit:
        raise EvalError(f"length {lengths[-1]} is beyond the model's learned position table ({limit} positions); "
                        f"give --lengths up to {limit}")
    loaded = current_patch(net)
    check_specs(net, specs, loaded)
    log(f"reading {corpus.source} ({len(corpus.documents)} documents) ...")
    t1 = time.perf_counter()
    windows, text = prepare_windows(corpus, tokenizer, int(_text_config(net).vocab_size), lengths, max_windows,
                                    seed)
    if not any(w.shape[0] for w in windows.values()):
        raise EvalError(f"too little text: no document of {corpus.source} reaches {lengths[0]} tokens; give a "
                        "longer text (--text-file) or shorter --lengths")
    log(f"evaluating {name}: {', '.join(map(str, specs))} at lengths {', '.join(map(str, lengths))}"
        + (f", passkey ({passkey_trials} trials x {len(depths)} depths)" if passkey_on else ""))
    t2 = time.perf_counter()
    result = evaluate(net, tokenizer, specs, lengths, windows=windows, text=text, max_windows=max_windows,
                      batch_size=batch_size, buckets=buckets, passkey_depths=depths,
                      passkey_trials=passkey_trials if passkey_on else 0, seed=seed, progress=progress)
    t3 = time.perf_counter()
    result["model"]["name"] = name
    result["seconds"] = {"load": round(t1 - t0, 2), "text": round(t2 - t1, 2), "evaluate": round(t3 - t2, 2)}
    if json_path is not None:
        IO.write_json(result, json_path)
        log(f"wrote {json_path}")
    if plot_dir is not None:
        paths = plot_result(result, plot_dir)
        log(f"wrote {len(paths)} plots to {plot_dir}: {', '.join(os.path.basename(p) for p in paths)}")
    return result
