// The rotary op on the CPU: one task per token, so cos/sin are formed once and reused by every q and k head;
// inner loops run over contiguous channels of a head where they can, which the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "message.h"
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

#if defined(__GNUC__) && defined(__x86_64__)
#define POSENC_F16C 1
// float16 rows through the F16C instructions, 8 channels at a time: GCC does not turn load_as/store_as into
// them by itself. vcvtph2ps is exact and vcvtps2ph rounds to nearest even, as load_as/store_as do, and the
// products are rounded separately (no FMA), as in mix_halves: the results are the same bits. Only called
// from code built for x86-64-v3, on CPUs that have it (tokens_f16 checks).
__attribute__((target("avx2,f16c"))) void stage_f16c(const c10::Half* __restrict__ in, float* __restrict__ buf,
                                                      int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  stage(in + i, buf + i, n - i);
}

__attribute__((target("avx2,f16c"))) void mix_halves_f16c(const float* __restrict__ x1, const float* __restrict__ x2,
                                                           const float* __restrict__ c, const float* __restrict__ s,
                                                           c10::Half* __restrict__ o1, c10::Half* __restrict__ o2,
                                                           int n) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    const __m256 r1 = _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv));
    const __m256 r2 = _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o1 + i), _mm256_cvtps_ph(r1, kRound));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o2 + i), _mm256_cvtps_ph(r2, kRound));
  }
  mix_halves(x1 + i, x2 + i, c + i, s + i, o1 + i, o2 + i, n - i);
}
#endif

