// The rotary op on NVIDIA GPUs: q and k of a few tokens in one block, one launch for both.
//
// Work split. A block owns T consecutive tokens (b, s) and a range of heads (q heads first, then k heads);
// tokens are consecutive in (batch, seq) order, or in (seq, batch) order (seq-major) when the batch rows share
// positions and cos/sin is a large part of the work, so that a block computes cos/sin once per position.
//  0. Each thread first issues the loads of its first unit, so that their latency overlaps step 1 rather
//     than following the barrier (blocks are short-lived; on an H100 this took Llama shapes from 1.13x to
//     1.04x the time of a copy).
//  1. The block's positions and per-token row offsets of the four tensors (q/k in/out) go to shared memory,
//     one token per thread (so no 64-bit division is left for the hot loop, and each position is loaded
//     once); then cos/sin of those tokens (float32; float64 for float64 data), as rotary.h defines them:
//     table lookup, or position * inv_freq reduced mod 2*pi in float64 followed by an accurate sincos (this
//     file is built without --use_fast_math, so no __sincosf).
//  2. Every thread then takes "units" of (token, head, chunk): with 16-byte vectors (the fast path: unit
//     channel stride, 16-byte aligned rows) a half-split unit is V consecutive pairs — one vector of the first
//     half and the matching vector of the second half — and an interleaved unit is one vector (V/2 pairs).
//     Without it (any strides, odd offsets), a unit is one pair read with its channel stride.
// In place, only the units holding rotated pairs are visited, and a chunk that straddles the last rotated
// pair is split into aligned power-of-two pieces, each its own unit, so channels that do not rotate are
// neither read nor written. Out of place, the other units copy (vectorised too).
//
// Table mode with a position outside the table produces NaN instead of reading out of bounds (the Python
// entry point rejects such positions before the call, except under torch.compile / CUDA-graph capture).
// No allocation, no host synchronisation: launches on the current stream, so CUDA-graph capture works.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "rotary_op.h"

