// The op's schema and the argument checks shared by every backend.
#include <Python.h>
#include <torch/library.h>

#include "rotary_op.h"

// posenc._C is imported only for its side effect: loading this library runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// The schemas of posenc::rotary and posenc::rotary_ are defined once, in posenc/ops.py (which imports this
// library after defining them); the backends here only register implementations.

namespace posenc {
namespace {

RotaryTensor view_of(const at::Tensor& t) {
  RotaryTensor v;
  v.data = t.data_ptr();
  v.heads = t.size(2);
  for (int d = 0; d < 4; ++d) v.stride[d] = t.stride(d);
  return v;
}

RotaryParams make_params(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
                         const at::Tensor& positions, double scale, int64_t rotary_dim,
                         int64_t rotated_pairs, bool interleaved, bool inverse) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, "posenc::rotary: q and k must be [batch, seq, heads, head_dim]");
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                    "posenc::rotary: q and k must agree on batch, seq and head_dim");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type(), "posenc::rotary: q and k must have one dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && q.element_size() <= 8,
                   "posenc::rotary: q must be float64, float32, float16 or bfloat16");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim <= kMaxHeadDim, "posenc::rotary: head_dim must be <= ", kMaxHeadDim);
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
                    "posenc::rotary: rotary_dim must be even and in (0, head_dim]");
  TORCH_CHECK_VALUE(rotated_pairs >= 0 && rotated_pairs <= rotary_dim / 2,
                    "posenc::rotary: rotated_pairs must be in [0, rotary_dim/2]");
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "posenc::rotary: positions must be int64");
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == q.size(0) && positions.size(1) == q.size(1),
                    "posenc::rotary: positions must be [batch, seq]");
  TORCH_CHECK_VALUE(positions.device() == q.device() && k.device() == q.device(),
                    "posenc::rotary: q, k and positions must be on one device");

  RotaryParams p{};
  p.q_in = view_of(q);
  p.k_in = view_of(k);
  p.q_out = p.q_in;
  p.k_out = p.k_in;
  p.batch = q.size(0);
  p.seqlen = q.size(1);
  p.head_dim = head_dim;
  p.positions = positions.data_ptr<int64_t>();
  p.pos_stride[0] = positions.stride(0);
  p.pos_stride[1] = positions.stride(1);
  p.scale = static_cast<float>(scale);
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.rotated_pairs = static_cast<int>(rotated_pairs);
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.inplace = true;
  if (inv_freq.has_value()) {
    TORCH_CHECK_VALUE(!cos.has_value() && !sin.has_value(), "posenc::rotary: give cos/sin tables or inv_freq, not both");
    const auto& f = *inv_freq;
    TORCH_CHECK_TYPE(f.scalar_type() == at::kDouble, "posenc::rotary: inv_freq must be float64");
    TORCH_CHECK_VALUE(f.dim() == 1 && f.is_contiguous() && f.size(0) >= rotated_pairs && f.device() == q.device(),
                      "posenc::rotary: inv_freq must be contiguous [>= rotated_pairs] on q's device");
    p.inv_freq = f.data_ptr<double>();
  } else {
    TORCH_CHECK_VALUE(cos.has_value() && sin.has_value(), "posenc::rotary: give cos and sin, or inv_freq");
    const auto& c = *cos;
    const auto& s = *sin;
    for (const auto* t : {&c, &s}) {
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "posenc::rotary: cos/sin tables must be float32");
      TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) >= rotated_pairs && t->stride(1) == 1 && t->device() == q.device(),
                        "posenc::rotary: cos/sin must be [rows, >= rotated_pairs] with unit column stride on q's device");
    }
    TORCH_CHECK_VALUE(c.sizes() == s.sizes() && c.strides() == s.strides(), "posenc::rotary: cos and sin must match");
    p.cos = c.data_ptr<float>();
    p.sin = s.data_ptr<float>();
    p.table_rows = c.size(0);
    p.table_stride = c.stride(0);
  }
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_functional(
    Launcher launch, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
    const at::Tensor& positions, double scale, int64_t rotary_dim, int64_t rotated_pairs,
    bool interleaved, bool inverse) {
  RotaryParams p = make_params(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs,
                               interleaved, inverse);
  at::Tensor q_out = at::empty_like(q);
  at::Tensor k_out = at::empty_like(k);
  p.q_out = view_of(q_out);
  p.k_out = view_of(k_out);
  p.inplace = false;
  if (q.numel() + k.numel() > 0) launch(p, q.scalar_type());
  return {q_out, k_out};
}

void rotary_inplace(Launcher launch, const at::Tensor& q, const at::Tensor& k,
                    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                    const std::optional<at::Tensor>& inv_freq, const at::Tensor& positions, double scale,
                    int64_t rotary_dim, int64_t rotated_pairs, bool interleaved, bool inverse) {
  RotaryParams p = make_params(q, k, cos, sin, inv_freq, positions, scale, rotary_dim, rotated_pairs,
                               interleaved, inverse);
  if (q.numel() + k.numel() > 0) launch(p, q.scalar_type());
}

}  // namespace posenc
