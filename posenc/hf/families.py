"""The transformers model families `posenc.patch` knows: where their rotary module and attention live.

Every family follows the same pattern in transformers 5.x (checked on 5.17 and 5.23): a rotary module builds
cos/sin tables from `config.rope_parameters` (through `ROPE_INIT_FUNCTIONS`, or the class's own
`compute_default_rope_parameters` for the "default" type), and the attention class calls the module-level
`apply_rotary_pos_emb` of its modeling file on them. Gemma 3/4 keep one rope per layer type in one rotary
module; Gemma 4 rotates q and k in separate calls, one tensor at a time, in the (batch, seq, heads, dim) layout.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "SUPPORTED", "family_of"]


@dataclass(frozen=True)
class Family:
    name: str        # what users call it
    module: str      # the modeling file
    rotary: str      # its rotary-embedding class
    attention: str   # its attention class (calls `apply_rotary_pos_emb` from `module`)
    pair: bool = True  # apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) vs (x, cos, sin, unsqueeze_dim)

    def load(self):
        """The modeling module (imported on first use only)."""
        return importlib.import_module(self.module)


def _family(name, short, prefix, pair=True):
    return Family(name, f"transformers.models.{short}.modeling_{short}", f"{prefix}RotaryEmbedding",
                  f"{prefix}Attention", pair)


# Keyed by `config.model_type` of the text model.
FAMILIES = {
    "llama": _family("Llama", "llama", "Llama"),
    "mistral": _family("Mistral", "mistral", "Mistral"),
    "qwen2": _family("Qwen2", "qwen2", "Qwen2"),
    "qwen3": _family("Qwen3", "qwen3", "Qwen3"),
    "gemma": _family("Gemma", "gemma", "Gemma"),
    "gemma2": _family("Gemma2", "gemma2", "Gemma2"),
    "gemma3_text": _family("Gemma3 (text)", "gemma3", "Gemma3"),
    "gemma4_text": _family("Gemma4 (text)", "gemma4", "Gemma4Text", pair=False),
}
SUPPORTED = ", ".join(f.name for f in FAMILIES.values())


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))
