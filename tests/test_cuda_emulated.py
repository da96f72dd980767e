"""The CUDA kernel's logic without a GPU: csrc/rotary_cuda.cu compiled for the CPU by cuda_emulator.py.

Every call checks that out of place == the reference (float64 bound) and leaves its inputs alone, that in
place == out of place bit for bit, that an in-place call reads and writes no byte outside the 16-byte blocks
that hold rotating channels (the others in such a block are written back unchanged) and that every vector
access is aligned. Runs everywhere a C++20 compiler is (the GPU tests in
test_cuda.py check the compiled kernel itself, on a GPU).
"""
import itertools
import random

import pytest
import torch

from cuda_emulator import load
from helpers import assert_close_to_64, masked_inv_freq, rotary_configs, rotated_mask
from posenc.ops import rotary_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(scope="module")
def emu():
    return load()


def configs(D):
    """(rotary_dim, rotated_pairs, (q_heads, kv_heads)): those of the GPU tests, then nothing rotating, one
    pair, all but one pair."""
    half = D // 2
    return [c[1:] for c in rotary_configs(D)] + [(D, 0, (2, 1)), (D, 1, (1, 1)), (D, half - 1, (2, 3))]


def byte_set(x, channels):
    """The byte addresses of x's elements in the given channels (a bool mask over the last dim)."""
    offs = torch.zeros(x.shape, dtype=torch.long)
    for d in range(4):
        shape = [1] * 4
        shape[d] = x.shape[d]
        offs = offs + torch.arange(x.shape[d]).view(shape) * x.stride(d)
    es = x.element_size()
    starts = (offs[..., channels].flatten() * es + x.data_ptr()).tolist()
    return {a + j for a in starts for j in range(es)}


