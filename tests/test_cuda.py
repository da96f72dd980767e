"""The CUDA kernel's own checks: == the reference (CPU) and == float64 over its launch shapes (short inputs,
long ones through the load-ahead paths, decode) and its vector and scalar paths; in place, channels that do not
rotate keep their bits; CUDA's sin/cos tolerance (scale, inverse, float64); GPU positions, which go unchecked;
its refusals and tables in the model's dtype; CUDA-graph capture and non-default streams. Skipped without CUDA.
The properties every device shares (opcheck, gradients, torch.compile, packed sequences, the hypothesis
property test) are test_ops.py's, one body each parametrised by device.

Tolerance: twice one rounding step (eps) of the output dtype, relative to the pair's magnitude |x1| + |x2|
(helpers.assert_close_to_64). In table mode the float64 expectation uses the float32 table values, so
that bound holds there too.
"""
import itertools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

import posenc  # noqa: E402
from posenc.ops import rotary_reference  # noqa: E402
from helpers import (assert_close_to_64, masked_inv_freq, op_args, rotary_configs, rotate64,  # noqa: E402
                     rotate64_tables, rotated_mask)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"


@pytest.fixture(autouse=True, scope="module")
def _needs_cuda_kernel():
    if not posenc.ops._HAS_CUDA_KERNEL:
        pytest.fail(f"CUDA is available but the CUDA kernel is not registered: {posenc.backend('cuda')}")
    yield


_TABLES = {}


def table(rotary_dim, pairs, rows):
    """float32 cos/sin [rows, rotary_dim/2] built on the GPU in float64 (cached: tables reach 1.3e5 rows)."""
    key = (rotary_dim, pairs, rows)
    if key not in _TABLES:
        angle = torch.arange(rows, dtype=torch.float64, device=DEV)[:, None] * masked_inv_freq(rotary_dim, pairs).to(DEV)
        _TABLES[key] = (angle.cos().float(), angle.sin().float())
    return _TABLES[key]


CASES = [
    (dtype, layout, d, *cfg)
    for dtype, layout, d in itertools.product(DTYPES, ["bshd", "bhsd"], [64, 80, 128, 256, 512])
    for cfg in rotary_configs(d)
]


