"""The fused op: the CPU kernel == reference, and the properties every device's op must have (registration
(opcheck), gradients, torch.compile, packed sequences, the hypothesis property test), one test body each,
parametrised by device (helpers.DEVICES: "cuda" skips without a GPU). CUDA-only behaviour is in test_cuda.py."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import posenc
from posenc.ops import rotary_reference
from helpers import (DEVICES, assert_close_to_64, check_packed_varlen, check_random_rotation, op_args,
                     pair_magnitude, random_rotation_strategies, rotate64)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif(not posenc.ops._HAS_CPU_KERNEL, reason="C++ kernel not built")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("tables", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim,pairs", [(64, None, None), (80, 48, 20), (512, None, 64), (128, 128, 0)])
def test_cpu_kernel_equals_reference(dtype, tables, interleaved, head_dim, rotary_dim, pairs):
    args = op_args(head_dim, pairs, rotary_dim, tables, interleaved=interleaved, large=True, scale=1.25)
    q, k = torch.randn(2, 5, 3, head_dim).to(dtype), torch.randn(2, 5, 1, head_dim).to(dtype)
    got = torch.ops.posenc.rotary(q, k, *args)
    want = rotary_reference(q, k, *args)
    for g, w in zip(got, want):
        # Same float32 formula; sin/cos libraries may differ by an ulp, which rounding to float32 can show.
        tol = 0 if dtype in (torch.float16, torch.bfloat16) and tables else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * 8)
    q2, k2 = q.clone(), k.clone()
    torch.ops.posenc.rotary_(q2, k2, *args)
    assert torch.equal(q2, got[0]) and torch.equal(k2, got[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tables", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck(tables, inplace, device):
    args = op_args(64, 24, tables=tables, device=device)
    q = torch.randn(2, 5, 4, 64, device=device, requires_grad=not inplace)
    k = torch.randn(2, 5, 2, 64, device=device, requires_grad=not inplace)
    op = torch.ops.posenc.rotary_.default if inplace else torch.ops.posenc.rotary.default
    torch.library.opcheck(op, (q, k, *args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("kind", ["rope", "hope"])
def test_gradcheck_float64(interleaved, kind, device):
    enc = posenc.get_encoding(kind, head_dim=32, interleaved=interleaved,
                              **({"context_length": 64} if kind == "hope" else {})).to(device)
    positions = torch.randint(0, 100_000, (2, 1), device=device) + torch.arange(3, device=device)
    q = torch.randn(2, 3, 2, 32, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(2, 3, 1, 32, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: enc.apply(a, b, positions), (q, k))
    assert torch.autograd.gradgradcheck(lambda a, b: enc.apply(a, b, positions), (q, k))


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_records_exactly_when_it_must(device):
    """The op's autograd kernel skips the Function where nothing records (inference, the backward's own call):
    outputs then have no history; with grad they do, also for k alone; and forward-mode AD (dual tensors, which
    need no requires_grad) is refused, never answered with its tangents dropped."""
    import torch.autograd.forward_ad as fwAD
    enc = posenc.RoPE(16).to(device)
    q, k = torch.randn(1, 3, 2, 16, device=device), torch.randn(1, 3, 1, 16, device=device)
    assert all(t.grad_fn is None and not t.requires_grad for t in enc.apply(q, k))
    with torch.no_grad():
        assert all(t.grad_fn is None for t in enc.apply(q.requires_grad_(), k))
    qo, ko = enc.apply(q.detach(), k.detach().requires_grad_())
    assert qo.grad_fn is not None and ko.grad_fn is not None
    with fwAD.dual_level():
        dual = fwAD.make_dual(q.detach(), torch.randn_like(q))
        with pytest.raises(RuntimeError, match="jvp"):
            enc.apply(dual, k.detach())


def test_inplace_inside_autograd():
    enc = posenc.RoPE(64)
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(2, 5, 3, 64)
    positions = torch.arange(5)

    def loss(inplace):
        q = x @ w
        k = (x @ w)[:, :, :1]
        version = q._version
        q2, k2 = enc.apply(q, k.clone(), positions, inplace=inplace)
        if inplace:
            assert q2 is q and q._version > version  # autograd was told about the write
        return (q2.square() * torch.arange(64.0)).sum() + k2.sum()

    g_out = torch.autograd.grad(loss(False), w)[0]
    g_in = torch.autograd.grad(loss(True), w)[0]
    torch.testing.assert_close(g_in, g_out)


def test_backward_matches_float64_transpose():
    enc = posenc.PRoPE(64, p=0.5)
    positions = torch.tensor([[7, 90_000, 3]])
    q = torch.randn(1, 3, 2, 64, requires_grad=True)
    k = torch.randn(1, 3, 1, 64, requires_grad=True)
    gq, gk = torch.randn(1, 3, 2, 64), torch.randn(1, 3, 1, 64)
    q2, k2 = enc.apply(q, k, positions)
    torch.autograd.backward([q2, k2], [gq, gk])
    inv = enc.inv_freq64
    # The transpose of a rotation by +theta is the rotation by -theta.
    want_q = rotate64(gq, -positions, inv)
    assert_close_to_64(q.grad, want_q, gq, torch.float32)
    assert_close_to_64(k.grad, rotate64(gk, -positions, inv), gk, torch.float32)


# Inductor on the GPU (what users compile with there); aot_eager on the CPU, which still traces the op through
# its fake and autograd registrations but spares CI (2 cores) inductor's C++ compile of the CPU code.
COMPILE_BACKEND = {"cpu": "aot_eager", "cuda": "inductor"}


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    enc = posenc.HoPE(128, context_length=1024).to(device)

    def f(q, k, positions):
        q2, k2 = enc.apply(q, k, positions)
        return (q2 * 2).sum(-1), k2 + 1

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND[device])
    q = torch.randn(2, 6, 4, 128, device=device, requires_grad=True)
    k = torch.randn(2, 6, 2, 128, device=device)
    positions = torch.randint(0, 50_000, (2, 6), device=device)
    for a, b in zip(compiled(q, k, positions), f(q, k, positions)):
        torch.testing.assert_close(a, b)
    compiled(q, k, positions)[0].sum().backward()
    g_compiled = q.grad.clone()
    q.grad = None
    f(q, k, positions)[0].sum().backward()
    torch.testing.assert_close(g_compiled, q.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_encoding", [lambda: posenc.RoPE(64), lambda: posenc.HoPE(64, context_length=512)],
                         ids=["rope", "hope"])
def test_packed_varlen_equals_per_sequence(make_encoding, device):
    check_packed_varlen(make_encoding(), device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_tables_match_apply_rotary_pos_emb(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    enc = posenc.RoPE(64)
    positions = torch.randint(0, 4000, (2, 1)) + torch.arange(7)
    cos, sin = enc.cos_sin(positions, dtype=dtype)  # [b, s, 64] as transformers builds them
    q, k = torch.randn(2, 4, 7, 64).to(dtype), torch.randn(2, 1, 7, 64).to(dtype)  # bhsd, as HF passes
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours = posenc.apply_rotary(q, k, cos, sin, layout="bhsd")
    for x, hf, o in ((q, hf_q, ours[0]), (k, hf_k, ours[1])):
        exact = rotate64(x, positions, enc.inv_freq64, layout="bhsd")
        # fp32 math on the same tables, one rounding at the end: on average no further from float64 than
        # transformers' own arithmetic, which rounds after every step (the worst element of either is
        # dominated by the final rounding, so compare means); dtype tables carry one rounding step, hence 4.
        assert (o.double() - exact).abs().mean() <= (hf.double() - exact).abs().mean()
        assert_close_to_64(o, exact, x, dtype, factor=4.0)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**random_rotation_strategies())
def test_property_random_shapes_and_strides(device, **case):
    check_random_rotation(device, **case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_special_values_convert_exactly(dtype):
    """The kernels' own float16/bfloat16 conversions (branch-free, for vectorisation) on subnormals, the
    largest finite values, signed zeros, inf and NaN: position 0 is the identity; others match the reference."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.smallest_normal / 3, info.max,
                            -info.max, info.eps, 1.0, float("inf"), -float("inf"), float("nan")], dtype=dtype)
    values = torch.cat([special, torch.randn(51).to(dtype)])  # 64 channels
    q = values[torch.randperm(64)].view(1, 1, 1, 64).repeat(1, 3, 2, 1)
    k = values.view(1, 1, 1, 64).repeat(1, 3, 1, 1)
    enc = posenc.RoPE(64)
    q2, k2 = enc.apply(q, k, torch.tensor([0, 0, 0]))
    # angle 0: x1*1 - x2*0 is x1 unless x2 is inf/NaN (inf * 0 = NaN), exactly as the reference computes it
    args = (None, None, enc.inv_freq64, torch.zeros(1, 3, dtype=torch.long), 1.0, 64, 32, False, False)
    ref = rotary_reference(q, k, *args)
    for got, want in zip((q2, k2), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    finite_pairs = torch.isfinite(k[..., :32]) & torch.isfinite(k[..., 32:])
    assert torch.equal(k2[..., :32][finite_pairs], k[..., :32][finite_pairs])  # the round trip is exact
    q3, k3 = enc.apply(q, k, torch.tensor([5, 7_000, 123_456]))
    for x, got, want in zip((q, k), (q3, k3), rotary_reference(q, k, *args[:3], torch.tensor([[5, 7_000, 123_456]]),
                                                            *args[4:])):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = torch.isfinite(want)  # sin/cos libraries may differ by an ulp: two rounding steps of the pair
        bound = 2 * info.eps * pair_magnitude(x).to(got.dtype).float()
        assert ((got.float() - want.float()).abs() <= bound)[finite].all()


def test_fast_path_matches_the_full_path_and_refuses_the_same():
    """apply_rotary's common call (out of place, float64 inv_freq) takes a short path; it must hand the op the same
    arguments as the full path, and every input it does not accept must reach the full path's checks."""
    from posenc import ops
    inv = 10_000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    q, k = torch.randn(3, 6, 4, 32), torch.randn(3, 6, 2, 32)
    pos2 = torch.randint(0, 1000, (3, 6))
    cases = [dict(), dict(positions=pos2), dict(positions=pos2[:1]), dict(positions=pos2[0]),
             dict(positions=pos2[0].int()), dict(rotated_pairs=5, scale=1.5), dict(rotary_dim=16, inverse=True),
             dict(interleaved=True, positions=pos2)]
    for kw in cases:
        want_pos = kw.get("positions", torch.arange(6))
        want_pos = want_pos.long().reshape(-1, 6).expand(3, 6)
        rd = kw.get("rotary_dim", 32)
        args = (None, None, inv[: rd // 2].contiguous(), want_pos, float(kw.get("scale", 1.0)), rd,
                kw.get("rotated_pairs", rd // 2), kw.get("interleaved", False), kw.get("inverse", False))
        want = rotary_reference(q, k, *args)
        call = {**kw, "inv_freq": args[2]}
        for got in (ops.apply_rotary(q, k, **call),
                    [t.transpose(1, 2) for t in ops.apply_rotary(q.transpose(1, 2), k.transpose(1, 2),
                                                                 layout="bhsd", **call)]):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-6)
    # what the short path leaves to the op's own checks, which the full path then accepts (converting) ...
    for kw in (dict(inv_freq=inv.float()), dict(inv_freq=torch.stack([inv, inv], 1)[:, 0]),
               dict(inv_freq=inv, positions=pos2.int())):
        want = rotary_reference(q, k, None, None, kw["inv_freq"].double(), pos2, 1.0, 32, 16, False, False)
        got = ops.apply_rotary(q, k, **{"positions": pos2, **kw})
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-6)
    cos64, sin64 = (torch.randn(1, 6, 32, dtype=torch.float64) for _ in range(2))
    got = ops.apply_rotary(q, k, cos64, sin64)
    for g, w in zip(got, rotary_reference(q, k, cos64[0, :, :16].float(), sin64[0, :, :16].float(), None,
                                           torch.arange(6).expand(3, 6), 1.0, 32, 16, False, False)):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-6)
    # ... or refuses, naming the argument (the dispatcher sends any call with a meta tensor to the fake kernel)
    meta = torch.device("meta")
    for kw, msg in [(dict(inv_freq=inv.to(meta)), "inv_freq must be on q's device"),
                    (dict(inv_freq=inv, positions=pos2.to(meta)), "positions must be on q's device"),
                    (dict(cos=cos64.to(meta), sin=sin64.to(meta)), "cos must be on q's device")]:
        with pytest.raises(ValueError, match=msg):
            ops.apply_rotary(q, k, **kw)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.apply_rotary(q.int(), k.int(), inv_freq=inv)
    # the default positions are cached, and outputs never alias them or the inputs
    a = ops.apply_rotary(q, k, inv_freq=inv)
    b = ops.apply_rotary(q, k, inv_freq=inv)
    assert a[0].data_ptr() != b[0].data_ptr() and torch.equal(a[0], b[0])
    bad = [(dict(inv_freq=inv[:-1]), ValueError, "inv_freq must be"),
           (dict(inv_freq=inv, positions=pos2.float()), TypeError, "positions must be an integer"),
           (dict(inv_freq=inv, positions=pos2[:, :5]), ValueError, "positions must be shaped"),
           (dict(inv_freq=inv, rotary_dim=31), ValueError, "rotary_dim must be even"),
           (dict(inv_freq=inv, rotated_pairs=17), ValueError, "rotated_pairs must be in"),
           (dict(inv_freq=inv, scale=float("nan")), ValueError, "scale must be a finite"),
           (dict(inv_freq=inv, layout="bsdh"), ValueError, "layout must be"),
           (dict(inv_freq=inv, positions=torch.tensor([[2**40] * 6] * 3)), ValueError, "2\\^28")]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            ops.apply_rotary(q, k, **kw)
    cos, sin = torch.randn(1, 6, 32).bfloat16(), torch.randn(1, 6, 32).bfloat16()
    for kw, exc, msg in [(dict(cos=cos.requires_grad_(), sin=sin), ValueError, "requires grad"),
                         (dict(cos=cos.detach(), sin=sin[..., :16]), ValueError, "same shape"),
                         (dict(cos=cos.detach()[..., :8], sin=sin[..., :8]), ValueError, "must end in"),
                         (dict(cos=cos.detach()[:, :5], sin=sin[:, :5]), ValueError, "one row per token"),
                         (dict(cos=cos.detach().int(), sin=sin.int()), TypeError, "cos must be a float")]:
        with pytest.raises(exc, match=msg):
            ops.apply_rotary(q, k, **kw)
    with pytest.raises(TypeError, match="same dtype"):
        ops.apply_rotary(q, k.double(), inv_freq=inv)
    with pytest.raises(ValueError, match="agree on"):
        ops.apply_rotary(q, k[:, :5], inv_freq=inv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_short_paths_refuse_mixed_devices_naming_the_argument():
    """The short paths leave devices to the op; a CPU argument with CUDA q and k (or the reverse) must still end
    in the full path's message, and an encoding follows the data instead."""
    q, k = torch.randn(2, 3, 4, 32, device="cuda"), torch.randn(2, 3, 2, 32, device="cuda")
    inv = 10_000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    cos, sin = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    for call, msg in [(lambda: posenc.apply_rotary(q, k, inv_freq=inv), "inv_freq must be on q's device"),
                      (lambda: posenc.apply_rotary(q, k, inv_freq=inv.cuda(), positions=torch.arange(3)),
                       "positions must be on q's device"),
                      (lambda: posenc.apply_rotary(q, k, cos, sin), "cos must be on q's device"),
                      (lambda: posenc.apply_rotary(q.cpu(), k.cpu(), cos.cuda(), sin.cuda()), "cos must be on q's device"),
                      (lambda: posenc.apply_rotary(q, k.cpu(), inv_freq=inv.cuda()), "same device")]:
        with pytest.raises(ValueError, match=msg):
            call()
    enc = posenc.RoPE(32)  # on the CPU: moves to q's GPU on the first call
    for got, want in zip(enc.apply(q, k), posenc.apply_rotary(q, k, inv_freq=inv.cuda())):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["rotary", "rotary_"])
def test_op_refuses_a_meta_argument_with_cpu_data(op):
    """A call with any meta tensor goes to the fake kernel (meta outranks the other devices): with q and k on
    the CPU and meta positions or frequencies, it must refuse, not hand back uninitialised CPU tensors."""
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    inv, pos = torch.ones(4, dtype=torch.float64), torch.arange(3).expand(1, 3)
    meta = torch.device("meta")
    for args, culprit in [((None, None, inv.to(meta), pos), "inv_freq"), ((None, None, inv, pos.to(meta)), "positions"),
                          ((torch.ones(3, 4, device=meta), torch.ones(3, 4, device=meta), None, pos), "cos"),
                          ((None, None, inv, pos), "k")]:
        kk = k.to(meta) if culprit == "k" else k
        with pytest.raises(ValueError, match=f"q is on cpu, {culprit} on meta"):
            getattr(torch.ops.posenc, op)(q, kk, *args, 1.0, 8, 4, False, False)


@pytest.mark.skipif(not posenc.ops._HAS_CPU_KERNEL, reason="C++ kernel not built")
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_reads_half_tables_exactly(table_dtype):
    """bfloat16/float16 tables (strided views) give the bits of the same tables converted to float32 first,
    out of place and in place (float16 subnormals, infinities and NaN included)."""
    full = torch.randn(9, 32).to(table_dtype)
    if table_dtype == torch.float16:
        full[0, :4] = torch.tensor([6e-8, -3e-6, float("inf"), float("nan")], dtype=table_dtype)
    cos, sin = full[:, :16], full.flip(0)[:, :16]
    pos = torch.randint(0, 9, (2, 4))
    q, k = torch.randn(2, 4, 3, 32).bfloat16(), torch.randn(2, 4, 1, 32).bfloat16()
    rest = (None, pos, 1.25, 32, 16, False, False)
    got = torch.ops.posenc.rotary(q, k, cos, sin, *rest)
    want = torch.ops.posenc.rotary(q, k, cos.float(), sin.float(), *rest)
    ref = rotary_reference(q, k, cos.float(), sin.float(), *rest)
    qi, ki = q.clone(), k.clone()
    torch.ops.posenc.rotary_(qi, ki, cos, sin, *rest)
    for g, w, r, i in zip(got, want, ref, (qi, ki)):
        assert torch.equal(g.view(torch.int16), w.view(torch.int16)) and torch.equal(i.view(torch.int16), g.view(torch.int16))
        torch.testing.assert_close(g, r, equal_nan=True)  # (NaN's sign bits may differ)
    with pytest.raises(TypeError, match="one dtype"):
        torch.ops.posenc.rotary(q, k, cos, sin.float(), *rest)


def test_per_token_tables_are_read_without_copies():
    """transformers' per-token cos/sin (model dtype, [1 or batch, seq, head_dim], halves duplicated, batch stride
    0 from an expand, or a row per token as per-row positions give) reach the op as views: no dtype conversion, no copy, no allocation but the outputs; the
    result equals the float64 rotation with the same tables."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    B, S, D = 3, 7, 32
    angle = (torch.arange(S, dtype=torch.float64)[:, None] * 0.37 ** torch.arange(D // 2)).repeat(1, 2)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = torch.randn(B, 4, S, D).to(dtype)  # bhsd, as transformers passes
        k = torch.randn(B, 2, S, D).to(dtype)
        rows = angle + 11.0 * torch.arange(B, dtype=torch.float64)[:, None, None]  # per-row positions
        for cos, sin in ((angle.cos().to(dtype)[None], angle.sin().to(dtype)[None]),
                         (angle.cos().to(dtype).expand(B, S, D), angle.sin().to(dtype).expand(B, S, D)),
                         (rows.cos().to(dtype), rows.sin().to(dtype)),
                         (rows.cos().to(dtype)[:, :1], rows.sin().to(dtype)[:, 3:4])):  # decoding, strided
            seq = cos.shape[1]
            qs, ks = q[:, :, :seq], k[:, :, :seq]
            posenc.apply_rotary(qs, ks, cos, sin, layout="bhsd")  # warm the cached positions
            mode = Ops()
            mode.seen = []
            with mode:
                qo, ko = posenc.apply_rotary(qs, ks, cos, sin, layout="bhsd")
            assert [op for op in mode.seen if op not in ("aten.select", "aten.slice", "aten.transpose",
                                                         "aten.expand", "aten.unsqueeze", "aten.view")] \
                == ["posenc.rotary"], mode.seen
            for x, out in ((qs, qo), (ks, ko)):
                c, s = cos.double()[:, None], sin.double()[:, None]
                xd = x.double()
                want = xd * c + torch.cat([-xd[..., D // 2:], xd[..., : D // 2]], -1) * s
                assert (out.double() - want).abs().max() <= 2 * torch.finfo(dtype).eps * want.abs().max()