// Rotates one head row. kUnit: both rows have unit channel stride (the common, vectorisable case).
// buf: scratch of kMaxHeadDim elements. kF16C: float16 rows go through stage_f16c/mix_halves_f16c.
template <typename T, bool kUnit, bool kF16C, typename Acc = at::opmath_type<T>>
void rotate_row(const RotaryParams& p, const T* in, int64_t si, T* out, int64_t so, const Acc* c,
                const Acc* s, Acc* buf) {
  const int n = p.rotated_pairs;
  const int64_t h = p.rotary_dim / 2;
  if (kUnit && !p.interleaved) {
#ifdef POSENC_F16C
    if constexpr (kF16C && std::is_same_v<T, c10::Half>) {
      stage_f16c(in, buf, n);
      stage_f16c(in + h, buf + n, n);
      mix_halves_f16c(buf, buf + n, c, s, out, out + h, n);
    } else
#endif
    {
      stage(in, buf, n);
      stage(in + h, buf + n, n);
      mix_halves(buf, buf + n, c, s, out, out + h, n);
    }
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

template <typename T, bool kF16C, typename Acc = at::opmath_type<T>>
void rotate_heads(const RotaryParams& p, const RotaryTensor& in, const RotaryTensor& out, int64_t b, int64_t t,
                  const Acc* c, const Acc* s, Acc* buf) {
  const T* base_in = static_cast<const T*>(in.data) + b * in.stride[0] + t * in.stride[1];
  T* base_out = static_cast<T*>(out.data) + b * out.stride[0] + t * out.stride[1];
  const bool unit = in.stride[3] == 1 && out.stride[3] == 1;
  for (int64_t hd = 0; hd < in.heads; ++hd) {
    const T* row_in = base_in + hd * in.stride[2];
    T* row_out = base_out + hd * out.stride[2];
    if (unit) {
      rotate_row<T, true, kF16C>(p, row_in, 1, row_out, 1, c, s, buf);
    } else {
      rotate_row<T, false, kF16C>(p, row_in, in.stride[3], row_out, out.stride[3], c, s, buf);
    }
  }
}

template <typename T, bool kF16C = false>
void rotate_tokens(const RotaryParams& p, int64_t begin, int64_t end) {
  using Acc = at::opmath_type<T>;
  Acc c[kMaxHeadDim / 2], s[kMaxHeadDim / 2], buf[kMaxHeadDim];
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / p.seqlen, t = tok % p.seqlen;
    const int64_t pos = p.positions[b * p.pos_stride[0] + t * p.pos_stride[1]];  // checked by check_positions
    for (int i = 0; i < p.rotated_pairs; ++i) pair_cos_sin(p, pos, i, c[i], s[i]);
    rotate_heads<T, kF16C>(p, p.q_in, p.q_out, b, t, c, s, buf);
    rotate_heads<T, kF16C>(p, p.k_in, p.k_out, b, t, c, s, buf);
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
POSENC_CPU_CLONES void tokens_f16_generic(const RotaryParams& p, int64_t b, int64_t e) {
  rotate_tokens<c10::Half>(p, b, e);
}
#ifdef POSENC_F16C
__attribute__((target("arch=x86-64-v3"), flatten)) void tokens_f16_f16c(const RotaryParams& p, int64_t b, int64_t e) {
  rotate_tokens<c10::Half, true>(p, b, e);
}
#endif
void tokens_f16(const RotaryParams& p, int64_t b, int64_t e) {
#ifdef POSENC_F16C
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (f16c) return tokens_f16_f16c(p, b, e);
#endif
  tokens_f16_generic(p, b, e);
}
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

// Positions are checked here, before the token loops: those are multiversioned (target_clones), and an exception
// thrown inside them cannot unwind (it aborted the process). Table mode: every position must index a row.
// Frequency mode: |position * inv_freq| must stay within kMaxAngle, where the angles are accurate (rotary.h).
void check_positions(const RotaryParams& p) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t b = 0; b < (p.pos_stride[0] == 0 ? 1 : p.batch); ++b) {
    for (int64_t t = 0; t < p.seqlen; ++t) {
      const int64_t pos = p.positions[b * p.pos_stride[0] + t * p.pos_stride[1]];
      lo = std::min(lo, pos);
      hi = std::max(hi, pos);
    }
  }
  if (lo > hi) return;  // no tokens
  if (p.inv_freq == nullptr) {
    TORCH_CHECK_INDEX(lo >= 0 && hi < p.table_rows,
                      message("posenc::rotary: positions must lie in [0, ", p.table_rows,
                              ") (the rows of the cos/sin tables), got values in [", lo, ", ", hi,
                              "]; pass tables with more rows or positions within them"));
    return;
  }
  double w_max = 0;
  for (int i = 0; i < p.rotated_pairs; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p.inv_freq[i]),
                      message("posenc::rotary: inv_freq must be finite, got ", p.inv_freq[i], " at ", i));
    w_max = std::max(w_max, std::abs(p.inv_freq[i]));
  }
  const double pos_max = std::max(std::abs(static_cast<double>(lo)), std::abs(static_cast<double>(hi)));
  TORCH_CHECK_VALUE(pos_max * w_max <= kMaxAngle,
                    message("posenc::rotary: positions up to |", pos_max, "| with inv_freq up to ", w_max,
                            " give angles beyond ", kMaxAngle, " (2^28), where they are no longer accurate; keep ",
                            "|positions| * max(inv_freq) <= 2^28 (|positions| <= 2^28 for inv_freq <= 1)"));
}

void launch_cpu(const RotaryParams& p, at::ScalarType dtype) {
  check_positions(p);
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

// posenc::rotary_ and autograd (and posenc::rotary's autograd, below), for every device (here rather than in ops.cpp, which the CUDA emulator compiles
// too). Autograd: the op cannot record its write for autograd by itself, so with grad enabled it refuses q or k
// that require grad (posenc.apply_rotary(..., inplace=True) records it). ADInplaceOrView: the write moves q's
// and k's version counters, so that a backward needing their old values raises instead of reading new ones.
namespace posenc {
namespace {

using InplaceSig = void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                        double, int64_t, int64_t, bool, bool);

const c10::TypedOperatorHandle<InplaceSig>& inplace_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("posenc::rotary_", "").typed<InplaceSig>();
  return op;
}

void rotary_autograd_(c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& k,
                      const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                      const std::optional<at::Tensor>& inv_freq, const at::Tensor& positions, double scale,
                      int64_t rotary_dim, int64_t rotated_pairs, bool interleaved, bool inverse) {
  TORCH_CHECK_VALUE(!(c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad())),
                    "posenc::rotary_: q or k requires grad, and the op cannot record an in-place write for autograd; "
                    "use posenc.apply_rotary(..., inplace=True), which does, or the out-of-place posenc::rotary");
  inplace_op().redispatch(ks & c10::after_autograd_keyset, q, k, cos, sin, inv_freq, positions, scale, rotary_dim,
                          rotated_pairs, interleaved, inverse);
}

