// The rotary op on the CPU: one task per token, so cos/sin are formed once and reused by every q and k head;
// inner loops run over contiguous channels of a head where they can, which the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "rotary_op.h"

namespace posenc {
namespace {

// Conversions the vectoriser can see through (c10's float->bfloat16 branches on NaN, which blocks it).
template <typename T, typename Acc>
inline T store_as(Acc v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
  rounded = (v != v) ? 0x7FC0u : rounded;                       // NaN stays a (quiet) NaN
  return c10::BFloat16(static_cast<uint16_t>(rounded), c10::BFloat16::from_bits());
}
// cond ? a : b as bit arithmetic, so that loops using it stay free of branches (and vectorise).
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// float -> float16, round to nearest even, written branch-free (F. Giesen's float_to_half_fast3_rtne) so that
// it vectorises with plain integer/float SIMD: compilers do not vectorise _Float16 conversions without
// AVX512-FP16, and c10's conversion branches.
template <>
inline c10::Half store_as<c10::Half, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // subnormal or zero result: let a float add do the rounding
  const uint32_t denorm_magic_bits = ((127 - 15) + (23 - 10) + 1) << 23;
  float denorm_magic, a;
  std::memcpy(&denorm_magic, &denorm_magic_bits, sizeof(float));
  std::memcpy(&a, &u, sizeof(float));
  a += denorm_magic;
  uint32_t sub;
  std::memcpy(&sub, &a, sizeof(sub));
  sub -= denorm_magic_bits;
  // normal result: rebias the exponent, round the mantissa to nearest even
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  uint32_t h = select_bits(u < (113u << 23), sub, normal);
  h = select_bits(u >= ((127u + 16u) << 23), select_bits(u > (255u << 23), 0x7e00u, 0x7c00u), h);  // inf, NaN
  return c10::Half(static_cast<uint16_t>(h | (sign >> 16)), c10::Half::from_bits());
}
template <typename T, typename Acc>
inline Acc load_as(T v) {
  return static_cast<Acc>(v);
}
// float16 -> float, exact and branch-free (F. Giesen's half_to_float): shift into place, rebias, then fix
// inf/NaN (exponent all ones) and subnormals (renormalised by a float subtraction).
template <>
inline float load_as<c10::Half, float>(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (h & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const uint32_t magic_bits = 113u << 23;
  float magic, sub;
  std::memcpy(&magic, &magic_bits, sizeof(float));
  const uint32_t sub_bits = o + (1u << 23);
  std::memcpy(&sub, &sub_bits, sizeof(float));
  sub -= magic;
  uint32_t sub_u;
  std::memcpy(&sub_u, &sub, sizeof(sub_u));
  o = select_bits(exp == shifted_exp, inf_nan, select_bits(exp == 0, sub_u, o));
  o |= (h & 0x8000u) << 16;
  float f;
  std::memcpy(&f, &o, sizeof(f));
  return f;
}
template <>
inline float load_as<c10::BFloat16, float>(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// out[i] = x1*c - x2*s, out[h+i] = x2*c + x1*s over staged (local) copies of the inputs. Every pointer is
// restrict-qualified, which is what lets the compiler vectorise; staging makes that true in place too.
template <typename T, typename Acc>
void mix_halves(const Acc* __restrict__ x1, const Acc* __restrict__ x2, const Acc* __restrict__ c,
                const Acc* __restrict__ s, T* __restrict__ o1, T* __restrict__ o2, int n) {
  for (int i = 0; i < n; ++i) {
    o1[i] = store_as<T, Acc>(x1[i] * c[i] - x2[i] * s[i]);
    o2[i] = store_as<T, Acc>(x2[i] * c[i] + x1[i] * s[i]);
  }
}

template <typename T, typename Acc>
void stage(const T* __restrict__ in, Acc* __restrict__ buf, int n) {
  for (int i = 0; i < n; ++i) buf[i] = load_as<T, Acc>(in[i]);
}

// Rotates one head row. kUnit: both rows have unit channel stride (the common, vectorisable case).
// buf: scratch of kMaxHeadDim elements.
template <typename T, bool kUnit, typename Acc = at::opmath_type<T>>
void rotate_row(const RotaryParams& p, const T* in, int64_t si, T* out, int64_t so, const Acc* c,
                const Acc* s, Acc* buf) {
  const int n = p.rotated_pairs;
  const int64_t h = p.rotary_dim / 2;
  if (kUnit && !p.interleaved) {
    stage(in, buf, n);
    stage(in + h, buf + n, n);
    mix_halves(buf, buf + n, c, s, out, out + h, n);
  } else {
    if (kUnit) si = so = 1;
    const int64_t step = p.interleaved ? 2 : 1, second = p.interleaved ? 1 : h;
    for (int i = 0; i < n; ++i) {
      const Acc x1 = static_cast<Acc>(in[i * step * si]), x2 = static_cast<Acc>(in[(i * step + second) * si]);
      out[i * step * so] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      out[(i * step + second) * so] = static_cast<T>(x2 * c[i] + x1 * s[i]);
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
    copy(n, h);
    copy(h + n, p.head_dim);
  }
}

template <typename T, typename Acc = at::opmath_type<T>>
void rotate_heads(const RotaryParams& p, const RotaryTensor& in, const RotaryTensor& out, int64_t b, int64_t t,
                  const Acc* c, const Acc* s, Acc* buf) {
  const T* base_in = static_cast<const T*>(in.data) + b * in.stride[0] + t * in.stride[1];
  T* base_out = static_cast<T*>(out.data) + b * out.stride[0] + t * out.stride[1];
  const bool unit = in.stride[3] == 1 && out.stride[3] == 1;
  for (int64_t hd = 0; hd < in.heads; ++hd) {
    const T* row_in = base_in + hd * in.stride[2];
    T* row_out = base_out + hd * out.stride[2];
    if (unit) {
      rotate_row<T, true>(p, row_in, 1, row_out, 1, c, s, buf);
    } else {
      rotate_row<T, false>(p, row_in, in.stride[3], row_out, out.stride[3], c, s, buf);
    }
  }
}

template <typename T>
void rotate_tokens(const RotaryParams& p, int64_t begin, int64_t end) {
  using Acc = at::opmath_type<T>;
  Acc c[kMaxHeadDim / 2], s[kMaxHeadDim / 2], buf[kMaxHeadDim];
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / p.seqlen, t = tok % p.seqlen;
    const int64_t pos = p.positions[b * p.pos_stride[0] + t * p.pos_stride[1]];
    if (p.inv_freq == nullptr) {
      TORCH_CHECK_INDEX(pos >= 0 && pos < p.table_rows, "posenc::rotary: position ", pos,
                        " is outside the cos/sin table of ", p.table_rows, " rows");
    }
    for (int i = 0; i < p.rotated_pairs; ++i) pair_cos_sin(p, pos, i, c[i], s[i]);
    rotate_heads<T>(p, p.q_in, p.q_out, b, t, c, s, buf);
    rotate_heads<T>(p, p.k_in, p.k_out, b, t, c, s, buf);
  }
}

// Each dtype's token loop is built twice, for x86-64-v3 (AVX2, F16C) and for the baseline, and the loader
// picks one at run time (GCC function multiversioning): one binary, wide vectors where the CPU has them.
// flatten inlines the whole loop nest into each clone. Built with -ffp-contract=off, so no clone fuses
// x1*c - x2*s into an FMA: every clone rounds exactly as the reference does.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define POSENC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define POSENC_CPU_CLONES
#endif
POSENC_CPU_CLONES void tokens_f64(const RotaryParams& p, int64_t b, int64_t e) { rotate_tokens<double>(p, b, e); }
POSENC_CPU_CLONES void tokens_f32(const RotaryParams& p, int64_t b, int64_t e) { rotate_tokens<float>(p, b, e); }
POSENC_CPU_CLONES void tokens_f16(const RotaryParams& p, int64_t b, int64_t e) { rotate_tokens<c10::Half>(p, b, e); }
POSENC_CPU_CLONES void tokens_bf16(const RotaryParams& p, int64_t b, int64_t e) {
  rotate_tokens<c10::BFloat16>(p, b, e);
}

template <typename T>
void rotary_cpu_kernel(const RotaryParams& p) {
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t work_per_token = (p.q_in.heads + p.k_in.heads) * p.head_dim;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_token));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, double>) tokens_f64(p, begin, end);
    if constexpr (std::is_same_v<T, float>) tokens_f32(p, begin, end);
    if constexpr (std::is_same_v<T, c10::Half>) tokens_f16(p, begin, end);
    if constexpr (std::is_same_v<T, c10::BFloat16>) tokens_bf16(p, begin, end);
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
