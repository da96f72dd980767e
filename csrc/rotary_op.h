// Host-side glue shared by the CPU and CUDA registrations: checks the op's arguments and builds the
// RotaryParams a kernel runs on. User-facing messages live in posenc/ops.py; these checks guard memory.
#pragma once
#include <ATen/ATen.h>
#include "rotary.h"

namespace posenc {

using Launcher = void (*)(const RotaryParams&, at::ScalarType);

std::tuple<at::Tensor, at::Tensor> rotary_functional(
    Launcher launch, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
    const at::Tensor& positions, double scale, int64_t rotary_dim, int64_t rotated_pairs,
    bool interleaved, bool inverse);

void rotary_inplace(
    Launcher launch, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
    const at::Tensor& positions, double scale, int64_t rotary_dim, int64_t rotated_pairs,
    bool interleaved, bool inverse);

}  // namespace posenc

// Defines the two registered entry points of one backend around its launcher.
#define POSENC_DEFINE_BACKEND(NAME, LAUNCH)                                                           \
  static std::tuple<at::Tensor, at::Tensor> NAME(                                                     \
      const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,                 \
      const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,                \
      const at::Tensor& positions, double scale, int64_t rotary_dim, int64_t rotated_pairs,           \
      bool interleaved, bool inverse) {                                                               \
    return posenc::rotary_functional(LAUNCH, q, k, cos, sin, inv_freq, positions, scale, rotary_dim,  \
                                     rotated_pairs, interleaved, inverse);                            \
  }                                                                                                   \
  static void NAME##_(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos, \
                      const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq, \
                      const at::Tensor& positions, double scale, int64_t rotary_dim,                  \
                      int64_t rotated_pairs, bool interleaved, bool inverse) {                        \
    posenc::rotary_inplace(LAUNCH, q, k, cos, sin, inv_freq, positions, scale, rotary_dim,            \
                           rotated_pairs, interleaved, inverse);                                      \
  }