def rotating_blocks(x, rotating):
    """The bytes of x's elements that share an aligned 16-byte block with a rotating element: what an in-place
    call may read and write back."""
    blocks = {a // 16 for a in byte_set(x, rotating)}
    return {a for a in byte_set(x, torch.ones(x.shape[-1], dtype=torch.bool)) if a // 16 in blocks}


def check_log(log, allowed, what):
    assert int(log[0, 0]) == 0, f"{what}: {int(log[0, 0])} misaligned accesses"
    assert len(log) > 1 or not allowed, f"{what}: no access logged"
    lo = min(allowed) if allowed else 0
    for a, n in log[1:].tolist():
        for j in range(n):
            assert a + j in allowed, f"{what}: touched byte {a + j - lo} (from the lowest allowed) outside the allowed set"


def make(batch, seq, heads, D, dtype, view, g):
    if view == "sliced":  # channel offset 1: rows not 16-byte aligned, the scalar path
        return torch.randn(batch, seq, heads, D + 2, generator=g).to(dtype)[..., 1:D + 1]
    if view == "heads":  # a slice of a wider head dimension and of the channels
        return torch.randn(batch, seq, heads + 3, D + 8, generator=g).to(dtype)[:, :, 2:2 + heads, :D]
    if view == "bhsd":
        return torch.randn(batch, heads, seq, D, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(batch, seq, heads, D, generator=g).to(dtype)


# (memory clock in kHz, bus width in bits) of the devices whose launch plans are emulated: an H200's faster
# memory gives out-of-place launches 6 units per thread instead of an H100's 4
MEMORY = {"h100": (2_619_000, 5120), "h200": (3_201_000, 6016)}


def run_case(emu, dtype, D, rotary_dim, pairs, heads, tables, interleaved, view="bshd", shared_positions=False,
             batch=2, seq=3, multiprocessors=132, memory="h100"):
    """multiprocessors, memory: the device the launch plans for. 132 multiprocessors (an H100) split the heads
    of these few tokens over blocks; 1 or 2 give them the shapes of long inputs on a GPU: whole tokens per
    block, the first unit loaded ahead and (out of place, with channels that only copy) the pipelined
    kernels."""
    emu.set_device(multiprocessors, *MEMORY[memory])
    g = torch.Generator().manual_seed(random.randrange(2**31))
    q, k = (make(batch, seq, h, D, dtype, view, g) for h in heads)
    if shared_positions:  # one row for the whole batch: batch stride 0
        pos = (torch.randint(0, 130_000, (1,), generator=g) + torch.arange(seq)).expand(batch, seq)
    else:
        pos = torch.randint(0, 130_000, (batch, 1), generator=g) + torch.arange(seq)
    inv = masked_inv_freq(rotary_dim, pairs)
    if tables:  # a compact table: one row per token
        angle = pos.flatten().double()[:, None] * inv
        args = (angle.cos().float(), angle.sin().float(), None, torch.arange(batch * seq).view(batch, seq))
    else:
        args = (None, None, inv, pos)
    args = (*args, 1.0, rotary_dim, pairs, interleaved, False)
    ref = rotary_reference(q, k, *args)
    q0, k0 = q.clone(), k.clone()

    emu.log_begin()
    out = emu.rotary(q, k, *args)
    log = emu.log_end()
    assert torch.equal(q, q0) and torch.equal(k, k0), "out of place must leave its inputs untouched"
    every = torch.ones(D, dtype=torch.bool)
    check_log(log, set().union(*(byte_set(x, every) for x in (q, k, *out))), "out of place")
    for o, r, x in zip(out, ref, (q0, k0)):
        if x.numel():
            assert_close_to_64(o, r.double(), x, dtype, rotary_dim, interleaved)

    # in place, on tensors with the inputs' own strides (the strided views themselves where they are views)
    qi, ki = (x if view in ("sliced", "heads") else torch.empty_strided(x.shape, x.stride(), dtype=dtype).copy_(x)
              for x in (q, k))
    rotating = rotated_mask(D, rotary_dim, pairs, interleaved)
    emu.log_begin()
    emu.rotary_(qi, ki, *args)
    log = emu.log_end()
    check_log(log, rotating_blocks(qi, rotating) | rotating_blocks(ki, rotating), "in place")
    assert torch.equal(qi, out[0]) and torch.equal(ki, out[1]), "in place != out of place"
    assert torch.equal(qi[..., ~rotating], q0[..., ~rotating]) and torch.equal(ki[..., ~rotating], k0[..., ~rotating])


MATRIX = [(dtype, D, *cfg) for dtype, D in itertools.product(DTYPES, [64, 80, 128, 256, 512])
          if dtype != torch.float64 or D in (64, 128) for cfg in configs(D)]


@pytest.mark.parametrize("dtype,D,rotary_dim,pairs,heads", MATRIX)
def test_emulated_kernel_matrix(emu, dtype, D, rotary_dim, pairs, heads):
    """Tables and frequencies x both pairings x launches planned for 132 and for 1 multiprocessor; layouts and
    position kinds alternate."""
    combos = itertools.product([False, True], [False, True], [132, 1])
    for i, (tables, interleaved, multiprocessors) in enumerate(combos):
        run_case(emu, dtype, D, rotary_dim, pairs, heads, tables, interleaved, view="bhsd" if i % 2 else "bshd",
                 shared_positions=i % 4 in (1, 2), multiprocessors=multiprocessors)


@pytest.mark.parametrize("view", ["sliced", "heads"])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float32, 80), (torch.float16, 128)])
def test_emulated_kernel_strided_views(emu, dtype, D, view):
    for rotary_dim, pairs, heads in configs(D):
        for tables, interleaved in itertools.product([False, True], [False, True]):
            run_case(emu, dtype, D, rotary_dim, pairs, heads, tables, interleaved, view=view,
                     multiprocessors=1 if tables == interleaved else 132)


# Launches planned for 2 multiprocessors put several tokens in each block and several units on each thread
# (the first loaded ahead, each next one too in the pipelined kernels), as thousands of tokens do on a GPU.
@pytest.mark.parametrize("memory", ["h100", "h200"])
@pytest.mark.parametrize("batch,seq,heads,D,pairs,interleaved,dtype,shared,multiprocessors", [
    (2, 200, (2, 1), 64, 32, False, torch.bfloat16, False, 2),    # full rotation
    (3, 100, (2, 1), 64, 23, True, torch.float32, True, 2),       # interleaved, partial chunk in place
    (2, 100, (8, 2), 128, 46, False, torch.bfloat16, True, 2),    # HoPE cut: out of place pipelined
    (2, 50, (4, 1), 512, 64, False, torch.bfloat16, False, 2),    # Gemma 4 global layers, p = 0.25
    (2, 100, (4, 1), 256, 100, True, torch.float16, False, 2),    # interleaved with copies: pipelined
    (64, 1, (32, 8), 128, 64, False, torch.bfloat16, False, 132),  # decode: a token's heads over blocks
    (64, 1, (32, 8), 128, 46, True, torch.float16, False, 132),
    (3, 100, (3, 0), 64, 30, False, torch.bfloat16, True, 2),     # no k heads
    (2, 40, (32, 8), 128, 46, False, torch.bfloat16, True, 2),    # HoPE, Llama heads: partial chunk in place
    (2, 40, (32, 8), 128, 48, True, torch.float16, False, 2),     # p-RoPE 0.75 interleaved: in place pipelined
])
def test_emulated_kernel_long_and_decode(emu, batch, seq, heads, D, pairs, interleaved, dtype, shared,
                                         multiprocessors, memory):
    run_case(emu, dtype, D, D, pairs, heads, False, interleaved, shared_positions=shared, batch=batch, seq=seq,
             multiprocessors=multiprocessors, memory=memory)


