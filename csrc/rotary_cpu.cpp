// The rotary op on the CPU: one task per token, so cos/sin are formed once and reused by every q and k head;
// inner loops run over contiguous channels of a head where they can, which the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>

#include "rotary_op.h"

namespace posenc {
namespace {

// Rotates one head row. kUnit: both rows have unit channel stride (the common, vectorisable case).
template <typename T, bool kUnit, typename Acc = at::opmath_type<T>>
void rotate_row(const RotaryParams& p, const T* in, int64_t si, T* out, int64_t so, const Acc* c,
                const Acc* s) {
  if (kUnit) si = so = 1;
  const int n = p.rotated_pairs;
  if (p.interleaved) {
    for (int i = 0; i < n; ++i) {
      const Acc x1 = static_cast<Acc>(in[2 * i * si]), x2 = static_cast<Acc>(in[(2 * i + 1) * si]);
      out[2 * i * so] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      out[(2 * i + 1) * so] = static_cast<T>(x2 * c[i] + x1 * s[i]);
    }
  } else {
    const int64_t h = p.rotary_dim / 2;
    for (int i = 0; i < n; ++i) {
      const Acc x1 = static_cast<Acc>(in[i * si]), x2 = static_cast<Acc>(in[(i + h) * si]);
      out[i * so] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      out[(i + h) * so] = static_cast<T>(x2 * c[i] + x1 * s[i]);
    }
  }
  if (p.inplace) return;  // channels that do not rotate are left alone in place, copied out of place
  auto copy = [&](int64_t from, int64_t to) {
    if (from >= to) return;
    if (kUnit) {
      std::memcpy(out + from, in + from, (to - from) * sizeof(T));
    } else {
      for (int64_t d = from; d < to; ++d) out[d * so] = in[d * si];
    }
  };
  if (p.interleaved) {
    copy(2 * n, p.head_dim);
  } else {
    const int64_t h = p.rotary_dim / 2;
    copy(n, h);
    copy(h + n, p.head_dim);
  }
}

template <typename T, typename Acc = at::opmath_type<T>>
void rotate_heads(const RotaryParams& p, const RotaryTensor& in, const RotaryTensor& out, int64_t b, int64_t t,
                  const Acc* c, const Acc* s) {
  const T* base_in = static_cast<const T*>(in.data) + b * in.stride[0] + t * in.stride[1];
  T* base_out = static_cast<T*>(out.data) + b * out.stride[0] + t * out.stride[1];
  const bool unit = in.stride[3] == 1 && out.stride[3] == 1;
  for (int64_t hd = 0; hd < in.heads; ++hd) {
    const T* row_in = base_in + hd * in.stride[2];
    T* row_out = base_out + hd * out.stride[2];
    if (unit) {
      rotate_row<T, true>(p, row_in, 1, row_out, 1, c, s);
    } else {
      rotate_row<T, false>(p, row_in, in.stride[3], row_out, out.stride[3], c, s);
    }
  }
}

template <typename T>
void rotary_cpu_kernel(const RotaryParams& p) {
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t work_per_token = (p.q_in.heads + p.k_in.heads) * p.head_dim;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_token));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    using Acc = at::opmath_type<T>;
    Acc c[kMaxHeadDim / 2], s[kMaxHeadDim / 2];
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t b = tok / p.seqlen, t = tok % p.seqlen;
      const int64_t pos = p.positions[b * p.pos_stride[0] + t * p.pos_stride[1]];
      if (p.inv_freq == nullptr) {
        TORCH_CHECK_INDEX(pos >= 0 && pos < p.table_rows, "posenc::rotary: position ", pos,
                          " is outside the cos/sin table of ", p.table_rows, " rows");
      }
      for (int i = 0; i < p.rotated_pairs; ++i) pair_cos_sin(p, pos, i, c[i], s[i]);
      rotate_heads<T>(p, p.q_in, p.q_out, b, t, c, s);
      rotate_heads<T>(p, p.k_in, p.k_out, b, t, c, s);
    }
  });
}

void launch_cpu(const RotaryParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "posenc_rotary_cpu",
                                  [&] { rotary_cpu_kernel<scalar_t>(p); });
}

POSENC_DEFINE_BACKEND(rotary_cpu, launch_cpu)

}  // namespace
}  // namespace posenc

TORCH_LIBRARY_IMPL(posenc, CPU, m) {
  m.impl("rotary", &posenc::rotary_cpu);
  m.impl("rotary_", &posenc::rotary_cpu_);
}