namespace posenc {
namespace {

// Threads per block. The 16-bit half-split kernels take 56 registers (9 blocks of 128 per multiprocessor);
// forcing more blocks with __launch_bounds__ spilled in the unit loop and was slower on an H200: 10 blocks
// (48 registers) took Llama forward 1.04x -> 1.06x a copy and HoPE in place 1.13x -> 1.28x, 12 blocks 1.60x.
constexpr int kThreads = 128;

template <typename T, int W>
struct alignas(sizeof(T) * W > 16 ? 16 : sizeof(T) * W) Vec {
  T v[W];
};

// W consecutive channels starting at channel `ch` of a row: one vector access when kUnit (unit channel
// stride, alignment checked on the host), W strided scalar accesses otherwise.
template <int W, bool kUnit, typename T>
__device__ __forceinline__ Vec<T, W> load(const T* row, int ch, int64_t cs) {
  if constexpr (kUnit) {
    return *reinterpret_cast<const Vec<T, W>*>(row + ch);
  } else {
    Vec<T, W> r;
#pragma unroll
    for (int e = 0; e < W; ++e) r.v[e] = row[(ch + e) * cs];
    return r;
  }
}

template <int W, bool kUnit, typename T>
__device__ __forceinline__ void store(T* row, int ch, int64_t cs, const Vec<T, W>& x) {
  if constexpr (kUnit) {
    *reinterpret_cast<Vec<T, W>*>(row + ch) = x;
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) row[(ch + e) * cs] = x.v[e];
  }
}

// Half-split: pairs ch..ch+W-1, i.e. channels [ch, ch+W) and [ch+h, ch+h+W). The first `cnt` pairs rotate,
// the rest are copied (cnt == W: all rotate). cs/sn point at the token's cos/sin row in shared memory.
template <int W, bool kUnit, typename T, typename Acc>
__device__ __forceinline__ void rotate_half(const T* in, int64_t ics, T* out, int64_t ocs, int ch, int h,
                                            const Acc* cs, const Acc* sn, int cnt, bool pre,
                                            const Vec<T, W>& pa, const Vec<T, W>& pb) {
  const Vec<T, W> a = pre ? pa : load<W, kUnit>(in, ch, ics);
  const Vec<T, W> b = pre ? pb : load<W, kUnit>(in, ch + h, ics);
  const Vec<Acc, W> c = *reinterpret_cast<const Vec<Acc, W>*>(cs + ch);
  const Vec<Acc, W> s = *reinterpret_cast<const Vec<Acc, W>*>(sn + ch);
  Vec<T, W> oa, ob;
#pragma unroll
  for (int e = 0; e < W; ++e) {
    const Acc x1 = static_cast<Acc>(a.v[e]), x2 = static_cast<Acc>(b.v[e]);
    const T r1 = static_cast<T>(x1 * c.v[e] - x2 * s.v[e]);
    const T r2 = static_cast<T>(x2 * c.v[e] + x1 * s.v[e]);
    oa.v[e] = e < cnt ? r1 : a.v[e];
    ob.v[e] = e < cnt ? r2 : b.v[e];
  }
  store<W, kUnit>(out, ch, ocs, oa);
  store<W, kUnit>(out, ch + h, ocs, ob);
}

// Interleaved: channels [ch, ch+W) (ch even), pairs ch/2 .. ch/2 + W/2 - 1; the first `cnt` pairs rotate.
template <int W, bool kUnit, typename T, typename Acc>
__device__ __forceinline__ void rotate_inter(const T* in, int64_t ics, T* out, int64_t ocs, int ch,
                                             const Acc* cs, const Acc* sn, int cnt, bool pre,
                                             const Vec<T, W>& pa) {
  const Vec<T, W> a = pre ? pa : load<W, kUnit>(in, ch, ics);
  const Vec<Acc, W / 2> c = *reinterpret_cast<const Vec<Acc, W / 2>*>(cs + ch / 2);
  const Vec<Acc, W / 2> s = *reinterpret_cast<const Vec<Acc, W / 2>*>(sn + ch / 2);
  Vec<T, W> o;
#pragma unroll
  for (int e = 0; e < W / 2; ++e) {
    const Acc x1 = static_cast<Acc>(a.v[2 * e]), x2 = static_cast<Acc>(a.v[2 * e + 1]);
    const T r1 = static_cast<T>(x1 * c.v[e] - x2 * s.v[e]);
    const T r2 = static_cast<T>(x2 * c.v[e] + x1 * s.v[e]);
    o.v[2 * e] = e < cnt ? r1 : a.v[2 * e];
    o.v[2 * e + 1] = e < cnt ? r2 : a.v[2 * e + 1];
  }
  store<W, kUnit>(out, ch, ocs, o);
}

// In place, the chunk holding the last rotated pairs: its first `rem` pairs (half-split) or channels
// (interleaved) are split into aligned power-of-two pieces, largest first, so that channels which do not
// rotate are neither read nor written. Piece j of a row is its own unit: the pieces of one row go to
// neighbouring lanes, whose accesses then share cache lines (one lane per row moving every piece took
// HoPE in place 20% over p-RoPE). Returns the piece's width, in pairs or channels, and sets its offset.
template <int V>
__device__ __forceinline__ int piece_of(int rem, int j, int& off) {
  off = 0;
#pragma unroll
  for (int w = V / 2; w >= 1; w /= 2) {
    if (rem & w) {
      if (j-- == 0) return w;
      off += w;
    }
  }
  return 0;
}

// w (runtime) -> the rotation of one piece of width w <= Wd (pairs half-split, channels interleaved).
template <int Wd, bool kInter, typename T, typename Acc>
__device__ __forceinline__ void rotate_piece(T* row, int ch, int h, const Acc* cs, const Acc* sn, int w) {
  if constexpr (Wd >= (kInter ? 2 : 1)) {
    if (w == Wd) {
      if constexpr (kInter) {
        rotate_inter<Wd, true>(row, 1, row, 1, ch, cs, sn, Wd / 2, false, Vec<T, Wd>{});
      } else {
        rotate_half<Wd, true>(row, 1, row, 1, ch, h, cs, sn, Wd, false, Vec<T, Wd>{}, Vec<T, Wd>{});
      }
    } else {
      rotate_piece<Wd / 2, kInter>(row, ch, h, cs, sn, w);
    }
  }
}

// n / d for 0 <= n < 2^31 by a multiply-high and a shift, d fixed per launch (Granlund-Montgomery, as in
// CUTLASS's FastDivmod). A division by a runtime int is a ~20-instruction sequence, and the unit loop did two
// per unit: on an H200 the kernel issued an instruction on ~75% of cycles (Nsight Compute), so they counted.
// Replacing them took Llama forward from 1.07x to 1.04x a copy on an H200, Gemma 1.23x -> 1.16x, Gemma 4
// out of place 1.33x -> 1.20x and in place 0.334x -> 0.306x, HoPE out of place 1.28x -> 1.16x.
struct FastDiv {
  uint32_t divisor = 1, multiplier = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int d) : divisor(static_cast<uint32_t>(std::max(1, d))) {
    if (divisor > 1) {
      int log2 = 0;  // ceil(log2(divisor))
      while ((1u << log2) < divisor) ++log2;
      const int p = 31 + log2;
      multiplier = static_cast<uint32_t>(((uint64_t{1} << p) + divisor - 1) / divisor);
      shift = static_cast<uint32_t>(p - 32);
    }
  }
  __device__ __forceinline__ int operator()(int n) const {
    return divisor == 1 ? n : static_cast<int>(__umulhi(static_cast<uint32_t>(n), multiplier) >> shift);
  }
};