def test_emulated_kernel_table_positions_out_of_range_give_nan(emu):
    cos, sin = torch.rand(16, 32), torch.rand(16, 32)
    q, k = torch.randn(1, 3, 2, 64), torch.randn(1, 3, 1, 64)
    out = emu.rotary(q, k, cos, sin, None, torch.tensor([[0, 16, 1 << 40]]), 1.0, 64, 32, False, False)
    assert out[0][0, 1:].isnan().all() and not out[0][0, 0].isnan().any()


def test_emulated_kernel_agrees_with_reference_at_any_position(emu):
    """The CUDA kernel cannot refuse angles beyond the accurate range (that would need a host sync), so it must
    form them as the reference does there too: at 2^40..2^63 a division by 2*pi instead of the multiplication
    by 1/(2*pi) (as the reference once did) moves the reduced angle by multiples of 2*pi's rounding."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    positions = torch.randint(1 << 40, 1 << 62, (2, 60), generator=g)
    positions[0, :3] = torch.tensor([-(1 << 63), (1 << 63) - 1, -(1 << 50)])
    q, k = torch.randn(2, 60, 2, 64, generator=g), torch.randn(2, 60, 1, 64, generator=g)
    for interleaved in (False, True):
        args = (None, None, masked_inv_freq(64, 32), positions, 1.0, 64, 32, interleaved, False)
        for got, want, x in zip(emu.rotary(q, k, *args), rotary_reference(q, k, *args), (q, k)):
            assert_close_to_64(got, want.double(), x, torch.float32, interleaved=interleaved)


def test_emulated_kernel_inplace_refuses_shared_memory(emu):
    """The in-place checks (csrc/ops.cpp) guard the CUDA entry points too."""
    q = torch.randn(2, 3, 4, 64)
    args = (None, None, masked_inv_freq(64, 32), torch.arange(3).expand(2, 3), 1.0, 64, 32, False, False)
    for k in (q, q[:, :, 1:2]):
        with pytest.raises(ValueError, match="q and k share"):
            emu.rotary_(q, k, *args)
    with pytest.raises(ValueError, match="elements that share memory"):
        emu.rotary_(q[:, :, :1].expand(-1, -1, 4, -1), torch.randn(2, 3, 1, 64), *args)
    qkv = torch.randn(2, 3, 6, 64)
    x0 = qkv.clone()
    want = rotary_reference(qkv[:, :, :4], qkv[:, :, 4:5], *args)
    emu.rotary_(qkv[:, :, :4], qkv[:, :, 4:5], *args)  # heads of one buffer: separate elements
    for got, w, x in zip((qkv[:, :, :4], qkv[:, :, 4:5]), want, (x0[:, :, :4], x0[:, :, 4:5])):
        assert_close_to_64(got, w.double(), x, torch.float32)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_kernel_reads_half_tables_exactly(emu, dtype, table_dtype):
    """Tables stored as bfloat16/float16 (transformers' in the model's dtype), as strided views of the first half
    of duplicated halves: the same bits as the same tables converted to float32 first (each value is exactly a
    float32), also for float16's subnormals, infinities and NaN; 1 and 132 multiprocessors."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    D, batch, seq = 64, 2, 5
    q, k = torch.randn(batch, seq, 4, D, generator=g).to(dtype), torch.randn(batch, seq, 2, D, generator=g).to(dtype)
    full = torch.randn(11, D, generator=g).to(table_dtype)  # [rows, D]: halves duplicated, read through a view
    if table_dtype == torch.float16:
        full[0, :4] = torch.tensor([6e-8, -3e-6, float("inf"), float("nan")], dtype=table_dtype)
    cos, sin = full[:, : D // 2], full.flip(0)[:, : D // 2]
    pos = torch.randint(0, 11, (batch, seq), generator=g)
    for multiprocessors in (132, 1):
        emu.set_device(multiprocessors, *MEMORY["h200"])
        for tables in ((cos, sin), (cos.float(), sin.float())):
            args = (*tables, None, pos, 1.0, D, D // 2, False, False)
            got = emu.rotary(q, k, *args)
            if tables[0].dtype != torch.float32:
                first = got
        for a, b in zip(first, got):
            assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               b.view(torch.int16 if dtype != torch.float32 else torch.int32))
