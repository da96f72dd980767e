"""csrc/launch_plan.h, the CUDA op's host-side launch planning, compiled on its own (plain C++17, no CUDA, no
torch headers: about a second) and called through ctypes.

Checked against figures worked out by hand for a few shapes, and against properties that any plan must have
(every token and head in exactly one block, every channel of a head in exactly one unit, block sizes and
shared memory within CUDA's limits, the kernel's preconditions) on random shapes. The kernel that runs those
plans is tested on the CPU by test_cuda_emulated.py and on a GPU by test_cuda.py.
"""
import ctypes
import hashlib
import os
import random
import shutil
import subprocess
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "csrc")

SHIM = r'''
#include "launch_plan.h"
using namespace posenc;

static PlanTensor tensor(const int64_t* a) { return {static_cast<uint64_t>(a[0]), a[1], {a[2], a[3], a[4], a[5]}}; }

extern "C" void device(int sms, int clock_khz, int bus_bits, int64_t* out) {
  const DevicePlan d = plan_device(sms, clock_khz, bus_bits);
  out[0] = d.multiprocessors;
  out[1] = d.units_per_thread;
}

// a: 4 tensors (q_in, k_in, q_out, k_out) of 6 (address, heads, 4 strides), then batch, seqlen, head_dim,
// rotary_dim, rotated_pairs, interleaved, inplace, shared_positions, element_bytes, arithmetic_bytes,
// multiprocessors, units_per_thread
extern "C" void plan(const int64_t* a, int64_t* out) {
  PlanInput in{};
  in.q_in = tensor(a);
  in.k_in = tensor(a + 6);
  in.q_out = tensor(a + 12);
  in.k_out = tensor(a + 18);
  const int64_t* s = a + 24;
  in.batch = s[0];
  in.seqlen = s[1];
  in.head_dim = s[2];
  in.rotary_dim = static_cast<int>(s[3]);
  in.rotated_pairs = static_cast<int>(s[4]);
  in.interleaved = s[5] != 0;
  in.inplace = s[6] != 0;
  in.shared_positions = s[7] != 0;
  in.element_bytes = static_cast<int>(s[8]);
  in.arithmetic_bytes = static_cast<int>(s[9]);
  DevicePlan dev;
  dev.multiprocessors = static_cast<int>(s[10]);
  dev.units_per_thread = static_cast<int>(s[11]);
  const LaunchPlan L = plan_launch(in, dev);
  const int64_t v[] = {static_cast<int64_t>(L.kernel), L.vector, L.tokens, L.tokens_per_block, L.heads_per_block,
                       L.units_per_head, L.rot_units, L.n_stride, L.cos_rows, L.seq_major, L.prefetch,
                       L.pipeline, L.threads, L.token_blocks, L.head_blocks, static_cast<int64_t>(L.shared_bytes)};
  for (int i = 0; i < 16; ++i) out[i] = v[i];
}
'''
FIELDS = ["kernel", "vector", "tokens", "tokens_per_block", "heads_per_block", "units_per_head", "rot_units",
          "n_stride", "cos_rows", "seq_major", "prefetch", "pipeline", "threads", "token_blocks", "head_blocks",
          "shared_bytes"]
KERNELS = ["none", "plain", "pipelined", "seq_major"]  # KernelKind's order
BYTES = {"float16": (2, 4), "bfloat16": (2, 4), "float32": (4, 4), "float64": (8, 8)}  # element, arithmetic


@pytest.fixture(scope="module")
def lib():
    with open(os.path.join(CSRC, "launch_plan.h")) as f:
        header = f.read()
    key = hashlib.sha256((header + SHIM).encode()).hexdigest()[:16]
    build = os.path.join(tempfile.gettempdir(), f"posenc_launch_plan_{key}")
    so = os.path.join(build, "launch_plan.so")
    if not os.path.exists(so):
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        assert cxx, "test_launch_plan needs a C++17 compiler (c++, g++ or $CXX)"
        os.makedirs(build, exist_ok=True)
        # per-process source and output, then an atomic rename: pytest-xdist workers build at once (with one
        # shared source file, one worker truncated it while another compiled it, giving a library without `plan`)
        src = os.path.join(build, f"shim.{os.getpid()}.cpp")
        with open(src, "w") as f:
            f.write(SHIM)
        tmp = f"{so}.{os.getpid()}"
        subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-I", CSRC, src, "-o", tmp],
                       check=True)
        os.replace(tmp, so)
    return ctypes.CDLL(so)


