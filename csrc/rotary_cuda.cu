// The rotary op on NVIDIA GPUs: q and k of a few tokens in one block, one launch for both.
//
// Work split. A block owns T consecutive tokens (b, s) and a range of heads (q heads first, then k heads);
// tokens are consecutive in (batch, seq) order, or in (seq, batch) order (seq-major) when the batch rows share
// positions and cos/sin is a large part of the work, so that a block computes cos/sin once per position.
//  0. Each thread first issues the loads of its first unit, so that their latency overlaps step 1 rather
//     than following the barrier (blocks are short-lived, so that latency is a large share of their time).
//  1. The block's positions and the addresses of its head rows (input and output) go to shared memory,
//     one token or row per thread (so no 64-bit division is left for the hot loop, and each position is loaded
//     once); then cos/sin of those tokens (float32; float64 for float64 data), as rotary.h defines them:
//     table lookup, or position * inv_freq reduced mod 2*pi in float64 followed by an accurate sincos (this
//     file is built without --use_fast_math, so no __sincosf).
//  2. Every thread then takes "units" of (token, head, chunk): with 16-byte vectors (the fast path: unit
//     channel stride, 16-byte aligned rows) a half-split unit is V consecutive pairs — one vector of the first
//     half and the matching vector of the second half — and an interleaved unit is one vector (V/2 pairs).
//     Without it (any strides, odd offsets), a unit is one pair read with its channel stride.
// In place, only the units holding rotated pairs are visited; the pairs of the last one that do not rotate are
// written back unchanged. Out of place, the other units copy (vectorised too).
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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "launch_plan.h"
#include "rotary_op.h"

namespace posenc {
namespace {

// The scalar path's W channels (any channel stride): W elements.
template <typename T, int W>
struct alignas(sizeof(T) * W > 16 ? 16 : sizeof(T) * W) Vec {
  T v[W];
};

template <int W, typename T>
__device__ __forceinline__ Vec<T, W> load(const T* row, int ch, int64_t cs) {
  Vec<T, W> r;
#pragma unroll
  for (int e = 0; e < W; ++e) r.v[e] = row[(ch + e) * cs];
  return r;
}

template <int W, typename T>
__device__ __forceinline__ void store(T* row, int ch, int64_t cs, const Vec<T, W>& x) {
#pragma unroll
  for (int e = 0; e < W; ++e) row[(ch + e) * cs] = x.v[e];
}

// The fast path's 16 bytes (unit channel stride, alignment checked on the host), as four 32-bit words: the
// elements of 2-byte types are taken from and put into their half of a word directly (as 16-bit values they
// cost an extraction each way). Global accesses: the rows' addresses come from shared memory, where the
// compiler no longer knows that they point at global memory. Volatile: in program order, as plain accesses
// through pointers that may alias.
struct Words {
  uint32_t w[4];
};

__device__ __forceinline__ Words load_words(const void* at) {
  Words x;
  asm volatile("ld.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(x.w[0]), "=r"(x.w[1]), "=r"(x.w[2]), "=r"(x.w[3])
               : "l"(at));
  return x;
}

__device__ __forceinline__ void store_words(void* at, const Words& x) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(at), "r"(x.w[0]), "r"(x.w[1]), "r"(x.w[2]),
               "r"(x.w[3])
               : "memory");
}

// Element e of a unit's vector, in the arithmetic type (exactly).
template <typename T, typename Acc, int W>
__device__ __forceinline__ Acc element(const Vec<T, W>& x, int e) {
  return static_cast<Acc>(x.v[e]);
}
template <typename T, typename Acc>
__device__ __forceinline__ Acc element(const Words& x, int e) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t w = x.w[e / 2];
    return __uint_as_float(e % 2 ? w & 0xffff0000u : w << 16);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const uint32_t w = x.w[e / 2];
    return __half2float(__ushort_as_half(static_cast<unsigned short>(e % 2 ? w >> 16 : w & 0xffffu)));
  } else if constexpr (sizeof(T) == 4) {
    return __uint_as_float(x.w[e]);
  } else {
    return __hiloint2double(static_cast<int>(x.w[2 * e + 1]), static_cast<int>(x.w[2 * e]));
  }
}