void rotary_inplace_or_view_(c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& k,
                             const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                             const std::optional<at::Tensor>& inv_freq, const at::Tensor& positions, double scale,
                             int64_t rotary_dim, int64_t rotated_pairs, bool interleaved, bool inverse) {
  inplace_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, cos, sin, inv_freq, positions, scale,
                          rotary_dim, rotated_pairs, interleaved, inverse);
  torch::autograd::impl::bump_version(q);
  torch::autograd::impl::bump_version(k);
}

// posenc::rotary's autograd, in C++ (a Python autograd kernel costs tens of microseconds a call in host time):
// the map is linear in q and k and orthogonal up to `scale`, so its transpose is the opposite rotation. The
// tables, positions and scalars are constants; the backward goes through the dispatcher (double backward too).
using RotarySig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&, const at::Tensor&, double,
                                                     int64_t, int64_t, bool, bool);

const c10::TypedOperatorHandle<RotarySig>& rotary_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("posenc::rotary", "").typed<RotarySig>();
  return op;
}

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
      const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
      const std::optional<at::Tensor>& inv_freq, const at::Tensor& positions, double scale, int64_t rotary_dim,
      int64_t rotated_pairs, bool interleaved, bool inverse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [q_out, k_out] = rotary_op().call(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs,
                                           interleaved, inverse);
    if (q.requires_grad() || k.requires_grad()) {
      ctx->saved_data["cos"] = cos;
      ctx->saved_data["sin"] = sin;
      ctx->saved_data["inv_freq"] = inv_freq;
      ctx->saved_data["positions"] = positions;
      ctx->saved_data["scale"] = scale;
      ctx->saved_data["rotary_dim"] = rotary_dim;
      ctx->saved_data["rotated_pairs"] = rotated_pairs;
      ctx->saved_data["interleaved"] = interleaved;
      ctx->saved_data["inverse"] = inverse;
    }
    return {q_out, k_out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto& d = ctx->saved_data;
    auto [grad_q, grad_k] = rotary_op().call(
        grads[0], grads[1], d["cos"].toOptional<at::Tensor>(), d["sin"].toOptional<at::Tensor>(),
        d["inv_freq"].toOptional<at::Tensor>(), d["positions"].toTensor(), d["scale"].toDouble(),
        d["rotary_dim"].toInt(), d["rotated_pairs"].toInt(), d["interleaved"].toBool(), !d["inverse"].toBool());
    torch::autograd::variable_list out(11);
    out[0] = grad_q;
    out[1] = grad_k;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> rotary_autograd(const at::Tensor& q, const at::Tensor& k,
                                                   const std::optional<at::Tensor>& cos,
                                                   const std::optional<at::Tensor>& sin,
                                                   const std::optional<at::Tensor>& inv_freq,
                                                   const at::Tensor& positions, double scale, int64_t rotary_dim,
                                                   int64_t rotated_pairs, bool interleaved, bool inverse) {
  const bool records = (c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad())) ||
                       q._fw_grad(/*level=*/0).defined() || k._fw_grad(/*level=*/0).defined();
  if (!records) {  // nothing for autograd (inference, and the backward's own call): a Function's bookkeeping
                   // costs microseconds of host time per call
    at::AutoDispatchBelowADInplaceOrView guard;
    return rotary_op().call(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs, interleaved,
                            inverse);
  }
  auto out = RotaryFunction::apply(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs,
                                   interleaved, inverse);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace posenc

TORCH_LIBRARY_IMPL(posenc, Autograd, m) {
  m.impl("rotary_", TORCH_FN(posenc::rotary_autograd_));
  m.impl("rotary", TORCH_FN(posenc::rotary_autograd));
}
TORCH_LIBRARY_IMPL(posenc, ADInplaceOrView, m) { m.impl("rotary_", TORCH_FN(posenc::rotary_inplace_or_view_)); }