struct LaunchShape {
  int64_t tokens;      // batch * seq
  int tokens_per_block;
  int heads_per_block;  // over q heads then k heads
  int units_per_head;   // whole units per head (in place: the chunks whose pairs all rotate)
  int rot_units;        // of which hold rotary pairs (half-split out of place: the rest are tail copies)
  int partial_rem;      // in place: rotated pairs (half-split) or channels (interleaved) in the last,
                        // partial chunk of each head (0: none); these chunks come after all whole units
  int partial_pieces;   // power-of-two pieces of that chunk (the set bits of partial_rem), one unit each
  int n_stride;         // cos/sin row length in shared memory (rotated_pairs rounded up to a unit)
  int cos_rows;         // cos/sin rows in shared memory: tokens_per_block, or fewer when seq_major
  bool seq_major;       // tokens in (seq, batch) order (kSeqMajor kernels): positions shared by the batch
                        // rows, a cos/sin row per position of the block
  bool prefetch;        // load each thread's first unit before the cos/sin phase
  bool pipeline;        // and each next unit before the current one's work (kPipe kernels)
  FastDiv by_units_per_head, by_heads_per_block, by_n_stride, by_partial_pieces;
};

// V: channels per unit access (16 bytes worth on the fast path, 1 otherwise). kPartial: in place with a
// partial last chunk per head. kPipe: each thread's next unit is loaded before the current unit's work.
// kSeqMajor: tokens in (seq, batch) order, cos/sin rows per position. Each is its own instantiation: carrying
// the pipeline's code in the other kernels, even switched off, measured 3-5% slower on Llama and Gemma shapes,
// and the seq-major order as a runtime switch 1-3% (Llama, decoding) on an H200.
template <typename T, int V, bool kInter, bool kPartial, bool kPipe, bool kSeqMajor>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, const LaunchShape L) {
  using Acc = at::opmath_type<T>;
  constexpr bool kUnit = V > 1;
  static_assert(!(kPipe && (kPartial || !kUnit)), "the pipeline is for whole units on the fast path");
  static_assert(!(kSeqMajor && (kPipe || kPartial || !kUnit)), "seq-major blocks only for whole units");
  // A half-split unit spans W pairs; an interleaved one W channels (W/2 pairs).
  constexpr int W = kUnit ? V : (kInter ? 2 : 1);
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* offs = reinterpret_cast<int64_t*>(smem);  // [T][4]: q_in, k_in, q_out, k_out row offsets
  int64_t* pos_s = offs + 4 * L.tokens_per_block;     // [T] positions (room for an even count: alignment)
  Acc* cos_s = reinterpret_cast<Acc*>(pos_s + (L.tokens_per_block + 1) / 2 * 2);  // [cos_rows][n_stride]
  Acc* sin_s = cos_s + L.cos_rows * L.n_stride;
  int* row_s = reinterpret_cast<int*>(sin_s + L.cos_rows * L.n_stride);  // [T] seq_major: a token's cos/sin row

  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * L.tokens_per_block;
  const int T_here = static_cast<int>(min(static_cast<int64_t>(L.tokens_per_block), L.tokens - tok0));
  const int n = p.rotated_pairs;
  const int hq = static_cast<int>(p.q_in.heads);
  const int h_total = hq + static_cast<int>(p.k_in.heads);
  const int h_begin = blockIdx.y * L.heads_per_block;
  const int h_count = min(L.heads_per_block, h_total - h_begin);
  const int uph = L.units_per_head;
  const int whole = T_here * h_count * uph;
  const int units = whole + (kPartial ? T_here * h_count * L.partial_pieces : 0);
  const int half = p.rotary_dim / 2;
  // (batch, seq) of a token; 32-bit division when the token count allows it (nearly always)
  const auto split = [&](int64_t tok, int64_t& b, int64_t& s) {
    const int64_t inner = kSeqMajor ? p.batch : p.seqlen;
    int64_t outer;
    if (L.tokens <= INT32_MAX) {
      outer = static_cast<uint32_t>(tok) / static_cast<uint32_t>(inner);
    } else {
      outer = tok / inner;
    }
    if constexpr (kSeqMajor) {
      s = outer;
      b = tok - outer * inner;
    } else {
      b = outer;
      s = tok - outer * inner;
    }
  };
  // A whole unit u of the block: its chunk, token (in the block) and head (q heads, then k heads)
  const auto locate = [&](int u, int& chunk, int& t, int& head) {
    const int r = L.by_units_per_head(u);
    chunk = u - r * uph;
    t = L.by_heads_per_block(r);  // r / h_count: the two differ only where blocks hold one token (t = 0)
    head = h_begin + (r - t * h_count);
  };
  // The input row of a head of the block's token t (its row offsets are in shared memory after phase 1)
  const auto in_row = [&](int t, int head) -> const T* {
    const bool is_q = head < hq;
    return static_cast<const T*>(is_q ? p.q_in.data : p.k_in.data) + offs[4 * t + (is_q ? 0 : 1)] +
           (is_q ? head : head - hq) * (is_q ? p.q_in.stride[2] : p.k_in.stride[2]);
  };

  // ---- 0. the thread's first unit, when it is a whole unit within rotary_dim (fast path): loaded now, so
  // that the latency of these loads overlaps phase 1 instead of following it
  Vec<T, W> pa, pb;
  bool pre = false;
  if constexpr (kUnit) {
    const int u = threadIdx.x;
    if (L.prefetch && u < whole && u - L.by_units_per_head(u) * uph < L.rot_units) {
      int chunk, t, head;
      locate(u, chunk, t, head);
      const bool is_q = head < hq;
      int64_t b, sq;
      split(tok0 + t, b, sq);
      const T* in = static_cast<const T*>(is_q ? p.q_in.data : p.k_in.data) +
                    b * (is_q ? p.q_in.stride[0] : p.k_in.stride[0]) +
                    sq * (is_q ? p.q_in.stride[1] : p.k_in.stride[1]) +
                    (is_q ? head : head - hq) * (is_q ? p.q_in.stride[2] : p.k_in.stride[2]);
      pa = load<W, true>(in, chunk * W, 1);
      if constexpr (!kInter) pb = load<W, true>(in, chunk * W + half, 1);
      pre = true;
    }
  }

  // ---- 1. per-token positions and row offsets, then cos/sin, once per block. The positions go through
  // shared memory so that each is loaded from global memory once, by one thread, all in parallel (loading
  // it for every cos/sin element put several global-memory latencies in a row before the barrier).
  // The frequency of the thread's first cos/sin element, loaded now rather than after the positions' barrier
  // (its latency was then on the way to the first rotation).
  int w_pair = -1;
  double w = 0;
  if (p.inv_freq != nullptr && static_cast<int>(threadIdx.x) < L.n_stride * L.cos_rows) {
    const int i = threadIdx.x - L.by_n_stride(threadIdx.x) * L.n_stride;
    if (i < n) {
      w = p.inv_freq[i];
      w_pair = i;
    }
  }
  // seq_major: the block's first position, row 0 of its cos/sin
  const int64_t s_first = kSeqMajor ? tok0 / p.batch : 0;
  for (int t = threadIdx.x; t < T_here; t += blockDim.x) {
    int64_t b, s;
    split(tok0 + t, b, s);
    if constexpr (!kSeqMajor) {
      pos_s[t] = p.positions[b * p.pos_stride[0] + s * p.pos_stride[1]];
    } else {
      row_s[t] = static_cast<int>(s - s_first);
      if (t == 0 || b == 0) pos_s[s - s_first] = p.positions[s * p.pos_stride[1]];
    }
    offs[4 * t + 0] = b * p.q_in.stride[0] + s * p.q_in.stride[1];
    offs[4 * t + 1] = b * p.k_in.stride[0] + s * p.k_in.stride[1];
    offs[4 * t + 2] = b * p.q_out.stride[0] + s * p.q_out.stride[1];
    offs[4 * t + 3] = b * p.k_out.stride[0] + s * p.k_out.stride[1];
  }
  __syncthreads();
  const int rows = kSeqMajor ? static_cast<int>((tok0 + T_here - 1) / p.batch - s_first + 1) : T_here;
  for (int idx = threadIdx.x; idx < rows * L.n_stride; idx += blockDim.x) {
    const int t = L.by_n_stride(idx), i = idx - t * L.n_stride;
    Acc c = 1, s = 0;  // padding: never used for output, initialised all the same
    if (i < n) {
      const int64_t pos = pos_s[t];
      if (p.inv_freq != nullptr) {
        if (i != w_pair) {
          w = p.inv_freq[i];
          w_pair = i;
        }
        angle_cos_sin(p, pos, w, c, s);
      } else if (pos < 0 || pos >= p.table_rows) {
        c = s = std::numeric_limits<Acc>::quiet_NaN();  // never read outside the table
      } else {
        pair_cos_sin(p, pos, i, c, s);
      }
    }
    cos_s[idx] = c;
    sin_s[idx] = s;
  }
  __syncthreads();

  // ---- 2. rotate (or copy) every unit of the block's tokens x heads; whole units first, the partial pieces
  // (in place only) after them, so that warps stay on one path
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    // The thread's first unit was loaded in phase 0; with kPipe, each next unit is loaded here, before this
    // unit's work, into na/nb.
    const bool have = pre;
    pre = false;
    Vec<T, W> na, nb;
    if constexpr (kPipe) {
      const int un = u + blockDim.x;
      if (un < whole && un - L.by_units_per_head(un) * uph < L.rot_units) {
        int c2, t2, head2;
        locate(un, c2, t2, head2);
        const T* in2 = in_row(t2, head2);
        na = load<W, true>(in2, c2 * W, 1);
        if constexpr (!kInter) nb = load<W, true>(in2, c2 * W + half, 1);
        pre = true;
      }
    }

    int chunk, r, piece = 0;
    if (u < whole) {
      r = L.by_units_per_head(u);
      chunk = u - r * uph;
    } else {
      chunk = uph;
      r = L.by_partial_pieces(u - whole);
      piece = u - whole - r * L.partial_pieces;
    }
    const int t = L.by_heads_per_block(r);
    const int head = h_begin + (r - t * h_count);
    const bool is_q = head < hq;
    const int hd = is_q ? head : head - hq;
    const T* in = in_row(t, head);
    T* out = static_cast<T*>(is_q ? p.q_out.data : p.k_out.data) + offs[4 * t + (is_q ? 2 : 3)] +
             hd * (is_q ? p.q_out.stride[2] : p.k_out.stride[2]);
    const int64_t ics = kUnit ? 1 : (is_q ? p.q_in.stride[3] : p.k_in.stride[3]);
    const int64_t ocs = kUnit ? 1 : (is_q ? p.q_out.stride[3] : p.k_out.stride[3]);
    const int row = kSeqMajor ? row_s[t] : t;
    const Acc* cs = cos_s + row * L.n_stride;
    const Acc* sn = sin_s + row * L.n_stride;

    if constexpr (kUnit && kPartial) {
      if (u >= whole) {  // in place: one piece of the chunk with the last rotated pairs
        int off;
        const int w = piece_of<V>(L.partial_rem, piece, off);
        rotate_piece<V / 2, kInter>(out, chunk * W + off, half, cs, sn, w);
        continue;
      }
    }
    if (chunk < L.rot_units) {
      const int ch = chunk * W;
      // cnt: the unit's rotating pairs; fewer than the unit's only out of place, where the others are copied
      const int cnt = max(0, min(n - (kInter ? ch / 2 : ch), kInter ? W / 2 : W));
      if (cnt == 0) {  // a copy (cos/sin rows hold only the rotating pairs)
        store<W, kUnit>(out, ch, ocs, have ? pa : load<W, kUnit>(in, ch, ics));
        if constexpr (!kInter) store<W, kUnit>(out, ch + half, ocs, have ? pb : load<W, kUnit>(in, ch + half, ics));
      } else if constexpr (kInter) {
        if (cnt == W / 2) {  // every pair rotates (see below)
          rotate_inter<W, kUnit>(in, ics, out, ocs, ch, cs, sn, W / 2, have, pa);
        } else {
          rotate_inter<W, kUnit>(in, ics, out, ocs, ch, cs, sn, cnt, have, pa);
        }
      } else if (cnt == W) {
        // Every pair of the unit rotates (all units but one per head at most): with the count a constant, the
        // per-element choice between rotated and copied values disappears, 16 selects per unit. On an H200
        // (outputs unchanged): Llama forward 1.041x -> 1.031x a copy, Gemma 1.095x -> 1.087x, Gemma 4 out of
        // place 1.194x -> 1.145x, p-RoPE 0.75 in place 1.008x -> 0.990x, decode 1.199x -> 1.176x.
        rotate_half<W, kUnit>(in, ics, out, ocs, ch, half, cs, sn, W, have, pa, pb);
      } else {
        rotate_half<W, kUnit>(in, ics, out, ocs, ch, half, cs, sn, cnt, have, pa, pb);
      }
    } else {  // out of place, half-split: channels past rotary_dim
      const int ch = p.rotary_dim + (chunk - L.rot_units) * W;
      store<W, kUnit>(out, ch, ocs, load<W, kUnit>(in, ch, ics));
    }
    if constexpr (kPipe) {
      pa = na;
      pb = nb;
    }
  }
}

