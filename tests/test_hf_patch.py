"""posenc.patch / unpatch on tiny random transformers models of every supported family (no downloads).

Expected numbers come from transformers itself: an unpatched copy of the model whose rotary buffers are
masked by hand with the encodings' rules written out here (HoPE: wavelength 2*pi/inv_freq <= L; p-RoPE: the
fastest int(p * pairs) pairs; NoPE: none), run through transformers' own attention code.
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_tiny import TINY, spy_fused_calls, tiny_config, tiny_model

transformers = pytest.importorskip("transformers")
import posenc  # noqa: E402
import posenc.hf.patching as patching  # noqa: E402

FAMILIES = list(TINY)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, 20))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls the patched attention makes to posenc's fused op."""
    return spy_fused_calls(monkeypatch)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def rotary_of(model):
    return model.model.rotary_emb


def hand_mask(model, rule):
    """Mask every rope group's inv_freq buffers of an unpatched model in place: rule(inv_freq) -> keep mask."""
    for name, buf in rotary_of(model).named_buffers():
        if name.endswith("inv_freq"):
            buf.copy_(torch.where(rule(buf), buf, torch.zeros_like(buf)))


def hope_rule(context_length):
    return lambda inv: (inv > 0) & (2 * math.pi / inv <= context_length)


