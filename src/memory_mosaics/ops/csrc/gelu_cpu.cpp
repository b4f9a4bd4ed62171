// The tanh-approximate GELU of the GPT baseline's MLP on CPUs, float32 and bf16, forward and backward.
//
//   gelu(x) = x (1 + tanh(u)) / 2,  u = sqrt(2 / pi) (x + 0.044715 x^3)
//           = x s,                  s = sigmoid(2 u)          (as (1 + tanh(u)) / 2 = sigmoid(2 u))
//   gelu'(x) = s + x s (1 - s) 2 du/dx,  du/dx = sqrt(2 / pi) (1 + 3 0.044715 x^2)
//
// Plain twin: torch.nn.functional.gelu(x, approximate="tanh"). Python side, loading and fallback:
// memory_mosaics/ops/gelu_cpu.py.
//
// Why a kernel: PyTorch's CPU kernel for this form evaluates tanh with a 1-ulp polynomial and, in bf16,
// takes 3-4x the time of its exact (erf) GELU, which the plain nanoGPT of the benchmark uses; the
// sigmoid form needs one exponential (PyTorch's exp_u20, as its softmax and attention use) and one
// division per element, computed in float32 whatever the storage type. With bf16 storage, whose results
// keep 8 bits, both passes take a cheaper exponential and reciprocal and round with AVX512-BF16 where the
// CPU has it: forward + backward then take ~0.84x the time of PyTorch's exact GELU (benchmarks/gelu_speed.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>

#include <cmath>
#include <limits>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

constexpr float TWO_SQRT_2_OVER_PI = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float CUBIC = 0.044715f;
constexpr int64_t GRAIN = 1 << 15;  // elements per parallel task

// 32 numbers at a time, as two float vectors, from and to float32 or bf16 storage.
void load(const float* in, Vec& a, Vec& b) {
  a = Vec::loadu(in);
  b = Vec::loadu(in + Vec::size());
}
// bf16 -> float is exact (a bf16 number is the top half of a float's bits).
Vec widen(__m256i bf16x16) {
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16), 16)));
}
void load(const BFloat16* in, Vec& a, Vec& b) {
  a = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in)));
  b = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + Vec::size())));
}
// float -> bf16 rounded to nearest even, NaN kept a (quiet) NaN: what c10::BFloat16's constructor does,
// 16 at a time with AVX-512F alone...
__m256i narrow_in_software(const Vec& v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
// ...or in one AVX512-BF16 instruction, where the kernel is built for a CPU that has it (gelu_cpu.py): the
// same rounding, except that results below bf16's normal range (|y| < 1.2e-38) become zero.
#ifdef __AVX512BF16__
constexpr bool NATIVE_ROUNDING = true;
__m256i narrow_natively(const Vec& v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }
#else
constexpr bool NATIVE_ROUNDING = false;
__m256i narrow_natively(const Vec& v) { return narrow_in_software(v); }
#endif

template <bool software_rounding>  // float32 results are stored as they are: nothing to round
void store(const Vec& a, const Vec& b, float* out) {
  a.store(out);
  b.store(out + Vec::size());
}
template <bool software_rounding>
void store(const Vec& a, const Vec& b, BFloat16* out) {
  const auto narrow = [](const Vec& v) { return software_rounding ? narrow_in_software(v) : narrow_natively(v); };
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow(a));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + Vec::size()), narrow(b));
}

Vec two_u(const Vec& x, const Vec& square) { return Vec(TWO_SQRT_2_OVER_PI) * x * (Vec(1.f) + Vec(CUBIC) * square); }

// s = sigmoid(2 u); also returns x^2 for the derivative.
Vec gate(const Vec& x, Vec& square) {
  square = x * x;
  return Vec(1.f) / (Vec(1.f) + (-two_u(x, square)).exp_u20());
}
// The gate of a pass that stores bf16, which keeps 8 bits of its results: PyTorch's degree-3 exponential
// (fexp_u20, as the bf16 context read uses) and a 14-bit reciprocal. 1.9 % of the forward's outputs land
// one bf16 step from the correctly rounded value (the float32 gate: 1.2 %, PyTorch's bf16 tanh GELU:
// 6.6 %, over 2^20 N(0, 9) inputs) and the forward takes ~0.8x the float32 gate's time. Also returns
// e = exp(-2u), with which 1 - s = e s needs no subtraction (1 - s from an approximate s would lose all
// its digits where s is close to 1).
Vec gate_for_bf16(const Vec& x, Vec& square, Vec& e) {
  square = x * x;
  e = (-two_u(x, square)).fexp_u20();
  return Vec(_mm512_rcp14_ps(Vec(1.f) + e));
}
// forward_gate and derivative take the storage's pointer type as a tag: it picks the gate.
Vec forward_gate(const Vec& x, const float*) {
  Vec square;
  return gate(x, square);
}
Vec forward_gate(const Vec& x, const BFloat16*) {
  Vec square, e;
  return gate_for_bf16(x, square, e);
}
float gate(float x) { return 1.f / (1.f + std::exp(-TWO_SQRT_2_OVER_PI * x * (1.f + CUBIC * x * x))); }

