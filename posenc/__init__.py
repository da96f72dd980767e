"""posenc: drop-in positional encodings (RoPE, p-RoPE, HoPE, NoPE) over one fused rotary op."""
from .ops import apply_rotary, backend, rotary_reference
from .frequencies import ROPE_TYPES, rope_frequencies
from .encodings import ENCODINGS, Encoding, HoPE, NoPE, PRoPE, RoPE, get_encoding
from .attention import Attention, HoPEAttention, KVCache, NoPEAttention, PRoPEAttention, RoPEAttention
from .decoder import TinyDecoder
from .hf import is_patched, patch, unpatch  # transformers integration (imports transformers lazily)

__version__ = "0.1.0"
__all__ = [
    "apply_rotary", "backend", "rotary_reference", "ROPE_TYPES", "rope_frequencies",
    "Encoding", "RoPE", "PRoPE", "HoPE", "NoPE", "get_encoding", "ENCODINGS",
    "Attention", "RoPEAttention", "PRoPEAttention", "HoPEAttention", "NoPEAttention", "KVCache", "TinyDecoder",
    "patch", "unpatch", "is_patched",
]
