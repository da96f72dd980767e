// The contract shared by every rotary kernel (CPU and CUDA): what a kernel is given, already checked.
//
// q and k are viewed as [batch, seq, heads, head_dim] with arbitrary strides (in elements). A kernel
// rotates, for every token (b, s) at position m = positions[b, s], the first `rotated_pairs` pairs of the
// first `rotary_dim` channels of every q and k head:
//   (x1, x2) -> (x1*c - x2*s, x2*c + x1*s), with c = scale*cos(m*w_i), s = scale*sin(m*w_i)
// (s negated when `inverse`: the backward map, since a rotation's transpose is the opposite rotation). Pair i is (x[i], x[i + rotary_dim/2]) half-split, or
// (x[2i], x[2i+1]) interleaved. Out of place, every other channel is copied; in place it keeps its value (a
// kernel may read and write back unchanged those in a 16-byte block with rotating ones, never others).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define POSENC_HD __host__ __device__ __forceinline__
#else
#define POSENC_HD inline
#endif

namespace posenc {

constexpr int kMaxHeadDim = 512;
// The largest |position * inv_freq| the op forms accurately, 2^28 (posenc.ops.MAX_ANGLE). The float64 product
// and reduction err by up to ~2.6e-16 * |angle|: 7e-8 at 2^28, below the float32 rounding of the reduced angle
// (1.2e-7), but 4.6e-7 (measured) at 2^32 and 0.13 at 2^50; past 2^53 an angle has no fractional bits left.
constexpr double kMaxAngle = 268435456.0;

// The storage type of the cos/sin tables: the model's dtype as transformers hands them over (float32 otherwise).
enum class TableType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RotaryTensor {
  void* data;
  int64_t heads;
  int64_t stride[4];  // batch, seq, head, channel
};

struct RotaryParams {
  RotaryTensor q_in, k_in, q_out, k_out;  // *_out aliases *_in when in place
  int64_t batch, seqlen, head_dim;
  const int64_t* positions;  // [batch, seq] with strides pos_stride (batch stride may be 0)
  int64_t pos_stride[2];
  // Angle source, exactly one of:
  //  - tables: cos/sin [table_rows, >= rotated_pairs] stored as table_type (float32, bfloat16 or float16: read
  //    exactly, converted to the arithmetic type), row stride table_stride, unit column stride, indexed by
  //    position
  //  - inv_freq: float64 [>= rotated_pairs]; angle = position * inv_freq formed and reduced mod 2*pi in
  //    float64 before a float32 sin/cos. Accurate for |angle| <= kMaxAngle (below): the CPU launcher refuses
  //    larger angles; the CUDA one computes them all the same way (checking would need a host sync).
  const void* cos;
  const void* sin;
  TableType table_type;
  int64_t table_rows, table_stride;
  const double* inv_freq;
  float scale;     // multiplies cos and sin (YaRN / LongRoPE attention scaling); 1 otherwise
  double scale64;  // the same, unrounded, for float64 data (gradcheck)
  int rotary_dim, rotated_pairs;
  bool interleaved, inverse, inplace;
};

// The attention scale on cos and sin, and the sign of sin for the inverse map.
template <typename Acc>
POSENC_HD void scale_cos_sin(const RotaryParams& p, Acc& c, Acc& s) {
  if constexpr (sizeof(Acc) == sizeof(double)) {
    c *= p.scale64;
    s *= p.inverse ? -p.scale64 : p.scale64;
  } else {
    c *= p.scale;
    s *= p.inverse ? -p.scale : p.scale;
  }
}

// cos/sin of the angle pos * w, w being a pair's frequency (inv_freq mode), scaled as above: the angle is
// formed and reduced mod 2*pi in float64, then an Acc sin/cos. Acc is the arithmetic type: float for
// float32/16/bf16 storage, double for float64 storage (used by gradcheck).
template <typename Acc>
POSENC_HD void angle_cos_sin(const RotaryParams& p, int64_t pos, double w, Acc& c, Acc& s) {
  const double two_pi = 6.283185307179586476925286766559;
  double a = static_cast<double>(pos) * w;
#ifdef __CUDA_ARCH__
  // The same roundings as on the CPU and in the reference (nvcc would fuse this into an FMA otherwise).
  a = __dsub_rn(a, __dmul_rn(two_pi, rint(__dmul_rn(a, 1.0 / two_pi))));
#else
  a -= two_pi * rint(a * (1.0 / two_pi));  // |a| <= pi: float32 sin/cos are then accurate
#endif
#ifdef __CUDACC__
  sincos(static_cast<Acc>(a), &s, &c);
#else
  c = std::cos(static_cast<Acc>(a));
  s = std::sin(static_cast<Acc>(a));
#endif
  scale_cos_sin(p, c, s);
}

POSENC_HD float float_of_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// Element idx of a table, exactly (bfloat16 and float16 are subsets of float32).
POSENC_HD float table_value(const void* table, TableType type, int64_t idx) {
  if (type == TableType::kFloat32) return static_cast<const float*>(table)[idx];
  const uint32_t h = static_cast<const uint16_t*>(table)[idx];
  if (type == TableType::kBFloat16) return float_of_bits(h << 16);
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return float_of_bits(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
  if (exponent != 0) return float_of_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float subnormal = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // mantissa * 2^-24, exact
  return sign ? -subnormal : subnormal;
}

// cos/sin of pair i at position pos, from inv_freq or from the tables; scale and sign as above.
template <typename Acc>
POSENC_HD void pair_cos_sin(const RotaryParams& p, int64_t pos, int i, Acc& c, Acc& s) {
  if (p.inv_freq != nullptr) {
    angle_cos_sin(p, pos, p.inv_freq[i], c, s);
    return;
  }
  c = table_value(p.cos, p.table_type, pos * p.table_stride + i);
  s = table_value(p.sin, p.table_type, pos * p.table_stride + i);
  scale_cos_sin(p, c, s);
}

}  // namespace posenc
