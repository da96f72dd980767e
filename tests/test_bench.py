"""posenc.bench: the end-to-end preset on a tiny Llama (CPU, seconds) and the eager columns' bookkeeping."""
import json

import pytest
import torch

from posenc import bench


def test_e2e_tiny_runs_and_checks_the_patched_model():
    rows = bench.run(device="cpu", shapes="e2e-tiny", warmup=0, iters=1)
    by = {(r["method"], r["unit"]): r for r in rows}
    assert {m for m, _ in by} == set(bench.E2E_METHODS)
    for unit in ("ms/step", "ms/token"):
        assert by[("unpatched", unit)]["check"] == "baseline" and by[("unpatched", unit)]["ms"] > 0
        posenc_row = by[("posenc", unit)]
        assert posenc_row["check"] == "ok", posenc_row  # same loss / same greedy tokens as transformers' rope
        assert posenc_row["x_unpatched"] > 0
        assert by[("liger", unit)]["check"] == "GPU only" and by[("liger", unit)]["ms"] is None
    assert by[("posenc", "ms/step")]["loss_rel_diff"] <= 1e-3
    text = bench.format_table(rows)
    assert "tiny-llama" in text and "ms/token" in text
    json.dumps(rows, default=str)


def test_e2e_methods_take_turns_and_report_the_median_round(monkeypatch):
    order = []
    real = bench._train_step_ms

    def recording(model, *args):
        order.append(_patched(model))
        return real(model, *args)
    monkeypatch.setattr(bench, "_train_step_ms", recording)
    rows = bench.run_e2e("cpu", "e2e-tiny", methods=["unpatched", "posenc"], warmup=0, iters=1, repeats=1, rounds=3)
    assert order == [False, True] * 3  # unpatched, posenc, unpatched, ...: turns, not one method's rounds in a row
    for r in rows:
        assert len(r["ms_rounds"]) == 3 and r["ms"] == sorted(r["ms_rounds"])[1]
    with pytest.raises(ValueError, match="rounds"):
        bench.run_e2e("cpu", "e2e-tiny", rounds=0)


def _patched(model):
    from posenc.hf import is_patched
    return is_patched(model)


def test_e2e_preset_refuses_mixing_with_cases():
    with pytest.raises(ValueError, match="whole model"):
        bench.run(device="cpu", shapes=["e2e-tiny", "tiny"])
    with pytest.raises(ValueError, match="compares"):
        bench.run(device="cpu", shapes="e2e-tiny", methods=["hf_eager"])


def test_e2e_model_matches_llama_3_2_1b_shape():
    config = bench._e2e_config(bench.LLAMA_1B)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == (2048, 16, 32, 8, 64, 128256)
    assert config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_rows_carry_graph_and_eager_times():
    rows = bench.run(device="cuda", shapes="tiny", warmup=1, iters=2, repeats=2)
    for r in rows:
        if r["us"] is not None:
            assert r["us_eager"] > 0 and r["x_copy_eager"] > 0


def test_native_mul_is_a_fwd_bwd_floor_only():
    """The eager-autograd floor row: timed (and marked a floor, not checked against posenc) for fwd+bwd, and
    skipped with its reason for the other passes, where it would only repeat the copy."""
    rows = bench.run(device="cpu", shapes=[(1, 8, 2, 1, 16)], passes=["fwd+bwd", "fwd"], dtypes=["float32"],
                     methods=["copy", "posenc", "native_mul"], warmup=0, iters=1)
    mul = {r["pass"]: r for r in rows if r["method"] == "native_mul"}
    assert mul["fwd+bwd"]["check"] == "floor" and mul["fwd+bwd"]["us"] > 0
    assert mul["fwd"]["check"] == "fwd+bwd only" and mul["fwd"]["us"] is None
