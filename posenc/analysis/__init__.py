"""Looking inside models: query/key norm per rotary frequency, rotary offset features, attention sinks,
value-state drains and massive activations, measured with forward hooks on a transformers model.

    from posenc.analysis import load_model, tokenize, analyze, summarize, plot_report
    model, tok, name = load_model("tiny-llama")          # or a model directory, a .gguf, a JSON config
    report = analyze(model, tokenize(text, tok, model.config.vocab_size))
    print(summarize(report, name))

`posenc.analysis.metrics` holds the measurements as pure functions of tensors.
"""
from . import metrics
from .capture import LayerCapture, UnsupportedModelError, attention_layers, capture
from .metrics import (frequency_energy, frequency_norms, massive_activations, offset_ratio, outlier_pair,
                      sink_argmax_fraction, sink_share, value_drain)
from .loading import DEFAULT_TEXT, MODEL_PRESETS, PRESETS, ModelLoadError, load_model, smollm2_gguf, tokenize
from .report import analyze, layer_frequencies, plot_report, summarize, write_json
from . import quant
from .quant import (QuantScheme, compare_encodings, fake_quantize, plot_quant, quant_analysis, quantized_attention,
                    summarize_quant)

__all__ = ["metrics", "LayerCapture", "UnsupportedModelError", "attention_layers", "capture", "frequency_energy",
           "frequency_norms", "massive_activations", "offset_ratio", "outlier_pair", "sink_argmax_fraction",
           "sink_share", "value_drain", "DEFAULT_TEXT", "MODEL_PRESETS", "PRESETS", "ModelLoadError", "load_model",
           "smollm2_gguf", "tokenize", "analyze", "layer_frequencies", "plot_report", "summarize", "write_json",
           "quant", "QuantScheme", "compare_encodings", "fake_quantize", "plot_quant", "quant_analysis",
           "quantized_attention", "summarize_quant"]