def call_device(lib, sms, clock_khz, bus_bits):
    out = (ctypes.c_int64 * 2)()
    lib.device(sms, clock_khz, bus_bits, out)
    return tuple(out)


def contiguous(batch, seq, heads, D, address=1 << 20):
    return [address, heads, seq * heads * D, heads * D, D, 1]


def call_plan(lib, batch, seq, hq, hk, D, rotary_dim, pairs, *, dtype="bfloat16", interleaved=False,
              inplace=False, shared_positions=False, sms=132, units_per_thread=4, tensors=None):
    """The plan for q [batch, seq, hq, D] and k [batch, seq, hk, D], contiguous unless `tensors` gives the
    four (address, heads, strides) rows."""
    if tensors is None:
        q, k = contiguous(batch, seq, hq, D), contiguous(batch, seq, hk, D, address=1 << 24)
        qo, ko = (q, k) if inplace else (contiguous(batch, seq, hq, D, 1 << 28), contiguous(batch, seq, hk, D, 1 << 30))
        tensors = [q, k, qo, ko]
    eb, ab = BYTES[dtype]
    args = [x for t in tensors for x in t] + [batch, seq, D, rotary_dim, pairs, interleaved, inplace,
                                              shared_positions, eb, ab, sms, units_per_thread]
    a = (ctypes.c_int64 * len(args))(*[int(x) for x in args])
    out = (ctypes.c_int64 * len(FIELDS))()
    lib.plan(a, out)
    r = dict(zip(FIELDS, out))
    r["kernel"] = KERNELS[r["kernel"]]
    for f in ("seq_major", "prefetch", "pipeline"):
        r[f] = bool(r[f])
    return r


def test_device_plan_by_hand(lib):
    # H100 SXM: 132 multiprocessors, 2619 MHz x 5120-bit HBM3, double data rate: 3.35 TB/s, 25.4 GB/s each
    assert call_device(lib, 132, 2619000, 5120) == (132, 4)
    # H200: 132 multiprocessors, 3201 MHz x 6144 bits: 4.92 TB/s, 37.2 GB/s each -> 4 * 37.2 / 25.4 = 5.9 -> 6
    assert call_device(lib, 132, 3201000, 6144) == (132, 6)
    assert call_device(lib, 1, 3201000, 6144) == (1, 8)  # clamped to the measured range 4..8
    assert call_device(lib, 132, 1000, 64) == (132, 4)
    assert call_device(lib, 0, 1000, 64) == (1, 4)  # a device reporting no multiprocessors counts as one