// What launches plan for on the current device, read once per device (no synchronisation: capture-safe).
struct DevicePlan {
  int multiprocessors = 0;   // 0: not read yet
  int units_per_thread = 4;  // out of place: the most units a thread takes (the block's size in units / 128)
};

const DevicePlan& device_plan() {
  static DevicePlan cache[64];
  static const DevicePlan unknown{132, 4};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return unknown;
  DevicePlan& plan = cache[dev];
  if (plan.multiprocessors == 0) {
    int sms = 0, clock_khz = 0, bus_bits = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
    sms = std::max(1, sms);
    // A multiprocessor must keep its share of the DRAM bandwidth times the memory latency in flight (Little's
    // law), so the units a thread takes grow with the bandwidth per multiprocessor: 4 measured best on an
    // H100 (25.4 GB/s per multiprocessor), 6 on an H200 (36.5 GB/s: Llama forward 1.15x -> 1.07x a copy, 5
    // gave 1.08x, 8 was worse than 6). Within 4..8, the range measured.
    const double gb_per_s = 2e-6 * clock_khz * bus_bits / 8 / sms;  // double data rate
    plan.units_per_thread = std::clamp(static_cast<int>(std::lround(4 * gb_per_s / 25.4)), 4, 8);
    plan.multiprocessors = sms;  // last: it marks the entry as read
  }
  return plan;
}