// The vector holding r[e] (rounded to T, to nearest even, as c10's conversions do) for e < cnt and x's
// elements, bit for bit, for the others.
template <typename T, typename Acc, int W>
__device__ __forceinline__ Vec<T, W> with_rotated(const Acc (&r)[W], const Vec<T, W>& x, int cnt) {
  Vec<T, W> o;
#pragma unroll
  for (int e = 0; e < W; ++e) o.v[e] = e < cnt ? static_cast<T>(r[e]) : x.v[e];
  return o;
}
template <typename T, typename Acc, int W>
__device__ __forceinline__ Words with_rotated(const Acc (&r)[W], const Words& x, int cnt) {
  Words o;
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t v;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(r[2 * j], r[2 * j + 1]);
        memcpy(&v, &h, sizeof v);
      } else {
        const __half2 h = __floats2half2_rn(r[2 * j], r[2 * j + 1]);
        memcpy(&v, &h, sizeof v);
      }
      const uint32_t keep = (2 * j < cnt ? 0u : 0xffffu) | (2 * j + 1 < cnt ? 0u : 0xffff0000u);
      o.w[j] = (v & ~keep) | (x.w[j] & keep);
    }
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) o.w[j] = j < cnt ? __float_as_uint(r[j]) : x.w[j];
  } else {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      o.w[2 * e] = e < cnt ? static_cast<uint32_t>(__double2loint(r[e])) : x.w[2 * e];
      o.w[2 * e + 1] = e < cnt ? static_cast<uint32_t>(__double2hiint(r[e])) : x.w[2 * e + 1];
    }
  }
  return o;
}

// Half-split: a and b hold pairs ch..ch+W-1 (channels [ch, ch+W) and [ch+h, ch+h+W)); the first `cnt` rotate,
// the others keep their values (cnt == W: all rotate). cs/sn point at the token's cos/sin row in shared memory.
template <typename T, int W, typename Acc, typename C>
__device__ __forceinline__ void rotate_half(C& a, C& b, int ch, const Acc* cs, const Acc* sn, int cnt) {
  const Vec<Acc, W> c = *reinterpret_cast<const Vec<Acc, W>*>(cs + ch);
  const Vec<Acc, W> s = *reinterpret_cast<const Vec<Acc, W>*>(sn + ch);
  Acc r1[W], r2[W];
#pragma unroll
  for (int e = 0; e < W; ++e) {
    const Acc x1 = element<T, Acc>(a, e), x2 = element<T, Acc>(b, e);
    r1[e] = x1 * c.v[e] - x2 * s.v[e];
    r2[e] = x2 * c.v[e] + x1 * s.v[e];
  }
  a = with_rotated<T>(r1, a, cnt);
  b = with_rotated<T>(r2, b, cnt);
}

// Interleaved: a holds channels [ch, ch+W) (ch even), pairs ch/2 .. ch/2 + W/2 - 1; the first `cnt` rotate.
template <typename T, int W, typename Acc, typename C>
__device__ __forceinline__ void rotate_inter(C& a, int ch, const Acc* cs, const Acc* sn, int cnt) {
  const Vec<Acc, W / 2> c = *reinterpret_cast<const Vec<Acc, W / 2>*>(cs + ch / 2);
  const Vec<Acc, W / 2> s = *reinterpret_cast<const Vec<Acc, W / 2>*>(sn + ch / 2);
  Acc r[W];
#pragma unroll
  for (int e = 0; e < W / 2; ++e) {
    const Acc x1 = element<T, Acc>(a, 2 * e), x2 = element<T, Acc>(a, 2 * e + 1);
    r[2 * e] = x1 * c.v[e] - x2 * s.v[e];
    r[2 * e + 1] = x2 * c.v[e] + x1 * s.v[e];
  }
  a = with_rotated<T>(r, a, 2 * cnt);
}

// n / d for 0 <= n < 2^31 by a multiply-high and a shift, d fixed per launch (Granlund-Montgomery, as in
// CUTLASS's FastDivmod): a division by a runtime int is a ~20-instruction sequence, and the unit loop, two
// per unit, is bound by instruction issue.
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
  int units_per_head;   // units per head (in place: those holding rotated pairs)
  int rot_units;        // of which hold rotary pairs (half-split out of place: the rest are tail copies)
  int n_stride;         // cos/sin row length in shared memory (rotated_pairs rounded up to a unit)
  int cos_rows;         // cos/sin rows in shared memory: tokens_per_block, or fewer when seq_major
  bool seq_major;       // tokens in (seq, batch) order (kSeqMajor kernels): positions shared by the batch
                        // rows, a cos/sin row per position of the block
  bool prefetch;        // load each thread's first unit before the cos/sin phase
  bool pipeline;        // and each next unit before the current one's work (kPipe kernels)
  FastDiv by_units_per_head, by_heads_per_block, by_n_stride;
  FastDiv by_inner;  // batch (seq_major) or seqlen: a token's outer index, when tokens <= INT32_MAX
};

