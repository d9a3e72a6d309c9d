// One GRU time step's elementwise work, forward and backward, in one pass each.
//
// gru_nlp/gru.py runs the time loop; per step it does one matmul and calls one of these,
// instead of about fifteen small PyTorch ops (each a dispatch and a pass over memory).
// Compiled on first use by torch.utils.cpp_extension (gru_nlp/gru.py: compiled_steps);
// where that fails, gru.py runs the same math as PyTorch ops.
//
// Shape legend: D directions, B batch, H hidden size. Every tensor is float32 with a
// contiguous last dimension; the first two dimensions may have any strides. Outputs
// must not overlap inputs (the loops read through __restrict pointers).
// Gates are stacked [r, z, n] as in nn.GRU:
//     r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n)
//     h' = (1 - z) * n + z * h
// where gi = W_ih x + b_ih and gh = W_hh h + b_hh.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// exp(x) by Cephes' expf polynomial (about 2 ulp), written without library calls so the
// compiler vectorises the loops that use it. Inputs are clamped to [-87, 87], where
// neither exp(x) nor 1 / (1 + exp(x)) overflows; NaN stays NaN.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer ...
  const float shifted = x * 1.44269504088896341f + round_magic;
  const float k = shifted - round_magic;  // round(x / ln 2), in [-126, 126]
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;  // x - k ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;  // ... which sits in the low bits of `shifted`: 2^k is (k + 127) << 23
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000u + 127u) << 23;  // unsigned, so a NaN's bits wrap instead of overflowing
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// A (D, B, ...) tensor's row (d, b).
struct Rows {
  float* data;
  int64_t stride_d, stride_b;

  explicit Rows(const torch::Tensor& t) : data(t.data_ptr<float>()), stride_d(t.stride(0)), stride_b(t.stride(1)) {}
  float* row(int64_t d, int64_t b) const { return data + d * stride_d + b * stride_b; }
};

void check(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == dims && t.stride(-1) == 1, name, " must have ", dims, " dimensions, the last contiguous");
}

template <bool Save>
void forward_rows(const Rows& gi, const Rows& gh, const Rows& h, const Rows& h_next, const Rows& saved, int64_t slot,
                  int64_t batch, int64_t hidden, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t d = row / batch, b = row % batch;
    const float* __restrict gi_row = gi.row(d, b);
    const float* __restrict gh_row = gh.row(d, b);
    const float* __restrict h_row = h.row(d, b);
    float* __restrict out = h_next.row(d, b);
    float* __restrict s = Save ? saved.row(d, b) : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const float r = sigmoid(gi_row[j] + gh_row[j]);
      const float z = sigmoid(gi_row[hidden + j] + gh_row[hidden + j]);
      const float gh_n = gh_row[2 * hidden + j];
      const float n = 2.0f * sigmoid(2.0f * (gi_row[2 * hidden + j] + r * gh_n)) - 1.0f;  // tanh
      const float h_j = h_row[j];
      out[j] = n + z * (h_j - n);
      if constexpr (Save) {
        // The factors backward multiplies by dL/dh' (gru.py: _FusedGRULayer.forward).
        const float d_n = (1.0f - n * n) * (1.0f - z);
        const float d_gh_n = d_n * r;
        s[j] = d_gh_n;
        s[slot + j] = d_gh_n * gh_n * (1.0f - r);  // d_n gh_n r(1 - r)
        s[2 * slot + j] = (h_j - n) * z * (1.0f - z);
        s[3 * slot + j] = d_n;
        s[4 * slot + j] = z;
      }
    }
  }
}

}  // namespace