bool aligned_rows(const RotaryTensor& x, const RotaryParams& p, int v, int bytes) {
  if (x.stride[3] != 1 || reinterpret_cast<uintptr_t>(x.data) % bytes != 0) return false;
  const int64_t sizes[3] = {p.batch, p.seqlen, x.heads};
  for (int d = 0; d < 3; ++d) {
    if (sizes[d] > 1 && x.stride[d] % v != 0) return false;
  }
  return true;
}

template <typename T, int V, bool kInter>
void launch_with(const RotaryParams& p) {
  using Acc = at::opmath_type<T>;
  constexpr bool kUnit = V > 1;
  constexpr int W = kUnit ? V : (kInter ? 2 : 1);
  constexpr int pairs_per_unit = kInter ? W / 2 : W;
  const int n = p.rotated_pairs;
  const int half = p.rotary_dim / 2;
  const int D = static_cast<int>(p.head_dim);

  LaunchShape L{};
  L.tokens = p.batch * p.seqlen;
  if (p.inplace) {  // only the chunks holding rotated pairs; a partial last chunk separately
    const int rotated = kInter ? 2 * n : n;  // channels (interleaved) or pairs (half-split)
    L.rot_units = L.units_per_head = rotated / W;
    L.partial_rem = rotated % W;
  } else if (kInter) {
    L.rot_units = L.units_per_head = D / W;
  } else {
    L.rot_units = half / W;
    L.units_per_head = L.rot_units + (D - 2 * half) / W;
  }
  const int h_total = static_cast<int>(p.q_in.heads + p.k_in.heads);
  L.partial_pieces = __builtin_popcount(L.partial_rem);
  const int per_head = L.units_per_head + L.partial_pieces;
  if (per_head == 0 || h_total == 0 || L.tokens == 0) return;  // nothing to touch
  L.n_stride = (n + pairs_per_unit - 1) / pairs_per_unit * pairs_per_unit;

  // Out of place with channels that only copy (partial rotary, p-RoPE, HoPE), a thread mostly waits for
  // loads: keeping its next unit's loads in flight too took Gemma 4 (D=512, p=0.25) from 1.20x to 1.14x and
  // HoPE from 1.21x to 1.12x a copy on an H100 (the kPipe kernels, when blocks hold whole tokens). When every
  // unit rotates it measured 5-10% slower on an H100, 11% on an H200. In place it pays where a head's rotating
  // chunks are whole and few cos/sin per unit are computed: p-RoPE 0.75 at D=128 1.07x -> 1.01x on an H200;
  // with a partial chunk (HoPE) it took 1.13x -> 1.36x, and Gemma 4 in place (a cos/sin per unit) 0.295x ->
  // 0.335x.
  const int64_t per_token = static_cast<int64_t>(h_total) * per_head;
  const bool pipelined = kUnit && (!p.inplace ? (kInter ? 2 * n < D : n < half || 2 * half < D)
                                              : L.partial_rem == 0 && (kInter ? 2 * n < p.rotary_dim : n < half) &&
                                                    4 * L.n_stride < per_token);
  // Aim for >= 4 blocks per multiprocessor when the problem allows it (but >= 64 units per block: decoding,
  // B=64 S=1, measured 1.16x -> 1.13x a copy on an H100 and 1.27x -> 1.23x on an H200 against 32), and up
  // to `units_per_thread` units per thread. In place always 4 (5 or 6 made HoPE and p-RoPE in place 5-15%
  // slower on an H200); the pipelined kernels at least 6 (Gemma 4 out of place 1.13x -> 1.08x, HoPE 1.11x ->
  // 1.06x on an H100, 1.42x -> 1.33x and 1.39x -> 1.28x on an H200; 6 for the others made them 2-4% slower
  // on an H100).
  const int64_t total = L.tokens * per_token;
  const DevicePlan& dev = device_plan();
  const int units_per_thread = p.inplace ? 4 : pipelined ? std::max(6, dev.units_per_thread) : dev.units_per_thread;
  const int64_t target = std::min<int64_t>(units_per_thread * kThreads,
                                           std::max<int64_t>(64, total / (4 * dev.multiprocessors)));
  const int max_tokens_smem =
      std::max(1, static_cast<int>(32768 / (6 * sizeof(int64_t) + 2 * sizeof(Acc) * std::max(1, L.n_stride))));
  int splits = 1;
  if (per_token <= target) {
    L.tokens_per_block = static_cast<int>(std::min<int64_t>({target / per_token, 64, max_tokens_smem, L.tokens}));
    L.heads_per_block = h_total;
  } else {
    L.tokens_per_block = 1;
    splits = static_cast<int>(std::min<int64_t>(h_total, (per_token + target - 1) / target));
    L.heads_per_block = (h_total + splits - 1) / splits;
    splits = (h_total + L.heads_per_block - 1) / L.heads_per_block;
  }
  // Measured on an H100: prefetching pays off when blocks hold whole tokens (about 8% on Llama shapes) and
  // costs about 6% when they hold a slice of one token's heads (decoding, where latency dominates).
  // (On an H200 too, prefetching in split tokens measured 1.22x -> 1.28x a copy when decoding.)
  L.prefetch = splits == 1;
  L.pipeline = pipelined && L.prefetch;
  // Positions shared by the batch rows (the default positions, transformers' position_ids) and a cos/sin
  // element for every few units (>= 1 per 4: Gemma's D=256 with one k head, Gemma 4 in place): blocks take
  // tokens in (seq, batch) order, so that the batch rows of one position share its cos/sin, and a whole
  // number of positions when they hold at least one. On an H200: Gemma 1.17x -> 1.09x a copy, Gemma 4 in
  // place 0.306x -> 0.287x. Where cos/sin are a small share (Llama: 64 per 320 units), the same order
  // measured 1-2% slower (four streams of rows at once instead of one), so it is not used there.
  L.seq_major = kUnit && !L.pipeline && L.partial_rem == 0 && p.pos_stride[0] == 0 && p.batch > 1 &&
                L.tokens_per_block > 1 && 4 * L.n_stride >= per_token;
  if (L.seq_major && L.tokens_per_block >= p.batch) {
    const int64_t rounded = (L.tokens_per_block + p.batch / 2) / p.batch * p.batch;
    L.tokens_per_block = static_cast<int>(std::min<int64_t>({rounded, 64, max_tokens_smem, L.tokens}));
  }
  L.cos_rows = L.seq_major ? static_cast<int>(std::min<int64_t>(L.tokens_per_block,
                                                                (L.tokens_per_block + p.batch - 2) / p.batch + 1))
                           : L.tokens_per_block;
  L.by_units_per_head = FastDiv(L.units_per_head);
  L.by_heads_per_block = FastDiv(L.heads_per_block);
  L.by_n_stride = FastDiv(L.n_stride);
  L.by_partial_pieces = FastDiv(L.partial_pieces);
  const int64_t units_per_block = static_cast<int64_t>(L.tokens_per_block) * L.heads_per_block * per_head;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (units_per_block + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>((L.tokens + L.tokens_per_block - 1) / L.tokens_per_block), splits);
  const size_t smem = L.tokens_per_block * (4 * sizeof(int64_t) + sizeof(int)) +
                      (L.tokens_per_block + 1) / 2 * 2 * sizeof(int64_t) + 2 * sizeof(Acc) * L.cos_rows * L.n_stride;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (kUnit) {
    if (L.partial_rem != 0) {
      rotary_kernel<T, V, kInter, true, false, false><<<grid, threads, smem, stream>>>(p, L);
    } else if (L.pipeline) {
      rotary_kernel<T, V, kInter, false, true, false><<<grid, threads, smem, stream>>>(p, L);
    } else if (L.seq_major) {
      rotary_kernel<T, V, kInter, false, false, true><<<grid, threads, smem, stream>>>(p, L);
    } else {
      rotary_kernel<T, V, kInter, false, false, false><<<grid, threads, smem, stream>>>(p, L);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  rotary_kernel<T, V, kInter, false, false, false><<<grid, threads, smem, stream>>>(p, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const RotaryParams& p) {
  constexpr int V = 16 / sizeof(T);
  const int half = p.rotary_dim / 2;
  bool vec = p.head_dim % V == 0 && (p.interleaved || half % V == 0);
  for (const RotaryTensor* x : {&p.q_in, &p.k_in, &p.q_out, &p.k_out}) {
    vec = vec && (x->heads == 0 || aligned_rows(*x, p, V, 16));
  }
  if (p.interleaved) {
    vec ? launch_with<T, V, true>(p) : launch_with<T, 1, true>(p);
  } else {
    vec ? launch_with<T, V, false>(p) : launch_with<T, 1, false>(p);
  }
}

void launch_cuda(const RotaryParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "posenc_rotary_cuda",
                                  [&] { launch_typed<scalar_t>(p); });
}

POSENC_DEFINE_BACKEND(rotary_cuda, launch_cuda)

// The registered entry points: the device guard makes the current stream and allocations those of q's GPU.
std::tuple<at::Tensor, at::Tensor> rotary_cuda_entry(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
    const at::Tensor& positions, double scale, int64_t rotary_dim, int64_t rotated_pairs, bool interleaved,
    bool inverse) {
  TORCH_CHECK_VALUE(q.is_cuda() && k.is_cuda(), "posenc::rotary: q, k and positions must be on one device");
  const c10::cuda::CUDAGuard guard(q.device());
  return rotary_cuda(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs, interleaved,
                     inverse);
}

void rotary_cuda_entry_(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
                        const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
                        const at::Tensor& positions, double scale, int64_t rotary_dim, int64_t rotated_pairs,
                        bool interleaved, bool inverse) {
  TORCH_CHECK_VALUE(q.is_cuda() && k.is_cuda(), "posenc::rotary: q, k and positions must be on one device");
  const c10::cuda::CUDAGuard guard(q.device());
  rotary_cuda_(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs, interleaved, inverse);
}

}  // namespace
}  // namespace posenc

TORCH_LIBRARY_IMPL(posenc, CUDA, m) {
  m.impl("rotary", &posenc::rotary_cuda_entry);
  m.impl("rotary_", &posenc::rotary_cuda_entry_);
}