Vec derivative(const Vec& x, const float*) {
  Vec square;
  const Vec s = gate(x, square);
  const Vec du = Vec(TWO_SQRT_2_OVER_PI) * (Vec(1.f) + Vec(3.f * CUBIC) * square);  // 2 du/dx
  return s + x * s * (Vec(1.f) - s) * du;
}
// For bf16 gradients the cheaper gate, with 1 - s = e s. Where the exponential overflows (x below about
// -10) e is taken as the largest float, so that e s is 0 (s is 0 there) rather than inf times 0.
Vec derivative(const Vec& x, const BFloat16*) {
  Vec square, e;
  const Vec s = gate_for_bf16(x, square, e);
  const Vec du = Vec(TWO_SQRT_2_OVER_PI) * (Vec(1.f) + Vec(3.f * CUBIC) * square);
  const Vec one_minus_s = s * Vec(_mm512_min_ps(e, Vec(std::numeric_limits<float>::max())));
  return s + x * s * one_minus_s * du;
}
float derivative(float x) {
  const float s = gate(x);
  return s + x * s * (1.f - s) * TWO_SQRT_2_OVER_PI * (1.f + 3.f * CUBIC * x * x);
}

template <bool software_rounding, typename scalar_t>
void forward_range(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 2 * Vec::size() <= end; i += 2 * Vec::size()) {
    Vec a, b;
    load(x + i, a, b);
    const Vec ya = a * forward_gate(a, x), yb = b * forward_gate(b, x);
    store<software_rounding>(ya, yb, y + i);
  }
  for (; i < end; ++i) y[i] = scalar_t(float(x[i]) * gate(float(x[i])));
}

template <bool software_rounding, typename scalar_t>
void backward_range(const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 2 * Vec::size() <= end; i += 2 * Vec::size()) {
    Vec a, b, ga, gb;
    load(x + i, a, b);
    load(grad + i, ga, gb);
    store<software_rounding>(ga * derivative(a, x), gb * derivative(b, x), out + i);
  }
  for (; i < end; ++i) out[i] = scalar_t(float(grad[i]) * derivative(float(x[i])));
}

void check(const torch::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "contiguous float32 or bf16 input only");
}

}  // namespace

// software_rounding: round bf16 results with AVX-512F alone even where AVX512-BF16 does it (for tests).
torch::Tensor forward(torch::Tensor x, bool software_rounding) {
  check(x);
  auto y = torch::empty_like(x);
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      forward_range<true>(x.data_ptr<float>(), y.data_ptr<float>(), begin, end);
    } else if (software_rounding || !NATIVE_ROUNDING) {
      forward_range<true>(x.data_ptr<BFloat16>(), y.data_ptr<BFloat16>(), begin, end);
    } else {
      forward_range<false>(x.data_ptr<BFloat16>(), y.data_ptr<BFloat16>(), begin, end);
    }
  });
  return y;
}

torch::Tensor backward(torch::Tensor x, torch::Tensor grad, bool software_rounding) {
  check(x);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(),
              "the gradient must be contiguous, of the input's shape and dtype");
  auto out = torch::empty_like(x);
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      backward_range<true>(x.data_ptr<float>(), grad.data_ptr<float>(), out.data_ptr<float>(), begin, end);
    } else if (software_rounding || !NATIVE_ROUNDING) {
      backward_range<true>(x.data_ptr<BFloat16>(), grad.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), begin, end);
    } else {
      backward_range<false>(x.data_ptr<BFloat16>(), grad.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), begin, end);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "tanh-approximate GELU, forward", py::arg("x"), py::arg("software_rounding") = false);
  m.def("backward", &backward, "tanh-approximate GELU, backward", py::arg("x"), py::arg("grad"),
        py::arg("software_rounding") = false);
  m.def("native_rounding", [] { return NATIVE_ROUNDING; }, "whether bf16 results are rounded by AVX512-BF16");
}