// One block's work, as the file's header comment describes it: the kernel below runs phase 0, phase 1 and
// phase 2 of it in turn. V: channels per unit access (16 bytes worth on the fast path, 1 otherwise).
// kPipe: each thread's next unit is loaded before the current unit's work. kSeqMajor: tokens in (seq, batch)
// order, cos/sin rows per position. Each is its own instantiation: as runtime switches they cost the other
// kernels time even when off.
template <typename T, int V, bool kInter, bool kPipe, bool kSeqMajor>
struct RotaryBlock {
  using Acc = at::opmath_type<T>;
  static constexpr bool kUnit = V > 1;
  static_assert(!(kPipe && !kUnit), "the pipeline is for the fast path");
  static_assert(!(kSeqMajor && (kPipe || !kUnit)), "seq-major blocks only on the fast path");
  // A half-split unit spans W pairs; an interleaved one W channels (W/2 pairs).
  static constexpr int W = kUnit ? V : (kInter ? 2 : 1);
  using Chunk = std::conditional_t<kUnit, Words, Vec<T, W>>;

  // A head row of the block: where its input and its output start
  struct Row {
    const T* in;
    T* out;
  };

  const RotaryParams& p;
  const LaunchShape& L;
  Row* rows_s;     // [T * heads_per_block]: row r = t * h_count + (head - h_begin)
  int64_t* pos_s;  // [T] positions (room for an even count: alignment)
  Acc* cos_s;      // [cos_rows][n_stride]
  Acc* sin_s;
  int* row_s;  // [T] seq_major: a token's cos/sin row
  int64_t tok0;
  int T_here, n, hq, h_begin, h_count, uph, units, half;

  __device__ __forceinline__ RotaryBlock(const RotaryParams& p_, const LaunchShape& L_, unsigned char* smem)
      : p(p_), L(L_) {
    rows_s = reinterpret_cast<Row*>(smem);
    pos_s = reinterpret_cast<int64_t*>(rows_s + L.tokens_per_block * L.heads_per_block);
    cos_s = reinterpret_cast<Acc*>(pos_s + (L.tokens_per_block + 1) / 2 * 2);
    sin_s = cos_s + L.cos_rows * L.n_stride;
    row_s = reinterpret_cast<int*>(sin_s + L.cos_rows * L.n_stride);
    tok0 = static_cast<int64_t>(blockIdx.x) * L.tokens_per_block;
    T_here = static_cast<int>(min(static_cast<int64_t>(L.tokens_per_block), L.tokens - tok0));
    n = p.rotated_pairs;
    hq = static_cast<int>(p.q_in.heads);
    const int h_total = hq + static_cast<int>(p.k_in.heads);
    h_begin = blockIdx.y * L.heads_per_block;
    h_count = min(L.heads_per_block, h_total - h_begin);
    uph = L.units_per_head;
    units = T_here * h_count * uph;
    half = p.rotary_dim / 2;
  }

