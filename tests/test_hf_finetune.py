"""Fine-tuning patched tiny models: a plain training loop, gradient checkpointing, and PEFT LoRA with an
adapter that saves and reloads onto a reloaded patched base model."""
import pytest
import torch

from hf_tiny import spy_fused_calls, tiny_model

transformers = pytest.importorskip("transformers")
import posenc  # noqa: E402

CASES = [("llama", "hope", dict(context_length=16)), ("gemma3_text", "prope", dict(p=0.5))]


def train(model, batch, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("family,encoding,kwargs", CASES, ids=[c[0] for c in CASES])
def test_plain_loop_loss_falls(family, encoding, kwargs, monkeypatch):
    calls = spy_fused_calls(monkeypatch)
    model = posenc.patch(tiny_model(family), encoding, **kwargs)
    batch = torch.randint(3, 96, (4, 24))
    losses = train(model, batch, steps=12, lr=3e-3)
    assert calls, "the fused op did not run"
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


def test_gradients_through_kernel_match_transformers():
    """The fused op's backward equals autograd through transformers' own rope (same masked tables)."""
    a, b = tiny_model("gemma3_text"), tiny_model("gemma3_text")
    b.load_state_dict(a.state_dict())
    posenc.patch(a, "hope", context_length=16, kernel=True)
    posenc.patch(b, "hope", context_length=16, kernel=False)
    batch = torch.randint(3, 96, (2, 16))
    for model in (a, b):
        model(input_ids=batch, labels=batch).loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name
    assert a.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing():
    a, b = tiny_model("llama"), tiny_model("llama")
    b.load_state_dict(a.state_dict())
    for model in (a, b):
        posenc.patch(model, "hope", context_length=16)
        model.train()
    b.gradient_checkpointing_enable()
    batch = torch.randint(3, 96, (2, 16))
    for model in (a, b):
        model(input_ids=batch, labels=batch).loss.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family,encoding,kwargs", CASES, ids=[c[0] for c in CASES])
def test_lora_finetune_save_reload(family, encoding, kwargs, tmp_path):
    peft = pytest.importorskip("peft")
    # Larger initial weights than transformers' 0.02: a base model whose logits are not all ~0, so that
    # low-rank updates alone can move the loss (as they do on a pretrained model).
    model = posenc.patch(tiny_model(family, initializer_range=0.2), encoding, **kwargs)
    model.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = peft.get_peft_model(model, lora)
    assert posenc.is_patched(peft_model)
    batch = torch.randint(3, 96, (4, 24))
    losses = train(peft_model, batch, steps=12, lr=2e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        expected = peft_model(input_ids=batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert posenc.is_patched(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, expected)

    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")  # a merged copy keeps the patch too
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert posenc.is_patched(merged)
    with torch.no_grad():
        assert (merged.eval()(input_ids=batch).logits - expected).abs().max().item() <= 1e-4


def test_patch_a_peft_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen3")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    posenc.patch(peft_model, "nope")
    assert posenc.is_patched(model) and model.config.rope_parameters["posenc"]["encoding"] == "nope"
    assert torch.count_nonzero(model.model.rotary_emb.inv_freq) == 0
    posenc.unpatch(peft_model)
    assert not posenc.is_patched(model)
