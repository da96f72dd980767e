"""Bad input raises ValueError/TypeError that names the argument and says what was expected."""
import pytest
import torch

import posenc

q = torch.randn(2, 5, 4, 64)
k = torch.randn(2, 5, 2, 64)
enc = posenc.RoPE(64)
table = torch.randn(100, 64)


def call(**over):
    args = dict(q=q, k=k, positions=None)
    args.update(over)
    return enc.apply(args.pop("q"), args.pop("k"), args.pop("positions"), **args)


CASES = [
    ("odd head_dim", ValueError, "head_dim", lambda: posenc.RoPE(63)),
    ("head_dim too large", ValueError, "head_dim", lambda: posenc.RoPE(1024)),
    ("rotary_dim > head_dim", ValueError, "rotary_dim", lambda: posenc.RoPE(64, rotary_dim=128)),
    ("odd rotary_dim", ValueError, "rotary_dim", lambda: posenc.RoPE(64, rotary_dim=31)),
    ("p = 0", ValueError, "p must", lambda: posenc.PRoPE(64, p=0.0)),
    ("p > 1", ValueError, "p must", lambda: posenc.PRoPE(64, p=1.5)),
    ("context_length = 0", ValueError, "context_length", lambda: posenc.HoPE(64, context_length=0)),
    ("context_length < 0", ValueError, "context_length", lambda: posenc.HoPE(64, context_length=-5)),
    ("base <= 1", ValueError, "base", lambda: posenc.RoPE(64, base=1.0)),
    ("unknown encoding", ValueError, "unknown encoding", lambda: posenc.get_encoding("alibi", head_dim=64)),
    ("unknown rope type", ValueError, "rope_type", lambda: posenc.RoPE(64, scaling={"rope_type": "ntk-by-parts"})),
    ("rope type missing a parameter", ValueError, "factor", lambda: posenc.RoPE(64, scaling={"rope_type": "linear"})),
    ("rope type with a stray parameter", ValueError, "unexpected", lambda: posenc.RoPE(64, scaling={"rope_type": "linear", "factor": 2, "beta": 1})),
    ("q/k batch", ValueError, "batch", lambda: call(k=torch.randn(3, 5, 2, 64))),
    ("q/k seq", ValueError, "seq", lambda: call(k=torch.randn(2, 6, 2, 64))),
    ("q/k head_dim", ValueError, "head_dim", lambda: call(k=torch.randn(2, 5, 2, 32))),
    ("q not 4-D", ValueError, "q must", lambda: call(q=torch.randn(5, 4, 64))),
    ("q/k dtype", TypeError, "dtype", lambda: call(k=k.half())),
    ("integer q", TypeError, "q must be a float", lambda: call(q=q.long(), k=k.long())),
    ("q not a tensor", TypeError, "q must be a torch.Tensor", lambda: posenc.apply_rotary([1.0], k, inv_freq=enc.inv_freq)),
    ("positions shape", ValueError, "positions must be shaped", lambda: call(positions=torch.arange(7))),
    ("positions 3-D", ValueError, "positions must be shaped", lambda: call(positions=torch.zeros(2, 5, 1, dtype=torch.long))),
    ("float positions", TypeError, "positions must be an integer", lambda: call(positions=torch.arange(5.0))),
    ("bool positions", TypeError, "positions must be an integer", lambda: call(positions=torch.ones(5, dtype=torch.bool))),
    ("positions on another device", ValueError, "positions must be on", lambda: call(positions=torch.arange(5, device="meta"))),
    ("q/k on different devices", ValueError, "same device", lambda: call(k=torch.empty(2, 5, 2, 64, device="meta"))),
    ("bad layout", ValueError, "layout", lambda: call(layout="sbhd")),
    ("cos/sin wrong width", ValueError, "cos must end", lambda: posenc.apply_rotary(q, k, table[:, :50], table[:, :50], torch.arange(5))),
    ("cos/sin shapes differ", ValueError, "same shape", lambda: posenc.apply_rotary(q, k, table, table[:50], torch.arange(5))),
    ("per-token cos/sin wrong rows", ValueError, "without positions", lambda: posenc.apply_rotary(q, k, table[:7], table[:7])),
    ("positions beyond the table", ValueError, "positions must lie in", lambda: posenc.apply_rotary(q, k, table, table, torch.arange(5) + 96)),
    ("negative positions with a table", ValueError, "positions must lie in", lambda: posenc.apply_rotary(q, k, table, table, torch.arange(5) - 1)),
    ("cos and inv_freq both", ValueError, "not both", lambda: posenc.apply_rotary(q, k, table, table, torch.arange(5), inv_freq=enc.inv_freq)),
    ("no angle source", ValueError, "inv_freq", lambda: posenc.apply_rotary(q, k)),
    ("inv_freq wrong size", ValueError, "inv_freq must be", lambda: posenc.apply_rotary(q, k, inv_freq=enc.inv_freq[:10])),
    ("rotated_pairs too many", ValueError, "rotated_pairs", lambda: posenc.apply_rotary(q, k, inv_freq=enc.inv_freq, rotated_pairs=33)),
    ("cos requiring grad", ValueError, "cos requires grad", lambda: posenc.apply_rotary(q, k, table.clone().requires_grad_(), table, torch.arange(5))),
    ("bad cu_seqlens", ValueError, "cu_seqlens", lambda: enc.apply(q[0], k[0], cu_seqlens=torch.tensor([0, 2, 4]))),
    ("float cu_seqlens", TypeError, "cu_seqlens", lambda: enc.apply(q[0], k[0], cu_seqlens=torch.tensor([0.0, 5.0]))),
    ("encoding head_dim mismatch", ValueError, "head_dim=64", lambda: enc.apply(torch.randn(2, 5, 4, 32), torch.randn(2, 5, 2, 32))),
    ("name not a string", TypeError, "encoding name", lambda: posenc.get_encoding(3, head_dim=64)),
]


@pytest.mark.parametrize("what,error,message,fn", CASES, ids=[c[0] for c in CASES])
def test_bad_input(what, error, message, fn):
    with pytest.raises(error, match=message):
        fn()


@pytest.mark.parametrize("value,error", [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)])
def test_generate_max_new_tokens(value, error):
    model = posenc.TinyDecoder(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(error, match="max_new_tokens"):
        model.generate(torch.randint(0, 32, (1, 4)), max_new_tokens=value)
    assert model.generate(torch.randint(0, 32, (1, 4)), max_new_tokens=0).shape == (1, 4)


def test_inplace_on_leaf_that_requires_grad():
    leaf = torch.randn(2, 5, 4, 64, requires_grad=True)
    with pytest.raises(ValueError, match="inplace=True cannot write into q"):
        enc.apply(leaf, k.clone(), inplace=True)