  // The token's outer index: batch row, or position (seq-major); by a multiply and a shift when the token
  // count allows it (nearly always)
  __device__ __forceinline__ int64_t outer(int64_t tok) const {
    return L.tokens <= INT32_MAX ? L.by_inner(static_cast<int>(tok)) : tok / (kSeqMajor ? p.batch : p.seqlen);
  }
  // (batch, seq) of a token
  __device__ __forceinline__ void split(int64_t tok, int64_t& b, int64_t& s) const {
    const int64_t o = outer(tok);
    if constexpr (kSeqMajor) {
      s = o;
      b = tok - o * p.batch;
    } else {
      b = o;
      s = tok - o * p.seqlen;
    }
  }
  // Whether unit u is one within rotary_dim, the kind that phase 0 and the pipeline load early
  __device__ __forceinline__ bool early(int u) const {
    return u < units && u - L.by_units_per_head(u) * uph < L.rot_units;
  }
  // Row r of the block: its token (in the block) and head (q heads, then k heads)
  __device__ __forceinline__ void locate_row(int r, int& t, int& head) const {
    t = L.by_heads_per_block(r);  // r / h_count: the two differ only where blocks hold one token (t = 0)
    head = h_begin + (r - t * h_count);
  }
  // Where head row r of the block starts, in the input and in the output
  __device__ __forceinline__ Row row_address(int r) const {
    int t, head;
    locate_row(r, t, head);
    int64_t b, s;
    split(tok0 + t, b, s);
    const bool is_q = head < hq;
    const RotaryTensor& x = is_q ? p.q_in : p.k_in;
    const RotaryTensor& y = is_q ? p.q_out : p.k_out;
    const int64_t hd = is_q ? head : head - hq;
    return {static_cast<const T*>(x.data) + b * x.stride[0] + s * x.stride[1] + hd * x.stride[2],
            static_cast<T*>(y.data) + b * y.stride[0] + s * y.stride[1] + hd * y.stride[2]};
  }
  // W channels of a row from channel ch (cs: the channel stride, 1 on the fast path)
  __device__ __forceinline__ Chunk load_chunk(const T* row, int ch, int64_t cs) const {
    if constexpr (kUnit) {
      return load_words(row + ch);
    } else {
      return load<W>(row, ch, cs);
    }
  }
  __device__ __forceinline__ void store_chunk(T* row, int ch, int64_t cs, const Chunk& x) const {
    if constexpr (kUnit) {
      store_words(row + ch, x);
    } else {
      store<W>(row, ch, cs, x);
    }
  }
  // The two vectors of unit `chunk` of a row (one when interleaved)
  __device__ __forceinline__ void load_unit(const T* in, int chunk, Chunk& a, Chunk& b) const {
    a = load_chunk(in, chunk * W, 1);
    if constexpr (!kInter) b = load_chunk(in, chunk * W + half, 1);
  }

  // ---- 0. the thread's first unit, when it is a unit within rotary_dim (fast path): loaded now, so
  // that the latency of these loads overlaps phase 1 instead of following it. Its row address is not in shared
  // memory yet, hence formed here. Returns whether it loaded.
  __device__ __forceinline__ bool load_first_unit(Chunk& a, Chunk& b) const {
    if constexpr (kUnit) {
      const int u = threadIdx.x;
      if (L.prefetch && early(u)) {
        const int r = L.by_units_per_head(u), chunk = u - r * uph;
        const T* in = row_address(r).in;
        load_unit(in, chunk, a, b);
        return true;
      }
    }
    return false;
  }

  // ---- 1. per-token positions and the head rows' addresses, then cos/sin, once per block (two steps, a
  // barrier after each). The positions go through shared memory so that each is loaded from global memory
  // once, by one thread, all in parallel (loading it for every cos/sin element put several global-memory
  // latencies in a row before the barrier). The rows' addresses are formed once a row rather than once a
  // unit: phase 2 issues instructions on most cycles, and they were about half of a unit's.
  // The frequency of the thread's first cos/sin element, loaded before the positions rather than after their
  // barrier (its latency was then on the way to the first rotation); pair -1: none.
  struct Frequency {
    int pair = -1;
    double w = 0;
  };
  __device__ __forceinline__ Frequency first_frequency() const {
    Frequency f;
    if (p.inv_freq != nullptr && static_cast<int>(threadIdx.x) < L.n_stride * L.cos_rows) {
      const int i = threadIdx.x - L.by_n_stride(threadIdx.x) * L.n_stride;
      if (i < n) {
        f.w = p.inv_freq[i];
        f.pair = i;
      }
    }
    return f;
  }
  // seq_major: the block's first position, row 0 of its cos/sin
  __device__ __forceinline__ int64_t first_position() const { return kSeqMajor ? outer(tok0) : 0; }
  __device__ __forceinline__ void stage_tokens() const {
    const int64_t s_first = first_position();
    const int rows = T_here * h_count;
    for (int i = threadIdx.x; i < max(T_here, rows); i += blockDim.x) {
      // Token i's position is loaded first and stored last, so that its latency overlaps row i's addresses
      // (decoding, where blocks are few and short, waits for both otherwise).
      int64_t pos = 0;
      int pos_at = -1;
      if (i < T_here) {
        int64_t b, s;
        split(tok0 + i, b, s);
        if constexpr (!kSeqMajor) {
          pos = p.positions[b * p.pos_stride[0] + s * p.pos_stride[1]];
          pos_at = i;
        } else {
          row_s[i] = static_cast<int>(s - s_first);
          if (i == 0 || b == 0) {
            pos = p.positions[s * p.pos_stride[1]];
            pos_at = static_cast<int>(s - s_first);
          }
        }
      }
      if (i < rows) rows_s[i] = row_address(i);
      if (pos_at >= 0) pos_s[pos_at] = pos;
    }
  }
  __device__ __forceinline__ void stage_cos_sin(Frequency f) const {
    const int rows =
        kSeqMajor ? static_cast<int>(outer(tok0 + T_here - 1) - first_position() + 1) : T_here;
    for (int idx = threadIdx.x; idx < rows * L.n_stride; idx += blockDim.x) {
      const int t = L.by_n_stride(idx), i = idx - t * L.n_stride;
      Acc c = 1, s = 0;  // padding: never used for output, initialised all the same
      if (i < n) {
        const int64_t pos = pos_s[t];
        if (p.inv_freq != nullptr) {
          if (i != f.pair) {
            f.w = p.inv_freq[i];
            f.pair = i;
          }
          angle_cos_sin(p, pos, f.w, c, s);
        } else if (pos < 0 || pos >= p.table_rows) {
          c = s = std::numeric_limits<Acc>::quiet_NaN();  // never read outside the table
        } else {
          pair_cos_sin(p, pos, i, c, s);
        }
      }
      cos_s[idx] = c;
      sin_s[idx] = s;
    }
  }

