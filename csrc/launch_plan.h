// How csrc/rotary_cuda.cu launches its kernel: every decision the host takes before a launch (fast path or
// not, which kernel, tokens and heads per block, threads, grid, shared memory), as pure functions of sizes,
// strides, alignments and the device's figures. Plain C++17 without CUDA, so that tests/test_launch_plan.py
// compiles it on any machine and checks the plans against the kernel's contract (rotary_cuda.cu's header).
// What each threshold measured: docs/benchmarks.md, "The CUDA kernel's choices, as measured".
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace posenc {

// Threads per block, at most (fewer when a block has fewer units). More blocks per multiprocessor, forced with
// __launch_bounds__, spill registers in the unit loop.
constexpr int kThreads = 128;
// Shared memory a block may use (the per-token rows and the cos/sin rows); well below the 48 KiB a launch
// gets without opting in, so that several blocks share a multiprocessor.
constexpr int kSharedBudget = 32768;
// Tokens per block, at most.
constexpr int kMaxTokensPerBlock = 64;

// What launches plan for on a device.
struct DevicePlan {
  int multiprocessors = 0;   // 0: not read yet
  // in place where cos/sin are a large share: the most units a thread takes (units of a block / 128)
  int units_per_thread = 4;
};

// A multiprocessor must keep its share of the DRAM bandwidth times the memory latency in flight (Little's law),
// so the units a thread takes grow with the bandwidth per multiprocessor: 4 at an H100's 25.4 GB/s, within
// 4..8 (the range measured). Since the kernel's loop was shortened, only in-place blocks whose cos/sin are a
// large share use this figure (plan_launch).
inline DevicePlan plan_device(int multiprocessors, int memory_clock_khz, int memory_bus_bits) {
  DevicePlan plan;
  const int sms = std::max(1, multiprocessors);
  const double gb_per_s = 2e-6 * memory_clock_khz * memory_bus_bits / 8 / sms;  // double data rate
  plan.units_per_thread = std::clamp(static_cast<int>(std::lround(4 * gb_per_s / 25.4)), 4, 8);
  plan.multiprocessors = sms;
  return plan;
}

// One of q/k in/out as the kernel sees it: [batch, seq, heads, head_dim] with strides in elements.
struct PlanTensor {
  uint64_t address;  // of element 0, in bytes
  int64_t heads;
  int64_t stride[4];  // batch, seq, head, channel
};

struct PlanInput {
  PlanTensor q_in, k_in, q_out, k_out;  // *_out equal to *_in when in place
  int64_t batch, seqlen, head_dim;
  int rotary_dim, rotated_pairs;  // as in RotaryParams (rotary.h): rotary_dim even, pairs <= rotary_dim / 2
  bool interleaved, inplace;
  bool shared_positions;  // the positions' batch stride is 0: every batch row has the same positions
  int element_bytes;      // of q and k's dtype: 2, 4 or 8
  int arithmetic_bytes;   // of the arithmetic type, in which cos/sin sit in shared memory: 4 (8 for float64)
};

// Which instantiation of the kernel runs (rotary_kernel's kPipe / kSeqMajor), or none.
enum class KernelKind { kNone, kPlain, kPipelined, kSeqMajor };

struct LaunchPlan {
  KernelKind kernel = KernelKind::kNone;  // kNone: nothing to touch, no launch
  int vector = 1;  // V: channels per access, 16 bytes' worth on the fast path, 1 otherwise
  // the kernel's LaunchShape (rotary_cuda.cu, where each field is described), less its divisors
  int64_t tokens = 0;
  int tokens_per_block = 0, heads_per_block = 0, units_per_head = 0, rot_units = 0, n_stride = 0, cos_rows = 0;
  bool seq_major = false, prefetch = false, pipeline = false;
  int threads = 0;          // per block
  int64_t token_blocks = 0;  // grid.x: blocks over the tokens
  int head_blocks = 0;      // grid.y: blocks over a token's heads (q heads, then k heads)
  size_t shared_bytes = 0;  // dynamic shared memory per block
};

// Whether 16-byte vectors can move x's rows: unit channel stride, element 0 on a multiple of `bytes`, and
// every stride of an extent > 1 a multiple of v elements (so that every row starts aligned).
inline bool aligned_rows(const PlanTensor& x, const PlanInput& in, int v, int bytes) {
  if (x.stride[3] != 1 || x.address % bytes != 0) return false;
  const int64_t sizes[3] = {in.batch, in.seqlen, x.heads};
  for (int d = 0; d < 3; ++d) {
    if (sizes[d] > 1 && x.stride[d] % v != 0) return false;
  }
  return true;
}

// V for the fast path (16 bytes of elements per access) where every access would be aligned, 1 otherwise.
inline int plan_vector(const PlanInput& in) {
  const int v = 16 / in.element_bytes;
  const int half = in.rotary_dim / 2;
  bool vec = in.head_dim % v == 0 && (in.interleaved || half % v == 0);
  for (const PlanTensor* x : {&in.q_in, &in.k_in, &in.q_out, &in.k_out}) {
    vec = vec && (x->heads == 0 || aligned_rows(*x, in, v, 16));
  }
  return vec ? v : 1;
}

// The launch for the input on the device.
inline LaunchPlan plan_launch(const PlanInput& in, const DevicePlan& dev) {
  LaunchPlan L;
  L.vector = plan_vector(in);
  const int V = L.vector;
  const bool unit = V > 1, inter = in.interleaved;
  // A half-split unit spans W pairs; an interleaved one W channels (W/2 pairs).
  const int W = unit ? V : (inter ? 2 : 1);
  const int pairs_per_unit = inter ? W / 2 : W;
  const int n = in.rotated_pairs;
  const int half = in.rotary_dim / 2;
  const int D = static_cast<int>(in.head_dim);

  L.tokens = in.batch * in.seqlen;
  if (in.inplace) {
    // Only the units holding rotated pairs. The last may hold pairs that do not rotate too: they are read and
    // written back unchanged, whole vectors being faster than the rotating part in narrower pieces (measured:
    // docs/benchmarks.md). They are channels of the same head row, so elements of the same tensor.
    const int rotated = inter ? 2 * n : n;  // channels (interleaved) or pairs (half-split)
    L.rot_units = L.units_per_head = (rotated + W - 1) / W;
  } else if (inter) {
    L.rot_units = L.units_per_head = D / W;
  } else {
    L.rot_units = half / W;
    L.units_per_head = L.rot_units + (D - 2 * half) / W;
  }
  const int h_total = static_cast<int>(in.q_in.heads + in.k_in.heads);
  const int per_head = L.units_per_head;  // units
  if (per_head == 0 || h_total == 0 || L.tokens == 0) return L;  // nothing to touch
  L.n_stride = (n + pairs_per_unit - 1) / pairs_per_unit * pairs_per_unit;

  // In place, where pairs do not rotate and cos/sin elements are few per unit, a thread keeps its next unit's
  // loads in flight during the current unit's work (out of place, and where every pair rotates, that is slower).
  const int64_t per_token = static_cast<int64_t>(h_total) * per_head;
  const bool pipelined = unit && in.inplace && (inter ? 2 * n < in.rotary_dim : n < half) &&
                         4 * L.n_stride < per_token;
  // Aim for >= 4 blocks per multiprocessor when the problem allows it, but >= 64 units per block (fewer leave
  // latency unhidden when decoding), and up to `units_per_thread` units per thread: the device's figure where
  // cos/sin are a large share of the work (>= 1 element per 4 units) in place (larger blocks share them);
  // otherwise small blocks, a token of Llama's or Gemma 4's heads or two of Gemma's: 2 units a thread in place
  // with pairs that do not rotate, 3 elsewhere.
  const int64_t total = L.tokens * per_token;
  const bool cos_sin_heavy = 4 * L.n_stride >= per_token;
  const int units_per_thread = cos_sin_heavy && in.inplace ? dev.units_per_thread : in.inplace && n < half ? 2 : 3;
  const int64_t target = std::min<int64_t>(units_per_thread * kThreads,
                                           std::max<int64_t>(64, total / (4 * dev.multiprocessors)));
  const size_t acc = static_cast<size_t>(in.arithmetic_bytes);
  // a token's bytes of shared memory: its head rows' two addresses, position, cos/sin row and row index
  const size_t token_bytes = 2 * sizeof(void*) * h_total + sizeof(int64_t) + sizeof(int) +
                             2 * acc * std::max(1, L.n_stride);
  const int max_tokens_smem = std::max(1, static_cast<int>(kSharedBudget / token_bytes));
  int splits = 1;
  if (per_token <= target) {
    L.tokens_per_block = static_cast<int>(
        std::min<int64_t>({target / per_token, kMaxTokensPerBlock, max_tokens_smem, L.tokens}));
    L.heads_per_block = h_total;
  } else {
    L.tokens_per_block = 1;
    splits = static_cast<int>(std::min<int64_t>(h_total, (per_token + target - 1) / target));
    L.heads_per_block = (h_total + splits - 1) / splits;
    splits = (h_total + L.heads_per_block - 1) / L.heads_per_block;
  }
  // Loading each thread's first unit early pays when blocks hold whole tokens and costs where they hold a
  // slice of one token's heads (decoding, where latency dominates).
  L.prefetch = splits == 1;
  L.pipeline = pipelined && L.prefetch;
  // Where the batch rows share positions and cos/sin is a large share of the work (>= 1 element per 4 units),
  // blocks take tokens in (seq, batch) order, so that the batch rows of one position share its cos/sin, and a
  // whole number of positions when they hold at least one. Where cos/sin are a small share, the four streams
  // of rows at once (instead of one) cost more than the cos/sin saved.
  L.seq_major = unit && !L.pipeline && in.shared_positions && in.batch > 1 && L.tokens_per_block > 1 &&
                cos_sin_heavy;
  if (L.seq_major && L.tokens_per_block >= in.batch) {
    const int64_t rounded = (L.tokens_per_block + in.batch / 2) / in.batch * in.batch;
    L.tokens_per_block =
        static_cast<int>(std::min<int64_t>({rounded, kMaxTokensPerBlock, max_tokens_smem, L.tokens}));
  }
  L.cos_rows = L.seq_major ? static_cast<int>(std::min<int64_t>(L.tokens_per_block,
                                                                (L.tokens_per_block + in.batch - 2) / in.batch + 1))
                           : L.tokens_per_block;
  const int64_t units_per_block = static_cast<int64_t>(L.tokens_per_block) * L.heads_per_block * per_head;
  L.threads = static_cast<int>(std::min<int64_t>(kThreads, (units_per_block + 31) / 32 * 32));
  L.token_blocks = (L.tokens + L.tokens_per_block - 1) / L.tokens_per_block;
  L.head_blocks = splits;
  // head rows' addresses [T * heads_per_block][2], positions [T rounded up to even] (int64), cos/sin rows
  // [cos_rows][n_stride] (Acc), row indices [T] (int)
  L.shared_bytes = static_cast<size_t>(L.tokens_per_block) * L.heads_per_block * 2 * sizeof(void*) +
                   (L.tokens_per_block + 1) / 2 * 2 * sizeof(int64_t) + 2 * acc * L.cos_rows * L.n_stride +
                   L.tokens_per_block * sizeof(int);
  L.kernel = L.pipeline ? KernelKind::kPipelined : L.seq_major ? KernelKind::kSeqMajor : KernelKind::kPlain;
  return L;
}

}  // namespace posenc
