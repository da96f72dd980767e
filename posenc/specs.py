"""Encoding specs: one text form for "which encoding, with which options, in which layers", shared by the
commands (eval, finetune, analyze, bench) and the workflow modules.

Grammar (case-insensitive names; no spaces):

    SPEC    := NAME [":" VALUE] ["@" LAYERS]
    NAME    := original | rope | hope | prope | nope        (aliases: p-rope -> prope, none -> nope)
    VALUE   := hope: the training context length L (a positive integer), e.g. hope:2048
               prope: the rotating fraction p in (0, 1], e.g. prope:0.25
    LAYERS  := a layer type (full_attention, sliding_attention)
             | indices: "0-3" (a range, both ends included), "0+5+7", or both: "0-3+7"

"original" is the model as loaded (nothing patched) and takes neither a value nor layers; "rope" keeps the
model's own frequencies and swaps only the kernel. Without a value, hope and prope take `posenc.patch`'s
defaults (the config's pretraining length; PRoPE's p = 0.75).

    spec = parse_spec("hope:2048@full_attention")
    posenc.patch(model, **spec.patch_kwargs())   # None for "original": leave the model alone
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .encodings import ENCODINGS, encoding_class

__all__ = ["EncodingSpec", "parse_spec", "parse_specs", "SPEC_NAMES"]

SPEC_NAMES = ("original", *ENCODINGS)
_GRAMMAR = ("NAME[:VALUE][@LAYERS] with NAME one of original, rope, hope[:L], prope[:p], nope and LAYERS a layer "
            "type (e.g. full_attention) or indices (0-3, 0+5+7)")
_LAYER_TYPE = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class EncodingSpec:
    """One encoding to evaluate or train: name, its options, and the layers it applies to.

    name: "original" | "rope" | "hope" | "prope" | "nope".
    options: hope {"context_length": int} when given, prope {"p": float} when given, else {}.
    layers: a layer type name ("full_attention"), a sorted tuple of layer indices, or None (all layers).
    """
    name: str
    options: dict = field(default_factory=dict)
    layers: str | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.name not in SPEC_NAMES:
            raise ValueError(f"encoding spec name must be one of {', '.join(SPEC_NAMES)}, got {self.name!r}")
        allowed = set() if self.name == "original" else set(encoding_class(self.name).options)
        extra = sorted(set(self.options) - allowed)
        if extra:
            raise ValueError(f"encoding spec {self.name!r} takes {sorted(allowed) or 'no options'}, got {extra}")
        if self.name == "original" and self.layers is not None:
            raise ValueError("encoding spec 'original' (the model as loaded) takes no layers")
        layers = self.layers
        if isinstance(layers, (list, tuple)):
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"layers must be non-negative layer indices, got {layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        elif layers is not None and not (isinstance(layers, str) and _LAYER_TYPE.fullmatch(layers)):
            raise ValueError(f"layers must be None, a layer type name or layer indices, got {layers!r}")

    def __str__(self) -> str:
        text = self.name
        for value in self.options.values():  # the encoding's one option (hope's L, prope's p), when given
            text += f":{value!r}" if isinstance(value, float) else f":{value}"
        if isinstance(self.layers, str):
            text += f"@{self.layers}"
        elif self.layers is not None:
            text += "@" + _format_indices(self.layers)
        return text

    def __hash__(self):  # options is a dict: hash the canonical text instead
        return hash(str(self))

    def patch_kwargs(self) -> dict | None:
        """Keyword arguments for `posenc.patch(model, **kw)`; None for "original" (nothing to patch)."""
        if self.name == "original":
            return None
        return {"encoding": self.name, "layers": self.layers, **self.options}


def _format_indices(indices: tuple[int, ...]) -> str:
    parts, start = [], 0
    while start < len(indices):
        end = start
        while end + 1 < len(indices) and indices[end + 1] == indices[end] + 1:
            end += 1
        parts.append(f"{indices[start]}-{indices[end]}" if end > start else str(indices[start]))
        start = end + 1
    return "+".join(parts)


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"bad encoding spec {text!r}: {why}; expected {_GRAMMAR}")


def _parse_layers(text: str, raw: str):
    if _LAYER_TYPE.fullmatch(raw):
        return raw
    indices = []
    for part in raw.split("+"):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise _bad(text, f"layers {raw!r} are neither a layer type nor indices")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise _bad(text, f"layer range {part!r} runs backwards")
        indices.extend(range(lo, hi + 1))
    return tuple(sorted(set(indices)))


def parse_spec(text: str) -> EncodingSpec:
    """An EncodingSpec from its text, e.g. "hope:2048@full_attention"; ValueError naming the bad spec."""
    if not isinstance(text, str):
        raise TypeError(f"encoding spec must be a string, got {type(text).__name__}")
    raw = text.strip().lower()
    head, at, layer_text = raw.partition("@")
    name, colon, value = head.partition(":")
    if name != "original":
        try:
            name = encoding_class(name).name  # resolves the aliases ("p-rope", "none")
        except ValueError:
            raise _bad(text, f"unknown encoding {name!r}") from None
    if at and not layer_text:
        raise _bad(text, "nothing after '@'")
    if colon and not value:
        raise _bad(text, "nothing after ':'")
    options: dict = {}
    if value:
        if name == "hope":
            if not value.isdigit() or int(value) <= 0:
                raise _bad(text, f"hope's context length must be a positive integer, got {value!r}")
            options["context_length"] = int(value)
        elif name == "prope":
            try:
                p = float(value)
            except ValueError:
                p = math.nan
            if not (math.isfinite(p) and 0 < p <= 1):
                raise _bad(text, f"prope's fraction p must be a number in (0, 1], got {value!r}")
            options["p"] = p
        else:
            raise _bad(text, f"{name} takes no value")
    if name == "original" and at:
        raise _bad(text, "'original' (the model as loaded) takes no layers")
    layers = _parse_layers(text, layer_text) if at else None
    return EncodingSpec(name, options, layers)


def parse_specs(text: str) -> list[EncodingSpec]:
    """Comma-separated specs, in order, e.g. "original,hope,prope:0.25"; ValueError on a bad or repeated one."""
    if not isinstance(text, str):
        raise TypeError(f"encoding specs must be a string, got {type(text).__name__}")
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ValueError(f"no encoding spec given; expected a comma-separated list of {_GRAMMAR}")
    if not all(parts):
        raise ValueError(f"empty entry in encoding specs {text!r}")
    specs, seen = [], {}
    for part in parts:
        spec = parse_spec(part)
        key = str(spec)
        if key in seen:
            raise ValueError(f"encoding spec {part!r} repeats {seen[key]!r}")
        seen[key] = part
        specs.append(spec)
    return specs