  // The unit's rotation: half-split (a, b) or interleaved (a)
  __device__ __forceinline__ void rotate(Chunk& a, Chunk& b, int ch, const Acc* cs, const Acc* sn, int cnt) const {
    if constexpr (kInter) {
      rotate_inter<T, W>(a, ch, cs, sn, cnt);
    } else {
      rotate_half<T, W>(a, b, ch, cs, sn, cnt);
    }
  }

  // ---- 2. rotate (or copy) unit u of the block's tokens x heads. have: a and b hold the unit's vectors already.
  __device__ __forceinline__ void rotate_unit(int u, bool have, Chunk& a, Chunk& b) const {
    const int r = L.by_units_per_head(u);
    const int chunk = u - r * uph;
    int t, head;
    locate_row(r, t, head);
    const Row rw = rows_s[r];
    const T* in = rw.in;
    T* out = rw.out;
    const bool is_q = head < hq;  // (the channel strides of the scalar path)
    const int64_t ics = kUnit ? 1 : (is_q ? p.q_in.stride[3] : p.k_in.stride[3]);
    const int64_t ocs = kUnit ? 1 : (is_q ? p.q_out.stride[3] : p.k_out.stride[3]);
    const int row = kSeqMajor ? row_s[t] : t;
    const Acc* cs = cos_s + row * L.n_stride;
    const Acc* sn = sin_s + row * L.n_stride;

    if (chunk < L.rot_units) {
      const int ch = chunk * W;
      if (!have) {  // loaded into the registers of the prefetched vectors: no choice between the two later
        a = load_chunk(in, ch, ics);
        if constexpr (!kInter) b = load_chunk(in, ch + half, ics);
      }
      constexpr int kPairs = kInter ? W / 2 : W;  // a unit's pairs
      const int first = kInter ? ch / 2 : ch;     // its first pair
      if (n % kPairs == 0) {
        // Every rotating unit rotates all its pairs (the others none): with the count a constant, the
        // per-element choice between rotated and kept values disappears. The test is uniform over the launch so
        // that no warp runs both paths (a test of each unit's count compiles to one that sends the lanes of a
        // head's last unit down the other path, and every warp holds such lanes).
        if (first < n) rotate(a, b, ch, cs, sn, kPairs);
      } else {
        // the last unit holding rotating pairs rotates `cnt` of them and keeps the others (copied out of
        // place, written back unchanged in place); units past it keep all theirs (out of place only)
        const int cnt = min(n - first, kPairs);
        if (cnt > 0) rotate(a, b, ch, cs, sn, cnt);
      }
      store_chunk(out, ch, ocs, a);
      if constexpr (!kInter) store_chunk(out, ch + half, ocs, b);
    } else {  // out of place, half-split: channels past rotary_dim
      const int ch = p.rotary_dim + (chunk - L.rot_units) * W;
      store_chunk(out, ch, ocs, load_chunk(in, ch, ics));
    }
  }
};