# Positions per batch row, or one [seq] row shared by the batch (what the default positions and transformers'
# position_ids give; the op then sees a batch stride of 0).
@pytest.mark.parametrize("shared_positions", [False, True], ids=["row_positions", "shared_positions"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tables", [False, True])
@pytest.mark.parametrize("dtype,layout,head_dim,name,rotary_dim,pairs,heads", CASES)
def test_cuda_equals_reference_and_float64(dtype, layout, head_dim, name, rotary_dim, pairs, heads, tables,
                                           interleaved, shared_positions):
    check_against_reference(dtype, layout, head_dim, rotary_dim, pairs, heads, tables, interleaved, 3, 7,
                            shared_positions)


# Long enough inputs (thousands of tokens) make the launch put whole tokens in each block, which switches on
# the kernel's loads ahead of use: every thread's first unit before the cos/sin phase and, out of place when
# some channels only copy, each next unit before the current one (the pipelined kernels). The short inputs
# above mostly split a token's heads over blocks, which turns both off.
LONG_CASES = [
    (torch.bfloat16, 128, 128, 64, (8, 2), False),   # Llama-like RoPE
    (torch.bfloat16, 128, 128, 46, (8, 2), False),   # HoPE cut inside a 16-byte chunk
    (torch.bfloat16, 512, 512, 64, (4, 1), False),   # Gemma 4 global layers: p-RoPE 0.25
    (torch.float16, 128, 64, 32, (4, 1), False),     # partial rotary: a tail that only copies
    (torch.float32, 128, 128, 40, (4, 2), False),
    (torch.bfloat16, 128, 128, 46, (8, 2), True),    # interleaved
    (torch.float32, 256, 256, 100, (2, 1), True),
]


@pytest.mark.parametrize("shared_positions", [False, True], ids=["row_positions", "shared_positions"])
@pytest.mark.parametrize("tables", [False, True])
@pytest.mark.parametrize("dtype,head_dim,rotary_dim,pairs,heads,interleaved", LONG_CASES)
def test_long_inputs_through_the_load_ahead_paths(dtype, head_dim, rotary_dim, pairs, heads, interleaved, tables,
                                                  shared_positions):
    batch, seq = (3, 1024) if shared_positions else (2, 1536)
    check_against_reference(dtype, "bshd", head_dim, rotary_dim, pairs, heads, tables, interleaved, batch, seq,
                            shared_positions)


def check_against_reference(dtype, layout, head_dim, rotary_dim, pairs, heads, tables, interleaved, batch, seq,
                            shared_positions=False):
    """Out of place == float64 and == the CPU reference; in place == out of place, bit for bit, leaving
    channels that do not rotate exactly as they were. Positions differ per batch row, or (shared_positions)
    are one [seq] row for the whole batch."""
    hq, hk = heads

    def make(h):
        shape = (batch, seq, h, head_dim) if layout == "bshd" else (batch, h, seq, head_dim)
        return torch.randn(shape, device=DEV).to(dtype)

    q, k = make(hq), make(hk)
    if shared_positions:
        positions = (torch.randint(0, 130_000, (1,), device=DEV) + torch.arange(seq, device=DEV)).expand(batch, seq)
        pos_arg = positions[0]  # [seq]: the op sees it expanded over the batch, stride 0
    else:
        positions = torch.randint(0, 130_000, (batch, 1), device=DEV) + torch.arange(seq, device=DEV)
        positions[0] = torch.randint(0, 64, (1,)).item() + torch.arange(seq, device=DEV)  # and a small row
        pos_arg = positions
    inv = masked_inv_freq(rotary_dim, pairs)
    kw = dict(rotary_dim=rotary_dim, rotated_pairs=pairs, interleaved=interleaved, layout=layout)
    if tables:
        cos, sin = table(rotary_dim, pairs, 130_000 + seq)
        src = dict(cos=cos, sin=sin)
        c_tok, s_tok = cos[positions][..., :rotary_dim // 2], sin[positions][..., :rotary_dim // 2]
    else:
        src = dict(inv_freq=inv.to(DEV))
    q0, k0 = q.clone(), k.clone()

    # out of place
    q2, k2 = posenc.apply_rotary(q, k, positions=pos_arg, **src, **kw)
    assert torch.equal(q, q0) and torch.equal(k, k0), "out of place must leave its inputs untouched"
    assert q2.shape == q.shape and k2.shape == k.shape and q2.dtype == dtype

    # == the float64 computation (independent of posenc)
    for x, out in ((q0, q2), (k0, k2)):
        if tables:
            want = rotate64_tables(x, c_tok, s_tok, rotary_dim, interleaved, layout)
        else:
            want = rotate64(x.cpu(), positions.cpu(), inv, rotary_dim, interleaved, layout)
        assert_close_to_64(out.cpu(), want, x.cpu(), dtype, rotary_dim, interleaved, layout)

    # == the reference (the specification), run on the CPU with the same inputs
    to4 = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    if tables:  # the rows this batch uses, gathered, so the CPU reference needs no 1e5-row table
        flat = positions.flatten()
        ref_args = (cos[flat].cpu(), sin[flat].cpu(), None,
                    torch.arange(flat.numel()).view(batch, seq))
    else:
        ref_args = (None, None, inv, positions.cpu())
    ref = rotary_reference(to4(q0).cpu(), to4(k0).cpu(), *ref_args, 1.0, rotary_dim, pairs, interleaved, False)
    for x, out, r in ((q0, q2, ref[0]), (k0, k2, ref[1])):
        # Same float32 formula; sin/cos libraries and fused multiply-adds may differ in the last bits of the
        # float32 result, which the output rounding can turn into one step of the output dtype.
        assert_close_to_64(to4(out).cpu(), r.double(), to4(x).cpu(), dtype, rotary_dim, interleaved)

    # in place: same numbers, bit for bit, and channels that do not rotate are left exactly as they were
    qi, ki = q0.clone(), k0.clone()
    q3, k3 = posenc.apply_rotary(qi, ki, positions=pos_arg, inplace=True, **src, **kw)
    assert q3 is qi and k3 is ki
    assert torch.equal(qi, q2) and torch.equal(ki, k2)
    keep = ~rotated_mask(head_dim, rotary_dim, pairs, interleaved).to(DEV)
    assert torch.equal(qi[..., keep], q0[..., keep]) and torch.equal(ki[..., keep], k0[..., keep])


def test_inplace_keeps_unrotated_channels_bit_for_bit():
    """NaN bit patterns in channels that do not rotate must survive in place (where they share a 16-byte block
    with rotating channels, as pairs 46 and 47 here do, they are read and written back unchanged)."""
    head_dim, pairs = 128, 46
    q = torch.randn(2, 9, 4, head_dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 9, 1, head_dim, device=DEV, dtype=torch.bfloat16)
    keep = ~rotated_mask(head_dim, head_dim, pairs, False).to(DEV)
    q[..., keep] = float("nan")
    bits = q.view(torch.int16).clone()
    posenc.apply_rotary(q, k, inv_freq=masked_inv_freq(head_dim, pairs).to(DEV), rotated_pairs=pairs, inplace=True)
    assert torch.equal(q.view(torch.int16)[..., keep], bits[..., keep])
    assert not q[..., ~keep].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scale_and_inverse(dtype):
    head_dim = 64
    q = torch.randn(2, 5, 3, head_dim, device=DEV, dtype=dtype)
    k = torch.randn(2, 5, 1, head_dim, device=DEV, dtype=dtype)
    positions = torch.randint(0, 200_000, (2, 5), device=DEV)
    inv = masked_inv_freq(head_dim, head_dim // 2)
    for inverse in (False, True):
        q2, k2 = posenc.apply_rotary(q, k, positions=positions, inv_freq=inv.to(DEV), scale=1.25, inverse=inverse)
        if dtype == torch.float64:
            # float64 storage computes in float64: compare with the reference, which forms its angles the
            # same way (the float64 product and its reduction modulo 2*pi), not with the unreduced angle
            want = rotary_reference(q.cpu(), k.cpu(), None, None, inv, positions.cpu(), 1.25, head_dim,
                                    head_dim // 2, False, inverse)
        else:
            want = [rotate64(x.cpu(), (-1 if inverse else 1) * positions.cpu(), inv, scale=1.25) for x in (q, k)]
        # The output is 1.25x the pair magnitude: two rounding steps of that. For float64 both sides carry
        # their sin/cos library's error, up to 2 ulp on CUDA (CUDA Math API) and 1 on the CPU, on top of the
        # rounding of each product: four steps.
        steps = 4.0 if dtype == torch.float64 else 2.0
        for x, out, w in ((q, q2, want[0]), (k, k2, want[1])):
            assert_close_to_64(out.cpu(), w.double(), x.cpu() * 1.25, dtype, factor=steps)


def test_views_sliced_heads_and_odd_offsets():
    """Non-contiguous head strides (vector path) and odd channel offsets (scalar path)."""
    base = torch.randn(2, 6, 10, 136, device=DEV, dtype=torch.bfloat16)
    positions = torch.randint(0, 5000, (2, 6), device=DEV)
    inv = masked_inv_freq(128, 40)
    for q in (base[:, :, 2:8, :128], base[:, :, :4, 1:129], base.transpose(1, 2)[:, 1:7, :, 8:136].transpose(1, 2)):
        k = q[:, :, :1]
        q2, k2 = posenc.apply_rotary(q, k, positions=positions, inv_freq=inv.to(DEV), rotated_pairs=40)
        for x, out in ((q, q2), (k, k2)):
            assert_close_to_64(out.cpu(), rotate64(x.cpu(), positions.cpu(), inv), x.cpu(), torch.bfloat16)


def test_decode_per_row_positions():
    enc = posenc.RoPE(128)
    q = torch.randn(64, 1, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(64, 1, 8, 128, device=DEV, dtype=torch.bfloat16)
    positions = torch.randint(0, 100_000, (64, 1), device=DEV)
    q2, k2 = enc.apply(q, k, positions)
    for x, out in ((q, q2), (k, k2)):
        assert_close_to_64(out.cpu(), rotate64(x.cpu(), positions.cpu(), enc.inv_freq64.cpu()), x.cpu(), torch.bfloat16)


def test_table_position_out_of_range_gives_nan_not_a_read():
    """The Python entry point rejects such positions; the raw op (as under capture) must not read outside."""
    cos, sin = table(64, 32, 16)
    q = torch.randn(1, 3, 2, 64, device=DEV)
    k = torch.randn(1, 3, 1, 64, device=DEV)
    positions = torch.tensor([[0, 16, 1 << 40]], device=DEV)
    q2, k2 = torch.ops.posenc.rotary(q, k, cos, sin, None, positions, 1.0, 64, 32, False, False)
    assert q2[0, 1:].isnan().all() and k2[0, 1:].isnan().all()
    assert not q2[0, 0].isnan().any()
    with pytest.raises(ValueError, match="positions"):
        posenc.apply_rotary(q, k, cos, sin, positions)


@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graph_capture_and_replay(inplace):
    enc = posenc.PRoPE(128, p=0.25)
    static_q = torch.randn(2, 8, 8, 128, device=DEV, dtype=torch.bfloat16)
    static_k = torch.randn(2, 8, 2, 128, device=DEV, dtype=torch.bfloat16)
    static_pos = torch.randint(0, 1000, (2, 8), device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (moves the encoding to the GPU)
        enc.apply(static_q.clone(), static_k.clone(), static_pos, inplace=inplace)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = enc.apply(static_q, static_k, static_pos, inplace=inplace)
    for _ in range(2):
        q = torch.randn_like(static_q)
        k = torch.randn_like(static_k)
        pos = torch.randint(0, 300_000, (2, 8), device=DEV)
        static_q.copy_(q)
        static_k.copy_(k)
        static_pos.copy_(pos)
        graph.replay()
        want = enc.apply(q, k, pos)
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


def test_inputs_on_a_second_stream():
    """The kernel runs on the caller's current stream: inputs produced late on a side stream are seen."""
    enc = posenc.RoPE(128)
    q_src = torch.randn(4, 64, 8, 128, device=DEV, dtype=torch.bfloat16)
    k_src = torch.randn(4, 64, 2, 128, device=DEV, dtype=torch.bfloat16)
    positions = torch.randint(0, 100_000, (4, 64), device=DEV)
    want = enc.apply(q_src, k_src, positions)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # the inputs below are written well after the host moves on
        q = q_src * 1
        k = k_src * 1
        got = enc.apply(q, k, positions)
        q_in, k_in = q.clone(), k.clone()
        enc.apply(q_in, k_in, positions, inplace=True)
    side.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(q_in, want[0]) and torch.equal(k_in, want[1])


def test_angles_beyond_the_accurate_range_as_the_reference_forms_them():
    """On CUDA, positions held on the GPU are not checked against ops.MAX_ANGLE (a host sync): the kernel
    must then compute what the reference does (the same float64 roundings), up to int64's extremes."""
    positions = torch.randint(1 << 40, 1 << 62, (2, 64), device=DEV)
    positions[0, :3] = torch.tensor([-(1 << 63), (1 << 63) - 1, -(1 << 50)], device=DEV)
    q, k = torch.randn(2, 64, 4, 128, device=DEV), torch.randn(2, 64, 1, 128, device=DEV)
    for interleaved in (False, True):
        args = (None, None, masked_inv_freq(128, 64).to(DEV), positions, 1.0, 128, 64, interleaved, False)
        want = rotary_reference(q.cpu(), k.cpu(), *(a.cpu() if torch.is_tensor(a) else a for a in args))
        for got, w, x in zip(torch.ops.posenc.rotary(q, k, *args), want, (q, k)):
            # (CUDA's and the CPU's float32 sin/cos may differ by a few ulp: 4 rounding steps)
            assert_close_to_64(got.cpu(), w.double(), x.cpu(), torch.float32, interleaved=interleaved, factor=4.0)


def test_inplace_refuses_shared_memory_on_cuda():
    q = torch.randn(2, 5, 4, 64, device=DEV)
    args = op_args(64, 24, device=DEV)
    for k in (q, q[:, :, 1:2]):
        with pytest.raises(ValueError, match="q and k share"):
            torch.ops.posenc.rotary_(q, k, *args)
    with pytest.raises(ValueError, match="elements that share memory"):
        torch.ops.posenc.rotary_(q[:, :, :1].expand(-1, -1, 4, -1), torch.randn(2, 5, 1, 64, device=DEV), *args)
    qkv = torch.randn(2, 5, 3, 4, 64, device=DEV)  # packed: separate heads, accepted
    want = torch.ops.posenc.rotary(qkv[:, :, 0], qkv[:, :, 1], *args)
    torch.ops.posenc.rotary_(qkv[:, :, 0], qkv[:, :, 1], *args)
    assert torch.equal(qkv[:, :, 0], want[0]) and torch.equal(qkv[:, :, 1], want[1])


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_inplace_inside_autograd_on_views(layout):
    enc = posenc.HoPE(64, context_length=256)
    proj = torch.nn.Linear(32, 3 * 4 * 64, device=DEV)
    x = torch.randn(2, 6, 32, device=DEV)
    positions = torch.randint(0, 5000, (2, 6), device=DEV)

    def loss(inplace):
        qkv = proj(x).view(2, 6, 3, 4, 64)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        if layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q2, k2 = enc.apply(q, k, positions, layout=layout, inplace=inplace)
        return (q2 * torch.arange(64.0, device=DEV)).sum() + k2.square().sum()

    want = torch.autograd.grad(loss(False), proj.weight)[0]
    torch.testing.assert_close(torch.autograd.grad(loss(True), proj.weight)[0], want)


@pytest.mark.parametrize("dtype", [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)])
def test_float8_type_error(dtype):
    q = torch.zeros(2, 5, 4, 64, device=DEV, dtype=dtype)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        torch.ops.posenc.rotary(q, q.clone(), *op_args(64, 24, device=DEV))


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_reads_half_tables_exactly(dtype, table_dtype):
    """Tables in the model's dtype (strided views of duplicated halves, as the HF path passes them) give the bits
    of the same tables converted to float32, on the GPU as on the CPU kernel; per-token tables through
    apply_rotary equal the float64 rotation with the same tables."""
    full = torch.randn(50, 128, device=DEV).to(table_dtype)
    if table_dtype == torch.float16:
        full[0, :4] = torch.tensor([6e-8, -3e-6, float("inf"), float("nan")], dtype=table_dtype)
    cos, sin = full[:, :64], full.flip(0)[:, :64]
    pos = torch.randint(0, 50, (4, 50), device=DEV)
    q, k = torch.randn(4, 50, 8, 128, device=DEV).to(dtype), torch.randn(4, 50, 2, 128, device=DEV).to(dtype)
    rest = (None, pos, 1.0, 128, 64, False, False)
    got = torch.ops.posenc.rotary(q, k, cos, sin, *rest)
    want = torch.ops.posenc.rotary(q, k, cos.float(), sin.float(), *rest)
    cpu = torch.ops.posenc.rotary(q.cpu(), k.cpu(), cos.cpu(), sin.cpu(), None, pos.cpu(), *rest[2:])
    ints = torch.int16 if dtype != torch.float32 else torch.int32
    for g, w, c in zip(got, want, cpu):
        assert torch.equal(g.view(ints), w.view(ints))
        torch.testing.assert_close(g.cpu(), c, equal_nan=True, atol=0, rtol=0)
    # rows without the float16 specials (cos's first row, sin's last): the float64 bound below needs finite values
    ct, st = cos[1:].unsqueeze(0).repeat(1, 1, 2), sin[:-1].unsqueeze(0).repeat(1, 1, 2)
    qb, kb = q[:, :49].transpose(1, 2), k[:, :49].transpose(1, 2)
    qo, ko = posenc.apply_rotary(qb, kb, ct, st, layout="bhsd")
    for x, out in ((qb, qo), (kb, ko)):
        c, s = ct.double()[:, None], st.double()[:, None]
        xd = x.double()
        want = xd * c + torch.cat([-xd[..., 64:], xd[..., :64]], -1) * s
        assert (out.double() - want).abs().max() <= 2 * torch.finfo(dtype).eps * want.abs().max()
