"""Tiny random-initialised transformers models for the hf tests (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

# model_type -> (config class, causal-LM class, extra config arguments)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(sliding_window=8, query_pre_attn_scalar=16,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                             "rope_theta": 1_000_000.0}})),
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM",
                    dict(sliding_window=8, global_head_dim=32, hidden_size_per_layer_input=8,
                         vocab_size_per_layer_input=96,
                         layer_types=["sliding_attention", "full_attention"] * 2)),
}


def tiny_config(model_type, **overrides):
    config_cls, _, extra = TINY[model_type]
    kwargs = {**COMMON, **extra, **overrides}
    return getattr(transformers, config_cls)(**kwargs)


def tiny_model(model_type, attn="eager", dtype=torch.float32, **overrides):
    """A tiny causal LM of the family, random weights, eval mode."""
    config = tiny_config(model_type, **overrides)
    config._attn_implementation = attn
    model = getattr(transformers, TINY[model_type][1])(config).to(dtype).eval()
    return model


def spy_fused_calls(monkeypatch) -> list:
    """Records each call a patched attention makes to posenc's fused op, as its rotated_pairs: through
    apply_rotary, or straight to its short path (a None from that means the call went on to apply_rotary)."""
    import posenc.hf.patching as patching
    calls = []
    original, original_fast = patching.apply_rotary, patching._fast_rotary

    def spy(*args, **kwargs):
        calls.append(kwargs.get("rotated_pairs"))
        return original(*args, **kwargs)

    def spy_fast(*args):
        out = original_fast(*args)
        if out is not None:
            calls.append(args[8])
        return out

    monkeypatch.setattr(patching, "apply_rotary", spy)
    monkeypatch.setattr(patching, "_fast_rotary", spy_fast)
    return calls