// h_next = GRU(h); if `saved` (D, B, 5, H) is defined, also the step's backward factors:
// slots [dh'/d gh_n, dh'/d pre-r, dh'/d pre-z, dh'/d pre-n, z].
// gi, gh: (D, B, 3H); h, h_next: (D, B, H).
void forward_step(const torch::Tensor& gi, const torch::Tensor& gh, const torch::Tensor& h, const torch::Tensor& h_next,
                  const c10::optional<torch::Tensor>& saved) {
  check(gi, "gi", 3), check(gh, "gh", 3), check(h, "h", 3), check(h_next, "h_next", 3);
  const int64_t directions = h.size(0), batch = h.size(1), hidden = h.size(2);
  TORCH_CHECK(gi.size(0) == directions && gi.size(1) == batch && gi.size(2) == 3 * hidden, "gi must be (D, B, 3H)");
  TORCH_CHECK(gh.sizes() == gi.sizes() && h_next.sizes() == h.sizes(), "gh must be (D, B, 3H), h_next (D, B, H)");
  const bool save = saved.has_value() && saved->defined();
  if (save) {
    check(*saved, "saved", 4);
    TORCH_CHECK(saved->size(0) == directions && saved->size(1) == batch && saved->size(2) == 5 && saved->size(3) == hidden,
                "saved must be (D, B, 5, H)");
  }
  const Rows gi_rows(gi), gh_rows(gh), h_rows(h), next_rows(h_next);
  const Rows saved_rows = save ? Rows(*saved) : next_rows;
  const int64_t slot = save ? saved->stride(2) : 0;
  at::parallel_for(0, directions * batch, 16, [&](int64_t begin, int64_t end) {
    if (save) {
      forward_rows<true>(gi_rows, gh_rows, h_rows, next_rows, saved_rows, slot, batch, hidden, begin, end);
    } else {
      forward_rows<false>(gi_rows, gh_rows, h_rows, next_rows, saved_rows, slot, batch, hidden, begin, end);
    }
  });
}

// Backward through one step, before its matmul: turns slots 0-3 of `saved` (D, B, 5, H)
// into pre-activation gradients by multiplying them by grad_h (D, B, H), in place, and,
// if grad_out_prev (D, B, H) is defined, sets grad_h_prev = grad_out_prev + z * grad_h
// (the caller then adds the matmul term d gh @ W_hh).
void backward_step(const torch::Tensor& saved, const torch::Tensor& grad_h, const c10::optional<torch::Tensor>& grad_out_prev,
                   const torch::Tensor& grad_h_prev) {
  check(saved, "saved", 4), check(grad_h, "grad_h", 3), check(grad_h_prev, "grad_h_prev", 3);
  const int64_t directions = grad_h.size(0), batch = grad_h.size(1), hidden = grad_h.size(2);
  TORCH_CHECK(saved.size(0) == directions && saved.size(1) == batch && saved.size(2) == 5 && saved.size(3) == hidden,
              "saved must be (D, B, 5, H)");
  TORCH_CHECK(grad_h_prev.sizes() == grad_h.sizes(), "grad_h_prev must be (D, B, H)");
  const bool carry = grad_out_prev.has_value() && grad_out_prev->defined();
  if (carry) {
    check(*grad_out_prev, "grad_out_prev", 3);
    TORCH_CHECK(grad_out_prev->sizes() == grad_h.sizes(), "grad_out_prev must be (D, B, H)");
  }
  const Rows saved_rows(saved), grad_rows(grad_h), prev_rows(grad_h_prev);
  const Rows out_rows = carry ? Rows(*grad_out_prev) : grad_rows;
  const int64_t slot = saved.stride(2);
  at::parallel_for(0, directions * batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t d = row / batch, b = row % batch;
      float* __restrict s = saved_rows.row(d, b);
      const float* __restrict g = grad_rows.row(d, b);
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) {
        s[j] *= g[j];
        s[slot + j] *= g[j];
        s[2 * slot + j] *= g[j];
        s[3 * slot + j] *= g[j];
      }
      if (carry) {
        const float* __restrict out = out_rows.row(d, b);
        float* __restrict prev = prev_rows.row(d, b);
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) prev[j] = out[j] + s[4 * slot + j] * g[j];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_step", &forward_step, "one GRU step: h_next and, optionally, the backward factors");
  m.def("backward_step", &backward_step, "one GRU step backward, before its matmul");
}