# Worked out by hand from the rules in launch_plan.h (bf16/fp16: V = 8 channels per 16-byte access).
HAND = [
    # Llama-like prefill slice: 3 heads x 8 units a token; target min(3*128, max(64, 96 / 528)) = 64 units a
    # block -> 2 tokens; 48 units -> 64 threads; smem 2*3*16 + 2*8 + 2*4*2*64 + 2*4 = 1144
    (dict(batch=1, seq=4, hq=2, hk=1, D=128, rotary_dim=128, pairs=64),
     dict(kernel="plain", vector=8, tokens=4, tokens_per_block=2, heads_per_block=3, units_per_head=8, rot_units=8,
          n_stride=64, cos_rows=2, seq_major=False, prefetch=True, pipeline=False, threads=64, token_blocks=2,
          head_blocks=1, shared_bytes=1144)),
    # decoding, 72 heads: 576 units a token over a target of 64 -> 9 blocks of 8 heads, no prefetch;
    # smem 8*16 + 16 + 2*4*64 + 4 = 660
    (dict(batch=1, seq=1, hq=64, hk=8, D=128, rotary_dim=128, pairs=64),
     dict(kernel="plain", vector=8, tokens=1, tokens_per_block=1, heads_per_block=8, units_per_head=8, rot_units=8,
          n_stride=64, cos_rows=1, seq_major=False, prefetch=False, pipeline=False, threads=64, token_blocks=1,
          head_blocks=9, shared_bytes=660)),
    # in place, 5 rotated pairs of a 16-channel head: one unit (8 pairs, 3 written back unchanged) a head;
    # not pipelined: 4 * 8 cos/sin elements a token for 2 units; smem 6*2*16 + 6*8 + 2*4*6*8 + 6*4 = 648
    (dict(batch=2, seq=3, hq=1, hk=1, D=16, rotary_dim=16, pairs=5, dtype="float16", inplace=True),
     dict(kernel="plain", vector=8, tokens=6, tokens_per_block=6, heads_per_block=2, units_per_head=1, rot_units=1,
          n_stride=8, cos_rows=6, seq_major=False, prefetch=True, pipeline=False, threads=32, token_blocks=1,
          head_blocks=1, shared_bytes=648)),
    # HoPE-like in place (46 of 64 pairs): 6 units a head, the last with 6 rotating pairs; 40 heads -> 240 units
    # a token > 4 * 48 cos/sin elements: pipelined, and 2 units a thread (in place, pairs that do not rotate, cos/sin
    # a small share): target min(2*128, max(64, 240*8/4)) = 256 -> 1 token; smem 40*16 + 16 + 2*4*48 + 4 = 1044
    (dict(batch=1, seq=8, hq=32, hk=8, D=128, rotary_dim=128, pairs=46, inplace=True, sms=1),
     dict(kernel="pipelined", vector=8, tokens=8, tokens_per_block=1, heads_per_block=40, units_per_head=6,
          rot_units=6, n_stride=48, cos_rows=1, seq_major=False, prefetch=True, pipeline=True, threads=128,
          token_blocks=8, head_blocks=1, shared_bytes=1044)),
    # Llama-8B heads out of place: 320 units a token, 64 cos/sin elements (a small share): 3 units a thread,
    # target min(3*128, max(64, 64*320/4)) = 384 -> 1 token, 128 threads; smem 40*16 + 16 + 2*4*64 + 4 = 1172
    (dict(batch=1, seq=64, hq=32, hk=8, D=128, rotary_dim=128, pairs=64, sms=1, units_per_thread=6),
     dict(kernel="plain", vector=8, tokens=64, tokens_per_block=1, heads_per_block=40, units_per_head=8,
          rot_units=8, n_stride=64, cos_rows=1, seq_major=False, prefetch=True, pipeline=False, threads=128,
          token_blocks=64, head_blocks=1, shared_bytes=1172)),
    # Gemma-like, shared positions, one multiprocessor: 144 units a token, 128 cos/sin elements (a large share)
    # out of place: 3 units a thread, not the device's 6: target min(384, max(64, 32*144/4)) = 384 -> 2 tokens,
    # fewer than the 4 batch rows of a position, so not rounded; cos/sin rows min(2, (2+4-2)/4 + 1) = 2;
    # smem 2*9*16 + 16 + 2*4*2*128 + 8 = 2360
    (dict(batch=4, seq=8, hq=8, hk=1, D=256, rotary_dim=256, pairs=128, shared_positions=True, sms=1,
          units_per_thread=6),
     dict(kernel="seq_major", vector=8, tokens=32, tokens_per_block=2, heads_per_block=9, units_per_head=16,
          rot_units=16, n_stride=128, cos_rows=2, seq_major=True, prefetch=True, pipeline=False, threads=128,
          token_blocks=16, head_blocks=1, shared_bytes=2360)),
    # the same in place: cos/sin a large share in place, so the device's 6 units a thread: target 768 -> 5 tokens,
    # rounded to the 4 batch rows of one position; cos/sin rows min(4, (4+4-2)/4 + 1) = 2;
    # smem 4*9*16 + 32 + 2*4*2*128 + 16 = 2672
    (dict(batch=4, seq=8, hq=8, hk=1, D=256, rotary_dim=256, pairs=128, shared_positions=True, sms=1,
          units_per_thread=6, inplace=True),
     dict(kernel="seq_major", vector=8, tokens=32, tokens_per_block=4, heads_per_block=9, units_per_head=16,
          rot_units=16, n_stride=128, cos_rows=2, seq_major=True, prefetch=True, pipeline=False, threads=128,
          token_blocks=8, head_blocks=1, shared_bytes=2672)),
    # in place, every pair rotating: the device's units per thread (6); 80 units a token,
    # target min(6*128, max(64, 2560/4)) = 640 -> 8 tokens (4 units a thread, with pairs that do not rotate, would
    # give 512 -> 6); smem 8*10*16 + 8*8 + 2*4*8*64 + 8*4 = 5472
    (dict(batch=1, seq=32, hq=8, hk=2, D=128, rotary_dim=128, pairs=64, inplace=True, sms=1, units_per_thread=6),
     dict(kernel="plain", vector=8, tokens=32, tokens_per_block=8, heads_per_block=10, units_per_head=8,
          rot_units=8, n_stride=64, cos_rows=8, seq_major=False, prefetch=True, pipeline=False, threads=128,
          token_blocks=4, head_blocks=1, shared_bytes=5472)),
    # partial rotary out of place (rotary_dim 64 of 128): 4 rotating + 8 copied units a head, not pipelined (out
    # of place); 32 cos/sin elements for 12 units a head: a large share, but out of place, so 3 units a thread:
    # target min(384, max(64, 1536/4)) = 384 -> 4 tokens; smem 4*8*16 + 32 + 1024 + 16
    (dict(batch=1, seq=16, hq=4, hk=4, D=128, rotary_dim=64, pairs=32, sms=1),
     dict(kernel="plain", vector=8, tokens=16, tokens_per_block=4, heads_per_block=8, units_per_head=12,
          rot_units=4, n_stride=32, cos_rows=4, seq_major=False, prefetch=True, pipeline=False, threads=128,
          token_blocks=4, head_blocks=1, shared_bytes=1584)),
    # Gemma 4 global out of place (D=512, 64 of 256 pairs): 8 rotating + 24 copying units a head, 9 heads -> 288
    # units a token, 64 cos/sin elements (a small share): 3 units a thread, target min(384, max(64, 8*288/4)) =
    # 384 -> 1 token, not pipelined; smem 9*16 + 16 + 2*4*64 + 4 = 676
    (dict(batch=2, seq=4, hq=8, hk=1, D=512, rotary_dim=512, pairs=64, sms=1),
     dict(kernel="plain", vector=8, tokens=8, tokens_per_block=1, heads_per_block=9, units_per_head=32,
          rot_units=32, n_stride=64, cos_rows=1, seq_major=False, prefetch=True, pipeline=False, threads=128,
          token_blocks=8, head_blocks=1, shared_bytes=676)),
]