template <typename T, int V, bool kInter, bool kPipe, bool kSeqMajor>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, const LaunchShape L) {
  extern __shared__ __align__(16) unsigned char smem[];
  using Block = RotaryBlock<T, V, kInter, kPipe, kSeqMajor>;
  using Chunk = typename Block::Chunk;
  const Block blk(p, L, smem);

  Chunk pa, pb;  // the vectors of the thread's next unit, when `pre`
  bool pre = blk.load_first_unit(pa, pb);  // phase 0

  const typename Block::Frequency f = blk.first_frequency();  // phase 1
  blk.stage_tokens();
  __syncthreads();
  blk.stage_cos_sin(f);
  __syncthreads();

  for (int u = threadIdx.x; u < blk.units; u += blockDim.x) {  // phase 2
    // With kPipe, the thread's next unit is loaded before this unit's work, into na/nb.
    const bool have = pre;
    pre = false;
    Chunk na, nb;
    if constexpr (kPipe) {
      const int un = u + blockDim.x;
      if (blk.early(un)) {
        const int r2 = blk.L.by_units_per_head(un);
        blk.load_unit(blk.rows_s[r2].in, un - r2 * blk.uph, na, nb);
        pre = true;
      }
    }
    blk.rotate_unit(u, have, pa, pb);
    if constexpr (kPipe) {
      pa = na;
      pb = nb;
    }
  }
}

// What launches plan for on the current device, read once per device (no synchronisation: capture-safe).
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
    const DevicePlan read = plan_device(sms, clock_khz, bus_bits);
    plan.units_per_thread = read.units_per_thread;
    plan.multiprocessors = read.multiprocessors;  // last: it marks the entry as read
  }
  return plan;
}

PlanTensor plan_tensor(const RotaryTensor& x) {
  return {reinterpret_cast<uintptr_t>(x.data), x.heads, {x.stride[0], x.stride[1], x.stride[2], x.stride[3]}};
}

// Launches the kernel instantiation that the plan names (V: plan.vector).
template <typename T, int V, bool kInter>
void launch_with(const RotaryParams& p, const LaunchPlan& plan) {
  LaunchShape L{};
  L.tokens = plan.tokens;
  L.tokens_per_block = plan.tokens_per_block;
  L.heads_per_block = plan.heads_per_block;
  L.units_per_head = plan.units_per_head;
  L.rot_units = plan.rot_units;
  L.n_stride = plan.n_stride;
  L.cos_rows = plan.cos_rows;
  L.seq_major = plan.seq_major;
  L.prefetch = plan.prefetch;
  L.pipeline = plan.pipeline;
  L.by_units_per_head = FastDiv(L.units_per_head);
  L.by_heads_per_block = FastDiv(L.heads_per_block);
  L.by_n_stride = FastDiv(L.n_stride);
  L.by_inner = FastDiv(static_cast<int>(std::min<int64_t>(plan.seq_major ? p.batch : p.seqlen, INT32_MAX)));
  const dim3 grid(static_cast<unsigned>(plan.token_blocks), static_cast<unsigned>(plan.head_blocks));
  const int threads = plan.threads;
  const size_t smem = plan.shared_bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (V > 1) {
    switch (plan.kernel) {
      case KernelKind::kPipelined:
        rotary_kernel<T, V, kInter, true, false><<<grid, threads, smem, stream>>>(p, L);
        break;
      case KernelKind::kSeqMajor:
        rotary_kernel<T, V, kInter, false, true><<<grid, threads, smem, stream>>>(p, L);
        break;
      default:
        rotary_kernel<T, V, kInter, false, false><<<grid, threads, smem, stream>>>(p, L);
    }
  } else {  // the scalar path has one kernel (the planner chooses no other for it)
    rotary_kernel<T, V, kInter, false, false><<<grid, threads, smem, stream>>>(p, L);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const RotaryParams& p) {
  using Acc = at::opmath_type<T>;
  PlanInput in{};
  in.q_in = plan_tensor(p.q_in);
  in.k_in = plan_tensor(p.k_in);
  in.q_out = plan_tensor(p.q_out);
  in.k_out = plan_tensor(p.k_out);
  in.batch = p.batch;
  in.seqlen = p.seqlen;
  in.head_dim = p.head_dim;
  in.rotary_dim = p.rotary_dim;
  in.rotated_pairs = p.rotated_pairs;
  in.interleaved = p.interleaved;
  in.inplace = p.inplace;
  in.shared_positions = p.pos_stride[0] == 0;
  in.element_bytes = sizeof(T);
  in.arithmetic_bytes = sizeof(Acc);
  const LaunchPlan plan = plan_launch(in, device_plan());
  if (plan.kernel == KernelKind::kNone) return;  // nothing to touch
  constexpr int V = 16 / sizeof(T);
  if (p.interleaved) {
    plan.vector > 1 ? launch_with<T, V, true>(p, plan) : launch_with<T, 1, true>(p, plan);
  } else {
    plan.vector > 1 ? launch_with<T, V, false>(p, plan) : launch_with<T, 1, false>(p, plan);
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
