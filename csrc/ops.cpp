// The op's schema and the argument checks shared by every backend.
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "message.h"
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
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   message("posenc::rotary: q and k must be float32, float16, bfloat16 or float64, got ", dtype,
                           "; convert them first, e.g. q.to(torch.bfloat16)"));
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim <= kMaxHeadDim, message("posenc::rotary: head_dim must be <= ", kMaxHeadDim));
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
  p.scale64 = scale;
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
    const auto table_dtype = c.scalar_type();
    TORCH_CHECK_TYPE(table_dtype == at::kFloat || table_dtype == at::kBFloat16 || table_dtype == at::kHalf,
                     message("posenc::rotary: cos/sin tables must be float32, bfloat16 or float16, got ", table_dtype));
    for (const auto* t : {&c, &s}) {
      TORCH_CHECK_TYPE(t->scalar_type() == table_dtype, "posenc::rotary: cos and sin must have one dtype");
      TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) >= rotated_pairs && (t->size(1) == 1 || t->stride(1) == 1) &&
                            t->device() == q.device(),
                        "posenc::rotary: cos/sin must be [rows, >= rotated_pairs] with unit column stride on q's device");
    }
    TORCH_CHECK_VALUE(c.sizes() == s.sizes() && c.strides() == s.strides(), "posenc::rotary: cos and sin must match");
    p.cos = c.data_ptr();
    p.sin = s.data_ptr();
    p.table_type = table_dtype == at::kFloat      ? TableType::kFloat32
                   : table_dtype == at::kBFloat16 ? TableType::kBFloat16
                                                  : TableType::kFloat16;
    p.table_rows = c.size(0);
    p.table_stride = c.stride(0);
  }
  return p;
}

// Bytes [lo, hi) that a tensor's elements lie in (empty for no elements).
std::pair<uintptr_t, uintptr_t> extent(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

bool extents_meet(const at::Tensor& a, const at::Tensor& b) {
  const auto [alo, ahi] = extent(a);
  const auto [blo, bhi] = extent(b);
  return alo < ahi && blo < bhi && alo < bhi && blo < ahi;
}

// A sufficient test that distinct indices of a strided view reach distinct elements: the dimensions of size > 1,
// by increasing stride, each step past all that the smaller ones span. (Stride 0, as made by expand(), fails.)
bool distinct_elements(const int64_t* sizes, const int64_t* strides, int dims) {
  std::vector<std::pair<int64_t, int64_t>> by_stride;  // (stride, size)
  for (int d = 0; d < dims; ++d) {
    if (sizes[d] == 0) return true;
    if (sizes[d] > 1) by_stride.emplace_back(strides[d], sizes[d]);
  }
  std::sort(by_stride.begin(), by_stride.end());
  int64_t span = 1;  // elements from the first to one past the last reached by the smaller dimensions
  for (const auto& [stride, size] : by_stride) {
    if (stride < span) return false;
    span += (size - 1) * stride;
  }
  return true;
}

// Whether q and k (4-D, one dtype) are proven to share no element. Beyond disjoint byte ranges, this proves the
// layouts of practice: q and k as head slices of one buffer (a packed qkv projection, qkv[:, :, 0] and
// qkv[:, :, 1]), where k starts n steps of some dimension d after q with n >= q's size along d, and the view
// that spans both (q's start, sizes extended along d) reaches distinct elements.
bool disjoint(const at::Tensor& q, const at::Tensor& k) {
  if (!extents_meet(q, k)) return true;
  const at::Tensor* a = &q;
  const at::Tensor* b = &k;
  auto gap = static_cast<int64_t>(reinterpret_cast<uintptr_t>(b->data_ptr()) -
                                  reinterpret_cast<uintptr_t>(a->data_ptr()));
  if (gap < 0) {
    std::swap(a, b);
    gap = -gap;
  }
  if (gap % a->element_size() != 0) return false;
  gap /= a->element_size();
  int64_t sizes[4], strides[4];
  for (int d = 0; d < 4; ++d) {  // one stride per dimension; that of a size-1 dimension does not matter
    if (a->size(d) > 1 && b->size(d) > 1 && a->stride(d) != b->stride(d)) return false;
    sizes[d] = std::max(a->size(d), b->size(d));
    strides[d] = a->size(d) > 1 ? a->stride(d) : b->stride(d);
  }
  for (int d = 0; d < 4; ++d) {
    // the spanning view steps along d by the stride of whichever has extent along d (either, if neither has)
    const bool extent_d = a->size(d) > 1 || b->size(d) > 1;
    for (const int64_t stride : {strides[d], extent_d ? strides[d] : a->stride(d)}) {
      if (stride <= 0 || gap % stride != 0 || gap / stride < a->size(d)) continue;
      int64_t span_sizes[4], span_strides[4];
      std::copy(sizes, sizes + 4, span_sizes);
      std::copy(strides, strides + 4, span_strides);
      span_sizes[d] = gap / stride + b->size(d);
      span_strides[d] = stride;
      if (distinct_elements(span_sizes, span_strides, 4)) return true;
    }
  }
  return false;
}

// In place, every element of q and k is read once and written once: elements that share memory would be
// rotated several times (expand()ed heads or batch rows, k a view of q, q passed as k), and tables or positions
// that share memory with q or k would change under the op. Refused, as PyTorch's in-place ops refuse overlap,
// and also where no overlap can be ruled out (layouts that the tests above do not prove).
void check_no_overlap(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
                      const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& inv_freq,
                      const at::Tensor& positions) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}}) {
    TORCH_CHECK_VALUE(distinct_elements(t->sizes().data(), t->strides().data(), 4),
                      message("posenc::rotary_: ", name, " has (or may have) elements that share memory (strides ",
                              t->strides(), ", e.g. from expand()), which an in-place rotation would rotate more ",
                              "than once; pass ", name, ".contiguous() (or clone()) or rotate out of place"));
  }
  TORCH_CHECK_VALUE(disjoint(q, k), "posenc::rotary_: q and k share (or may share) memory (the same tensor, or "
                    "overlapping views), which an in-place rotation would rotate twice; pass separate tensors "
                    "(clone() one) or rotate out of place");
  for (const auto* other : {&cos, &sin, &inv_freq}) {
    if (!other->has_value()) continue;
    TORCH_CHECK_VALUE(!extents_meet(**other, q) && !extents_meet(**other, k),
                      "posenc::rotary_: the cos/sin tables or inv_freq share memory with q or k, which an in-place "
                      "rotation writes; clone() them");
  }
  TORCH_CHECK_VALUE(!extents_meet(positions, q) && !extents_meet(positions, k),
                    "posenc::rotary_: positions share memory with q or k, which an in-place rotation writes; "
                    "clone() them");
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
  check_no_overlap(q, k, cos, sin, inv_freq, positions);
  if (q.numel() + k.numel() > 0) launch(p, q.scalar_type());
}

}  // namespace posenc