@pytest.mark.parametrize("case,expected", HAND,
                         ids=["llama", "decode", "inplace_partial_unit", "hope_inplace", "llama_8b_heads", "seq_major",
                              "seq_major_inplace", "inplace_full", "partial_rotary", "gemma4_out_of_place"])
def test_plans_by_hand(lib, case, expected):
    assert call_plan(lib, **case) == expected


def test_nothing_to_touch_launches_nothing(lib):
    assert call_plan(lib, 0, 4, 2, 1, 64, 64, 32)["kernel"] == "none"  # no tokens
    assert call_plan(lib, 2, 4, 0, 0, 64, 64, 32)["kernel"] == "none"  # no heads
    assert call_plan(lib, 2, 4, 2, 1, 64, 64, 0, inplace=True)["kernel"] == "none"  # in place, nothing rotates
    # out of place it still copies (no unit rotates)
    assert call_plan(lib, 2, 4, 2, 1, 64, 64, 0)["kernel"] == "plain"


def test_fast_path_needs_aligned_unit_stride_rows(lib):
    B, S, H, D = 2, 3, 2, 64

    def vector(q, **kw):
        k = contiguous(B, S, H, D, 1 << 24)
        return call_plan(lib, B, S, H, H, D, D, D // 2, tensors=[q, k, q, k], inplace=True, **kw)["vector"]

    assert vector(contiguous(B, S, H, D)) == 8
    assert vector(contiguous(B, S, H, D), dtype="float32") == 4
    assert vector(contiguous(B, S, H, D), dtype="float64") == 2
    assert vector(contiguous(B, S, H, D, address=(1 << 20) + 2)) == 1  # element 0 off a 16-byte boundary
    assert vector([1 << 20, H, S * H * 2 * D, H * 2 * D, 2 * D, 2]) == 1  # channel stride 2
    assert vector([1 << 20, H, S * H * (D + 4), H * (D + 4), D + 4, 1]) == 1  # head rows 4 elements apart
    assert vector([1 << 20, H, S * H * (D + 8), H * (D + 8), D + 8, 1]) == 8  # 8 apart: still aligned
    # a stride of an extent-1 dimension does not matter
    assert call_plan(lib, 1, 1, 1, 1, D, D, D // 2, tensors=[[1 << 20, 1, 3, 5, 7, 1]] * 4, inplace=True)["vector"] == 8
    # half-split needs half of rotary_dim in whole vectors; interleaved does not
    assert call_plan(lib, B, S, H, H, D, 20, 10)["vector"] == 1
    assert call_plan(lib, B, S, H, H, D, 20, 10, interleaved=True)["vector"] == 8


def random_case(rng):
    dtype = rng.choice(list(BYTES))
    interleaved, inplace = rng.random() < 0.5, rng.random() < 0.5
    D = 2 * rng.randint(1, 160) if rng.random() < 0.3 else rng.choice([32, 64, 80, 128, 256, 512])
    rotary_dim = 2 * rng.randint(1, D // 2) if rng.random() < 0.5 else D
    pairs = rng.randint(0, rotary_dim // 2) if rng.random() < 0.4 else rotary_dim // 2
    batch = rng.choice([0, 1, 1, 2, 3, 4, 8, 64]) if rng.random() < 0.95 else 0
    seq = rng.choice([1, 1, 2, 5, 16, 100, 4096])
    hq, hk = rng.choice([(1, 1), (2, 1), (8, 1), (8, 8), (32, 8), (64, 8), (0, 3), (3, 0)])
    kw = dict(dtype=dtype, interleaved=interleaved, inplace=inplace, shared_positions=rng.random() < 0.5,
              sms=rng.choice([1, 2, 16, 132]), units_per_thread=rng.randint(4, 8))
    if rng.random() < 0.2:  # a misaligned q: the scalar path
        q = contiguous(batch, seq, hq, D, address=(1 << 20) + BYTES[dtype][0])
        k = contiguous(batch, seq, hk, D, 1 << 24)
        qo, ko = (q, k) if inplace else (contiguous(batch, seq, hq, D, 1 << 28), contiguous(batch, seq, hk, D, 1 << 30))
        kw["tensors"] = [q, k, qo, ko]
    return (batch, seq, hq, hk, D, rotary_dim, pairs), kw


def test_plan_properties(lib):
    rng = random.Random(18)
    kinds = set()
    for _ in range(3000):
        (batch, seq, hq, hk, D, rd, n), kw = random_case(rng)
        L = call_plan(lib, batch, seq, hq, hk, D, rd, n, **kw)
        what = f"{(batch, seq, hq, hk, D, rd, n)} {kw}: {L}"
        kinds.add(L["kernel"])
        tokens, h_total, inplace = batch * seq, hq + hk, kw["inplace"]
        if tokens == 0 or h_total == 0 or (inplace and n == 0):
            assert L["kernel"] == "none", what
            continue
        assert L["kernel"] != "none", what
        V = L["vector"]
        assert V in (1, 16 // BYTES[kw["dtype"]][0]), what
        if "tensors" in kw and hq > 0:  # a q without heads is never accessed: its alignment does not count
            assert V == 1, what
        # a unit: V pairs (half-split) or V channels (interleaved) on the fast path, one pair otherwise
        pairs_per_unit = (V // 2 if kw["interleaved"] else V) if V > 1 else 1
        chan_per_unit = 2 * pairs_per_unit  # channels of a unit's pairs
        uph, rot = L["units_per_head"], L["rot_units"]
        # every channel of a head in exactly one unit: out of place all D, in place the fewest units that hold
        # the 2n rotated channels
        if inplace:
            assert rot == uph, what
            assert (uph - 1) * chan_per_unit < 2 * n <= uph * chan_per_unit, what
        else:
            copied = 0 if kw["interleaved"] else (uph - rot) * pairs_per_unit  # half-split: past rotary_dim
            assert rot * chan_per_unit + copied == D, what
            assert rot * pairs_per_unit >= n, what  # every rotated pair in a rotary unit
        assert L["n_stride"] % pairs_per_unit == 0 and n <= L["n_stride"] < n + pairs_per_unit, what
        # every token and every head in exactly one block
        T, Hb = L["tokens_per_block"], L["heads_per_block"]
        assert 1 <= T <= 64 and 1 <= Hb <= h_total, what
        assert L["tokens"] == tokens and L["token_blocks"] == -(-tokens // T), what
        assert L["head_blocks"] == -(-h_total // Hb), what
        assert L["token_blocks"] < 2**31 and L["head_blocks"] < 65536, what  # CUDA's grid limits
        assert T == 1 or Hb == h_total, what  # a block holds whole tokens, or a slice of one token's heads
        # threads: whole warps, at most 128, no more warps than the block has units
        units = T * Hb * uph
        assert L["threads"] % 32 == 0 and 32 <= L["threads"] <= 128, what
        assert L["threads"] - 32 < units, what
        # block size in units: at most 8 units a thread (seq-major rounding to whole positions may add half);
        # a block of one token: one head fewer would fit (heads are split into blocks of equal counts)
        if T > 1:
            assert units <= (1.5 if L["seq_major"] else 1) * 8 * 128, what
        else:
            assert (Hb - 1) * uph < 8 * 128, what
        # the kernel's preconditions
        if V == 1:
            assert L["kernel"] == "plain" and not L["pipeline"] and not L["seq_major"], what
        assert L["pipeline"] == (L["kernel"] == "pipelined"), what
        assert L["seq_major"] == (L["kernel"] == "seq_major"), what
        assert not L["pipeline"] or L["prefetch"], what
        assert L["prefetch"] == (L["head_blocks"] == 1), what
        if L["seq_major"]:
            assert kw["shared_positions"] and batch > 1 and T > 1, what
            # cos/sin rows: the most positions that any block's T consecutive (seq, batch) tokens span
            spans = [(min(t0 + T, tokens) - 1) // batch - t0 // batch + 1 for t0 in range(0, tokens, T)]
            assert max(spans) <= L["cos_rows"] <= T, what
        else:
            assert L["cos_rows"] == T, what
        # shared memory: the kernel's layout (the head rows' two addresses [T * heads_per_block][2], positions
        # [T rounded up to even] int64, cos and sin [cos_rows][n_stride], row indices [T] int), within the
        # 48 KiB of a launch without opt-in
        acc = BYTES[kw["dtype"]][1]
        layout = (16 * T * L["heads_per_block"] + 8 * (T + T % 2) + 2 * acc * L["cos_rows"] * L["n_stride"]
                  + 4 * T)
        assert L["shared_bytes"] == layout <= 48 * 1024, what
    assert kinds == set(KERNELS), kinds  # the random shapes reached every kernel