def prope_rule(p):
    def rule(inv):
        keep = torch.zeros_like(inv, dtype=torch.bool)
        keep[: int(p * 2 * inv.numel() // 2)] = True
        return keep
    return rule


def nope_rule(inv):
    return torch.zeros_like(inv, dtype=torch.bool)


# ------------------------------------------------------------------------------------ rope + kernel only
@pytest.mark.parametrize("family", FAMILIES)
def test_rope_kernel_keeps_logits(family, ids, kernel_calls):
    model = tiny_model(family)
    ref = logits(model, ids)
    posenc.patch(model, "rope", kernel=True)
    out = logits(model, ids)
    layers = model.config.num_hidden_layers
    assert len(kernel_calls) == (layers if TINY[family][0] != "Gemma4TextConfig" else 2 * layers)  # q, k apart
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_rope_without_kernel_is_bit_identical(family, ids, kernel_calls):
    model = tiny_model(family)
    ref = logits(model, ids)
    posenc.patch(model, "rope", kernel=False)
    assert torch.equal(logits(model, ids), ref)
    assert kernel_calls == []


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma4_text"])
def test_rope_kernel_bf16_no_worse_than_transformers(family):
    """The fused op on transformers' bf16 tables is no further from float64 than transformers' eager rope."""
    model = tiny_model(family)
    posenc.patch(model, "rope")
    module = sys.modules[type(model).__module__]
    original = module.apply_rotary_pos_emb._posenc_original
    attn = model.model.layers[1].self_attn
    spec = patching._layer_spec(attn)
    assert spec is not None and spec.kernel
    q = torch.randn(2, 4, 20, attn.head_dim).to(torch.bfloat16)
    k = torch.randn(2, 2, 20, attn.head_dim).to(torch.bfloat16)
    layer_type = getattr(attn, "layer_type", None)
    x = torch.zeros(1, dtype=torch.bfloat16)
    pos = torch.arange(20).expand(2, 20) + 1000
    cos, sin = (rotary_of(model)(x, pos, layer_type) if layer_type else rotary_of(model)(x, pos))
    pair = TINY[family][0] != "Gemma4TextConfig"

    def rope64(t):  # float64 rotation with the same (bf16) tables, bhsd
        c, s = cos.double()[:, None], sin.double()[:, None]
        t = t.double()
        half = t.shape[-1] // 2
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * c + rot * s

    patching._STATE.spec = spec
    try:
        if pair:
            ours = module.apply_rotary_pos_emb(q, k, cos, sin)
        else:
            ours = (module.apply_rotary_pos_emb(q, cos, sin), module.apply_rotary_pos_emb(k, cos, sin))
    finally:
        patching._STATE.spec = None
    theirs = original(q, k, cos, sin) if pair else (original(q, cos, sin), original(k, cos, sin))
    for o, t, x in zip(ours, theirs, (q, k)):
        exact = rope64(x)
        assert (o.double() - exact).abs().max() <= (t.double() - exact).abs().max()


def test_bf16_model_runs_patched(ids):
    model = tiny_model("gemma3_text", dtype=torch.bfloat16)
    ref = logits(model, ids).float()
    posenc.patch(model, "rope")
    out = logits(model, ids).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


# -------------------------------------------------------------------------------- encodings vs by hand
CASES = [("hope", dict(context_length=32), hope_rule(32)), ("prope", dict(p=0.5), prope_rule(0.5)),
         ("nope", {}, nope_rule)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoding,kwargs,rule", CASES, ids=[c[0] for c in CASES])
def test_encoding_matches_masked_transformers(family, encoding, kwargs, rule, ids, kernel_calls):
    model = tiny_model(family)
    expected_model = copy.deepcopy(model)
    hand_mask(expected_model, rule)
    posenc.patch(model, encoding, **kwargs)
    for name, buf in rotary_of(model).named_buffers():  # the masks live in the rotary buffers
        assert torch.equal(buf, dict(rotary_of(expected_model).named_buffers())[name]), name
    out, expected = logits(model, ids), logits(expected_model, ids)
    assert kernel_calls, "the fused op did not run"
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma4_text"])
def test_sdpa_backend(family, ids, kernel_calls):
    eager, sdpa = tiny_model(family, attn="eager"), tiny_model(family, attn="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    for model in (eager, sdpa):
        posenc.patch(model, "hope", context_length=32)
    assert (logits(eager, ids) - logits(sdpa, ids)).abs().max().item() <= 1e-5
    assert sdpa.config._attn_implementation == "sdpa" and kernel_calls


def test_hope_rotated_pairs_and_scaled_frequencies():
    """Llama with llama3 scaling: HoPE cuts the *scaled* frequencies; the kernel visits only rotating pairs."""
    model = tiny_model("llama")
    unscaled = 1.0 / 10_000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    scaled = rotary_of(model).inv_freq.double()
    assert not torch.allclose(scaled, unscaled)  # llama3 really scales the slow pairs here
    posenc.patch(model, "hope", context_length=40)
    inv = rotary_of(model).inv_freq.double()
    keep = 2 * math.pi / scaled <= 40
    assert torch.equal(inv != 0, keep) and torch.allclose(inv[keep], scaled[keep])
    spec = patching._layer_spec(model.model.layers[0].self_attn)
    assert spec.rotated_pairs == int(keep.sum()) < 8


def test_hope_context_length_defaults_to_original_max_positions():
    llama = posenc.patch(tiny_model("llama"), "hope")  # llama3 scaling, original_max_position_embeddings=64
    assert llama.config.rope_parameters["posenc"]["kwargs"] == {"context_length": 64}
    qwen3 = posenc.patch(tiny_model("qwen3"), "hope")  # no scaling: max_position_embeddings
    assert qwen3.config.rope_parameters["posenc"]["kwargs"] == {"context_length": 256}


def test_yarn_attention_scaling_kept():
    model = tiny_model("qwen2")  # yarn: attention scaling != 1 multiplies every pair, frozen ones included
    scale = rotary_of(model).attention_scaling
    assert scale != 1.0
    posenc.patch(model, "nope")
    assert rotary_of(model).attention_scaling == scale
    pairs = rotary_of(model).inv_freq.numel()
    assert patching._layer_spec(model.model.layers[0].self_attn).rotated_pairs == pairs  # visit all pairs


# ----------------------------------------------------------------------------------------- layer choice
def test_layer_type_gemma3(ids):
    model = tiny_model("gemma3_text")
    expected = copy.deepcopy(model)
    rot = rotary_of(expected)
    rot.full_attention_inv_freq.copy_(torch.where(hope_rule(32)(rot.full_attention_inv_freq),
                                                  rot.full_attention_inv_freq, 0.0))
    sliding_before = rotary_of(model).sliding_attention_inv_freq.clone()
    posenc.patch(model, "hope", layers="full_attention", context_length=32)
    rp = model.config.rope_parameters
    assert rp["full_attention"]["rope_type"] == posenc.hf.POSENC_ROPE_TYPE
    assert rp["sliding_attention"]["rope_type"] == "default"
    assert torch.equal(rotary_of(model).sliding_attention_inv_freq, sliding_before)
    assert (logits(model, ids) - logits(expected, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("kernel", [True, False])
def test_layer_indices_change_only_those_layers(family, kernel, ids):
    """Layer 2 only: hidden states before it are bit-identical, the output changes, and the rotary module
    (shared by all layers) keeps the model's frequencies."""
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    buffers = {n: b.clone() for n, b in rotary_of(model).named_buffers()}
    posenc.patch(model, "nope", layers=[2], kernel=kernel)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for i in range(3):  # hidden_states[i] is the input of layer i
        assert torch.equal(out.hidden_states[i], ref.hidden_states[i]), i
    # NoPE changes layer 2's output by ~1e-4 here (random weights of std 0.02: 9.1e-5 with torch 2.11 and
    # transformers 5.17 for one seed); float32 rounding of the same map would differ by ~1e-8
    assert (out.hidden_states[3] - ref.hidden_states[3]).abs().max() > 1e-6
    for name, buf in rotary_of(model).named_buffers():
        assert torch.equal(buf, buffers[name])


def test_layer_indices_equal_layer_type_and_all(ids):
    a, b, c = tiny_model("gemma3_text"), tiny_model("gemma3_text"), tiny_model("gemma3_text")
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    posenc.patch(a, "prope", layers=[1, 3], p=0.25)              # the full-attention layers by index
    posenc.patch(b, "prope", layers="full_attention", p=0.25)
    assert a.config.rope_parameters == b.config.rope_parameters  # indices that cover a type = that type
    posenc.patch(c, "prope", layers=[0, 1, 2, -1], p=0.25)
    assert c.config.rope_parameters["sliding_attention"]["posenc"]["layers"] is None
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_layer_subset_kernel_matches_table_masking(ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    b.load_state_dict(a.state_dict())
    posenc.patch(a, "hope", layers=[1, 2], context_length=20, kernel=True)
    posenc.patch(b, "hope", layers=[1, 2], context_length=20, kernel=False)
    assert (logits(a, ids) - logits(b, ids)).abs().max().item() <= 1e-5


# -------------------------------------------------------------------------------------- state and config
@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_config_and_bits(family, ids):
    model = tiny_model(family)
    ref, config_before = logits(model, ids), model.config.to_dict()
    posenc.patch(model, "hope", context_length=32)
    assert posenc.is_patched(model)
    posenc.patch(model, "nope", kernel=False)  # patching twice replaces the first patch
    posenc.unpatch(model)
    assert not posenc.is_patched(model)
    assert model.config.to_dict() == config_before
    assert torch.equal(logits(model, ids), ref)
    assert posenc.unpatch(model) is model  # unpatching an unpatched model changes nothing


def test_patching_twice_replaces(ids):
    a, b = tiny_model("gemma3_text"), tiny_model("gemma3_text")
    b.load_state_dict(a.state_dict())
    posenc.patch(a, "hope", context_length=32)
    posenc.patch(a, "nope", layers="sliding_attention")
    posenc.patch(b, "nope", layers="sliding_attention")
    assert a.config.rope_parameters == b.config.rope_parameters
    assert a.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert torch.equal(logits(a, ids), logits(b, ids))


def test_other_models_unchanged(ids):
    config = tiny_config("llama")
    a = transformers.LlamaForCausalLM(config).eval()
    b = transformers.LlamaForCausalLM(config).eval()  # same config object
    c = tiny_model("llama")
    ref_b, ref_c = logits(b, ids), logits(c, ids)
    posenc.patch(a, "nope")
    assert a.config.rope_parameters["rope_type"] == posenc.hf.POSENC_ROPE_TYPE
    assert b.config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_type"] == "llama3"
    assert torch.equal(logits(b, ids), ref_b) and torch.equal(logits(c, ids), ref_c)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload(family, ids, tmp_path):
    model = tiny_model(family)
    posenc.patch(model, "hope", layers="full_attention" if "gemma3" in family else None, context_length=32)
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert "posenc" in json.dumps(saved)
    cls = type(model)
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    for name, buf in rotary_of(model).named_buffers():
        assert torch.equal(buf, dict(rotary_of(reloaded).named_buffers())[name]), name
    assert torch.equal(logits(reloaded, ids), out)
    posenc.unpatch(reloaded)  # the original comes back from the saved patch alone
    fresh = tiny_model(family)
    assert reloaded.config.rope_parameters == fresh.config.rope_parameters


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_patching_the_inner_model_saves_with_the_outer(family, ids, tmp_path):
    """patch(model.model) patches the config the whole model shares, so the outer model's save_pretrained
    writes the patch (it wrote the original rope while the live model ran patched). A second model built
    from the same config object stays unpatched, even where one module holds both (a distillation wrapper)."""
    config = tiny_config(family)
    config._attn_implementation = "eager"
    cls = getattr(transformers, TINY[family][1])
    model, sibling = cls(config).eval(), cls(config).eval()
    pair = torch.nn.ModuleList([model, sibling])  # noqa: F841 (the container is what matters)
    ref_sibling = logits(sibling, ids)
    posenc.patch(model.model, "hope", context_length=16)
    out = logits(model, ids)
    assert model.config is model.model.config and posenc.is_patched(model)
    model.save_pretrained(tmp_path)
    assert "posenc" in (tmp_path / "config.json").read_text()
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert posenc.is_patched(reloaded) and torch.equal(logits(reloaded, ids), out)
    assert not posenc.is_patched(sibling) and torch.equal(logits(sibling, ids), ref_sibling)
    posenc.unpatch(model.model)  # unpatching the inner model restores the outer model's config too
    assert not posenc.is_patched(model) and model.config.rope_parameters == sibling.config.rope_parameters


def test_patching_inside_a_peft_wrapper_saves(ids, tmp_path):
    """The base model as people reach it through a PEFT wrapper (lora.model.model): the merged model saves
    and reloads patched."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # a non-zero adapter
    lora = peft.get_peft_model(model, config)
    posenc.patch(lora.model.model, "prope", p=0.5)
    out = logits(lora, ids)
    assert posenc.is_patched(lora) and posenc.is_patched(model)
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert posenc.is_patched(reloaded)
    assert (logits(reloaded, ids) - out).abs().max().item() <= 1e-5  # merging the adapter rounds


def test_reload_in_fresh_process_after_import_posenc(ids, tmp_path):
    """Only `import posenc` (before transformers is imported) is needed to load a patched checkpoint."""
    model = posenc.patch(tiny_model("llama"), "prope", p=0.5)
    model.save_pretrained(tmp_path / "m")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(logits(model, ids), tmp_path / "expected.pt")
    script = (
        "import sys, torch, posenc\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, attn_implementation='eager').eval()\n"
        # It compiles before any eager call (fullgraph): the attention modules got their spec when built.
        "x, pos = torch.randn(2, 20, 32), torch.arange(20).repeat(2, 1)\n"
        "kw = dict(attention_mask=None, position_ids=pos, position_embeddings=m.model.rotary_emb(x, pos))\n"
        "layer = m.model.layers[0]\n"
        "with torch.no_grad():\n"
        "    got = torch.compile(layer, backend='eager', fullgraph=True)(x, **kw)\n"
        "    assert torch.equal(got, layer(x, **kw)), 'compiled layer differs'\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        f"assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r})), 'logits differ'\n"
        "assert posenc.is_patched(m)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_torch_compile_of_a_freshly_patched_model(ids, kernel_calls):
    """torch.compile right after patch (no eager call first; Dynamo failed inside the lazy per-layer lookup):
    the whole model's logits are the eager ones; one decoder layer is a single graph holding posenc's op; a
    spec missing from the cache (a config edited by hand) is worked out outside the graph, still exact."""
    torch._dynamo.reset()
    model = posenc.patch(tiny_model("llama", attn="sdpa"), "hope", context_length=32)
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")(ids, use_cache=False).logits
        assert torch.equal(compiled, logits(model, ids, use_cache=False))
    assert kernel_calls  # patched layers ran posenc's op
    x, pos = torch.randn(2, 20, 32), torch.arange(20).repeat(2, 1)
    kw = dict(attention_mask=None, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
    layer = posenc.patch(tiny_model("llama", attn="sdpa"), "prope", p=0.5).model.layers[1]
    explained = torch._dynamo.explain(layer)(x, **kw)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert "posenc.rotary" in str(explained.graphs[0].graph)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x, **kw), layer(x, **kw))
    model = posenc.patch(tiny_model("llama", attn="sdpa"), "nope")
    for layer in model.model.layers:
        del layer.self_attn.__dict__["_posenc_spec"]
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")(ids, use_cache=False).logits
        assert torch.equal(compiled, logits(model, ids, use_cache=False))
    torch._dynamo.reset()


def test_checkpoint_of_the_earlier_rope_type_name_loads(ids, tmp_path):
    """Checkpoints saved while the rope type was named "posenc" load as patched."""
    model = posenc.patch(tiny_model("llama"), "hope", context_length=16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["rope_type"] = "posenc"
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert posenc.is_patched(reloaded) and torch.equal(logits(reloaded, ids), logits(model, ids))
    posenc.unpatch(reloaded)
    assert reloaded.config.rope_parameters == tiny_config("llama").rope_parameters


def test_loading_without_import_posenc_says_what_to_do(tmp_path):
    """A shared patched checkpoint loaded without posenc: transformers' error names the rope type, which says
    what to do (it said KeyError: 'posenc' from deep inside the modeling code)."""
    posenc.patch(tiny_model("gemma3_text"), "hope", layers="full_attention", context_length=16).save_pretrained(
        tmp_path / "m")
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'posenc' not in sys.modules\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "else:\n"
        "    print('loaded')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install posenc and `import posenc` before from_pretrained" in result.stdout, result.stdout


# --------------------------------------------------------------------------------- cache and generate
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma4_text"])
def test_kv_cache_and_generate(family, kernel_calls):
    model = tiny_model(family)
    posenc.patch(model, "hope", context_length=32)
    prompt = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        full = model(prompt).logits
        first = model(prompt[:, :-1], use_cache=True)
        step = model(prompt[:, -1:], past_key_values=first.past_key_values).logits
    assert (step[:, -1] - full[:, -1]).abs().max().item() <= 1e-5
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)  # no early stop at EOS
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 18) and torch.equal(cached, uncached)
    assert kernel_calls


# --------------------------------------------------------------------------------------------- errors
def test_unsupported_model_lists_families():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3"):
        posenc.patch(gpt2, "hope")
    with pytest.raises(TypeError, match="model"):
        posenc.patch("meta-llama/Llama-3.2-1B", "hope")


def test_unsupported_model_is_not_patched_and_unpatch_leaves_it():
    """As documented: is_patched is False and unpatch returns the model unchanged (both raised ValueError)."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    config_before, state = gpt2.config.to_dict(), copy.deepcopy(gpt2.state_dict())
    assert posenc.is_patched(gpt2) is False
    assert posenc.unpatch(gpt2) is gpt2
    assert gpt2.config.to_dict() == config_before
    assert all(torch.equal(v, state[k]) for k, v in gpt2.state_dict().items())
    with pytest.raises(TypeError, match="model must be"):
        posenc.is_patched("meta-llama/Llama-3.2-1B")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(encoding="alibi"), ValueError, "unknown encoding"),
    (dict(encoding=3), TypeError, "encoding"),
    (dict(encoding="hope", kernel="yes"), TypeError, "kernel"),
    (dict(encoding="hope", base=500.0), TypeError, "base"),
    (dict(encoding="rope", p=0.5), TypeError, "p"),
    (dict(encoding="prope", p=1.5), ValueError, "p must"),
    (dict(encoding="hope", context_length=0), ValueError, "context_length"),
    (dict(encoding="hope", layers="global"), ValueError, "layers"),
    (dict(encoding="hope", layers=[7]), ValueError, "layers"),
    (dict(encoding="hope", layers=[]), ValueError, "layers"),
    (dict(encoding="hope", layers=[1.0]), TypeError, "layers"),
    (dict(encoding="hope", layers=3), TypeError, "layers"),
])
def test_bad_arguments_raise_and_leave_model_alone(kwargs, error, match, ids):
    model = tiny_model("gemma3_text")
    ref, config_before = logits(model, ids), model.config.to_dict()
    with pytest.raises(error, match=match):
        posenc.patch(model, **kwargs)
    assert model.config.to_dict() == config_before and torch.equal(logits(model, ids), ref)


def test_gemma4_kv_sharing_groups_stay_whole(ids):
    model = tiny_model("gemma4_text", num_hidden_layers=6, num_kv_shared_layers=2,
                       layer_types=["sliding_attention", "full_attention"] * 3)
    with pytest.raises(ValueError, match="share keys and values"):
        posenc.patch(model, "nope", layers=[5])  # reuses layer 3's keys
    ref = logits(model, ids)
    posenc.patch(model, "nope", layers=[1, 3, 5])
    assert model.config.rope_parameters["full_attention"]["posenc"]["layers"] is None
    assert (logits(model, ids) - ref).abs().max() > 0


def test_dynamic_rope_refused():
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        posenc.patch(model, "hope")


def test_malformed_posenc_config_rejected():
    with pytest.raises(Exception, match="rope_type 'posenc' needs") as info:  # transformers may wrap it
        tiny_config("llama", rope_parameters={"rope_type": "posenc", "rope_theta": 1e4, "posenc": {"encoding": "x"}})
    assert isinstance(info.value, ValueError) or isinstance(info.value.__cause__, ValueError)


def test_gemma3_multimodal_wrapper_patches_its_language_model(ids, tmp_path, kernel_calls):
    text = tiny_config("gemma3_text")
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ref = logits(model, ids)
    posenc.patch(model, "hope", context_length=32)
    assert model.config.text_config.rope_parameters["full_attention"]["rope_type"] == posenc.hf.POSENC_ROPE_TYPE
    out = logits(model, ids)
    assert kernel_calls and (out - ref).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.equal(logits(reloaded.eval(), ids), out)
    posenc.unpatch(reloaded)
    assert torch.equal(logits(reloaded, ids), ref)


def test_accelerate_hooks_installed_before_patch_still_dispatch(ids, kernel_calls):
    """A model dispatched with accelerate before its family was first patched holds the attention's original
    bound forward in `_old_forward`; patch points it at the dispatching forward."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny_model("qwen3")
    attention = type(model.model.layers[0].self_attn)
    for layer in model.model.layers:
        hooks.add_hook_to_module(layer.self_attn, hooks.ModelHook())
        original = getattr(attention.forward, "_posenc_original", attention.forward)
        layer.self_attn._old_forward = original.__get__(layer.self_attn)  # as if hooked before install
    expected = copy.deepcopy(model)
    hand_mask(expected, nope_rule)
    posenc.patch(model, "nope")
    out = logits(model, ids)
    assert len(kernel_calls) == model.config.num_hidden_layers
    assert (out - logits(expected, ids)).abs().max().item() <= 1e-5
