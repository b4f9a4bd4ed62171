// Key and value features of the memories on CPUs, forward and backward, one (batch, head) sequence at a time.
//
// Plain twins: memory_mosaics.ops.leaky_average_reference + scaled_normalize_reference (keys) and
// torch.lerp + scaled_normalize_reference (values). Python side, loading and fallback:
// memory_mosaics/ops/features_cpu.py.
//
//   keys    s_t = x_t + a s_{t-1},  a = exp(-decay_h);         k_t = scale_h s_t / max(|s_t|, eps)
//   values  u_t = lerp(p_{t+m}, p_t, mix_h) (p_{t+m} = 0 past the end);  v_t = scale_h u_t / max(|u_t|, eps)
//
// Why a kernel: each feature is a handful of elementwise operators (a chunked scan of small matrix
// products, a norm, a division, a product, and as many again backwards), each one a pass over a
// (B, H, T, d) tensor; here a (batch, head) sequence is read once, kept in float32, and written once.
// The inputs x and p are the projections as the linear layer wrote them: (B, T, C) with any row
// stride, head h in columns [h d, (h + 1) d). Features are written head-major, (H, B, T, d) storage,
// which the persistent read folds into (H, B T, d) without a copy. Float32 and bf16, computing in
// float32; the backward pass recomputes s (or u) from x (or p) rather than keeping a float32 copy.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// A vectorisation hint (-fopenmp-simd) that can sit in the lambdas inside AT_DISPATCH macros, where
// a #pragma line cannot.
#define SIMD _Pragma("omp simd")
#define DISPATCH_FLOAT_AND_BF16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Calls body(d) with d as a compile-time constant for the usual head sizes (the loops over d then unroll
// into whole registers: the four kernels took 8-38 % less time at d = 64) and as a plain integer otherwise.
template <typename Body>
void with_head_dim(int64_t d, const Body& body) {
  switch (d) {
    case 32: return body(std::integral_constant<int64_t, 32>());
    case 64: return body(std::integral_constant<int64_t, 64>());
    case 128: return body(std::integral_constant<int64_t, 128>());
    default: return body(d);
  }
}

constexpr float EPS = 1e-12f;  // as F.normalize: a zero vector stays zero
constexpr int64_t KEY_CHUNK = 64;  // steps whose states the keys' backward pass recomputes at a time

// Conversions written as plain bit operations so that loops over them vectorise (c10::BFloat16's own
// compiled to scalar code here: the bf16 forward took 4x as long as the float32 one).
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);  // (std::bit_cast is C++20; torch >= 2.3 may build with C++17)
  return f;
}

template <typename scalar_t>
inline scalar_t from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // to nearest, ties to even
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// (B, T, C) input, head h of batch b: row t starts at base + t * row_stride.
template <typename scalar_t>
struct HeadRows {
  const scalar_t* base;
  int64_t row_stride;
  const scalar_t* row(int64_t t) const { return base + t * row_stride; }
};

template <typename scalar_t>
HeadRows<scalar_t> head_rows(const at::Tensor& x, int64_t b, int64_t h, int64_t d) {
  return {x.data_ptr<scalar_t>() + b * x.stride(0) + h * d, x.stride(1)};
}

float squared_norm(const float* v, int64_t d) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) sum += v[j] * v[j];
  return sum;
}

template <typename scalar_t>
float dot(const float* v, const scalar_t* w, int64_t d) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) sum += v[j] * to_float(w[j]);
  return sum;
}

void check_projection(const at::Tensor& x, int64_t heads, const at::Tensor& per_head, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "projection must be (B, T, C) with unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(heads > 0 && x.size(2) % heads == 0, "C must be a multiple of the number of heads");
  TORCH_CHECK(per_head.scalar_type() == at::kFloat && per_head.is_contiguous() && per_head.numel() == heads,
              name, " must be a contiguous float32 (H,) tensor");
}

// Gradients of the features arrive as (B, H, T, d) with any strides but a unit one for d.
at::Tensor unit_inner_stride(const at::Tensor& grad) { return grad.stride(3) == 1 ? grad : grad.contiguous(); }

// What both backward passes start with: checks, the features' gradient with a unit inner stride, and
// the outputs — dL/d(projection) (B, T, C) and two float32 sums per (batch, head) sequence.
struct BackwardBuffers {
  at::Tensor grad, grad_input, parameter_dots, scale_dots;
};

BackwardBuffers start_backward(const at::Tensor& grad_features, const at::Tensor& x, int64_t heads,
                               const at::Tensor& parameter, const char* parameter_name, const at::Tensor& scale) {
  check_projection(x, heads, parameter, parameter_name);
  check_projection(x, heads, scale, "scale");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  BackwardBuffers buffers{unit_inner_stride(grad_features), at::empty({B, T, C}, x.options()),
                          at::empty({B, heads}, x.options().dtype(at::kFloat)),
                          at::empty({B, heads}, x.options().dtype(at::kFloat))};
  TORCH_CHECK(buffers.grad.sizes() == at::IntArrayRef({B, heads, T, C / heads}) &&
                  buffers.grad.scalar_type() == x.scalar_type(),
              "the features' gradient must be (B, H, T, d) in the projection's dtype");
  return buffers;
}

at::Tensor head_major_features(const at::Tensor& x, int64_t heads) {
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2) / heads;
  return at::empty({heads, B, T, d}, x.options()).transpose(0, 1);  // (B, H, T, d) view
}

// ---- keys: leaky average, then scaled normalisation --------------------------------------------

at::Tensor key_forward(const at::Tensor& x, int64_t heads, const at::Tensor& decay, const at::Tensor& scale) {
  check_projection(x, heads, decay, "decay");
  check_projection(x, heads, scale, "scale");
  const int64_t B = x.size(0), T = x.size(1), head_dim = x.size(2) / heads;
  at::Tensor keys = head_major_features(x, heads);
  DISPATCH_FLOAT_AND_BF16(x.scalar_type(), "key_forward", [&] {
    with_head_dim(head_dim, [&](auto dim) {
      const int64_t d = dim;
      scalar_t* out = keys.data_ptr<scalar_t>();  // (H, B, T, d) storage
      at::parallel_for(0, heads * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> state(d);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t h = item / B, b = item % B;
          const float a = std::exp(-decay.data_ptr<float>()[h]), s_h = scale.data_ptr<float>()[h];
          const auto in = head_rows<scalar_t>(x, b, h, d);
          scalar_t* o = out + item * T * d;
          std::fill(state.begin(), state.end(), 0.f);
          for (int64_t t = 0; t < T; ++t, o += d) {
            const scalar_t* row = in.row(t);
            SIMD
            for (int64_t j = 0; j < d; ++j) state[j] = a * state[j] + to_float(row[j]);
            const float factor = s_h / std::max(std::sqrt(squared_norm(state.data(), d)), EPS);
            SIMD
            for (int64_t j = 0; j < d; ++j) o[j] = from_float<scalar_t>(factor * state[j]);
          }
        }
      });
    });
  });
  return keys;
}

// Returns dL/dx (B, T, C), and per (B, H): sum_t <dL/ds_t, s_{t-1}> (dL/ddecay = -a times its sum over
// B) and sum_t <k_t, dL/dk_t> / scale (dL/dscale, summed over B by the caller).
std::tuple<at::Tensor, at::Tensor, at::Tensor> key_backward(const at::Tensor& grad_keys, const at::Tensor& x,
                                                             int64_t heads, const at::Tensor& decay,
                                                             const at::Tensor& scale) {
  const BackwardBuffers buffers = start_backward(grad_keys, x, heads, decay, "decay", scale);
  const at::Tensor &grad = buffers.grad, &grad_x = buffers.grad_input;
  const at::Tensor &decay_dots = buffers.parameter_dots, &scale_dots = buffers.scale_dots;
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), head_dim = C / heads;
  DISPATCH_FLOAT_AND_BF16(x.scalar_type(), "key_backward", [&] {
    with_head_dim(head_dim, [&](auto dim) {
      const int64_t d = dim;
      at::parallel_for(0, heads * B, 1, [&](int64_t begin, int64_t end) {
        // The states are recomputed chunk by chunk, last chunk first, from the state entering each chunk
        // (kept by a first forward scan): the working set stays (KEY_CHUNK + 1) x d floats for any T.
        const int64_t chunks = (T + KEY_CHUNK - 1) / KEY_CHUNK;
        std::vector<float> entering(chunks * d), states((KEY_CHUNK + 1) * d), norms(KEY_CHUNK), running(d), carried(d);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t h = item / B, b = item % B;
          const float a = std::exp(-decay.data_ptr<float>()[h]), s_h = scale.data_ptr<float>()[h];
          const auto in = head_rows<scalar_t>(x, b, h, d);
          auto scan_step = [&](const float* previous, int64_t t, float* s) {
            const scalar_t* row = in.row(t);
            SIMD
            for (int64_t j = 0; j < d; ++j) s[j] = a * previous[j] + to_float(row[j]);
          };
          std::fill(running.begin(), running.end(), 0.f);
          for (int64_t t = 0; t < T; ++t) {
            if (t % KEY_CHUNK == 0) std::copy(running.begin(), running.end(), entering.begin() + t / KEY_CHUNK * d);
            scan_step(running.data(), t, running.data());
          }
          // Backwards in time: through the normalisation, then the scan's transpose
          // (carried = dL/ds_t = local_t + a dL/ds_{t+1}, which is also dL/dx_t).
          const scalar_t* g_base = grad.data_ptr<scalar_t>() + b * grad.stride(0) + h * grad.stride(1);
          scalar_t* dx_base = grad_x.data_ptr<scalar_t>() + b * T * C + h * d;
          std::fill(carried.begin(), carried.end(), 0.f);
          float decay_dot = 0.f, scale_dot = 0.f;
          for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
            const int64_t first = chunk * KEY_CHUNK, length = std::min(KEY_CHUNK, T - first);
            // states row i + 1 holds s_(first + i); row 0 the state entering the chunk (zero for the first)
            std::copy_n(entering.begin() + chunk * d, d, states.begin());
            for (int64_t i = 0; i < length; ++i) {
              scan_step(states.data() + i * d, first + i, states.data() + (i + 1) * d);
              norms[i] = std::sqrt(squared_norm(states.data() + (i + 1) * d, d));
            }
            for (int64_t i = length - 1; i >= 0; --i) {
              const int64_t t = first + i;
              const scalar_t* g = g_base + t * grad.stride(2);
              const float* s = states.data() + (i + 1) * d;
              const float factor = s_h / std::max(norms[i], EPS);
              const float sg = dot(s, g, d);
              scale_dot += factor * sg / s_h;  // <u, g>, u = k / scale
              // dL/ds (local) = factor (g - u <u, g>) = factor g - s (factor <s, g> / |s|^2);
              // no projection where clamped
              const float along = norms[i] > EPS ? factor * sg / (norms[i] * norms[i]) : 0.f;
              scalar_t* dx = dx_base + t * C;
              SIMD
              for (int64_t j = 0; j < d; ++j) {
                carried[j] = factor * to_float(g[j]) - along * s[j] + a * carried[j];
                dx[j] = from_float<scalar_t>(carried[j]);
              }
              decay_dot += dot(carried.data(), s - d, d);  // <dL/ds_t, s_(t-1)>; s_(-1) = 0
            }
          }
          decay_dots.data_ptr<float>()[b * heads + h] = decay_dot;
          scale_dots.data_ptr<float>()[b * heads + h] = scale_dot;
        }
      });
    });
  });
  return {grad_x, decay_dots, scale_dots};
}

// ---- values: look-ahead mix, then scaled normalisation -----------------------------------------

// u_t = next + mix (now - next) into u, and du_t/dmix = now - next into difference (d floats each).
template <typename scalar_t>
void mix_row(const HeadRows<scalar_t>& in, int64_t t, int64_t T, int64_t shift, float mix, float* u,
             float* difference, int64_t d) {
  const scalar_t* now = in.row(t);
  const scalar_t* next = t + shift < T ? in.row(t + shift) : nullptr;
  SIMD
  for (int64_t j = 0; j < d; ++j) {
    const float n = next ? to_float(next[j]) : 0.f;
    difference[j] = to_float(now[j]) - n;
    u[j] = n + mix * difference[j];
  }
}

at::Tensor value_forward(const at::Tensor& p, int64_t heads, int64_t shift, const at::Tensor& mix,
                         const at::Tensor& scale) {
  check_projection(p, heads, mix, "mix");
  check_projection(p, heads, scale, "scale");
  TORCH_CHECK(shift >= 1, "shift must be positive");
  const int64_t B = p.size(0), T = p.size(1), head_dim = p.size(2) / heads;
  at::Tensor values = head_major_features(p, heads);
  DISPATCH_FLOAT_AND_BF16(p.scalar_type(), "value_forward", [&] {
    with_head_dim(head_dim, [&](auto dim) {
      const int64_t d = dim;
      scalar_t* out = values.data_ptr<scalar_t>();
      at::parallel_for(0, heads * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> u(d), difference(d);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t h = item / B, b = item % B;
          const float w = mix.data_ptr<float>()[h], s_h = scale.data_ptr<float>()[h];
          const auto in = head_rows<scalar_t>(p, b, h, d);
          scalar_t* o = out + item * T * d;
          for (int64_t t = 0; t < T; ++t, o += d) {
            mix_row(in, t, T, shift, w, u.data(), difference.data(), d);
            const float factor = s_h / std::max(std::sqrt(squared_norm(u.data(), d)), EPS);
            SIMD
            for (int64_t j = 0; j < d; ++j) o[j] = from_float<scalar_t>(factor * u[j]);
          }
        }
      });
    });
  });
  return values;
}

// Returns dL/dp (B, T, C), and per (B, H): sum_t <dL/du_t, p_t - p_{t+m}> (dL/dmix) and
// sum_t <v_t, dL/dv_t> / scale (dL/dscale); the caller sums them over B.
std::tuple<at::Tensor, at::Tensor, at::Tensor> value_backward(const at::Tensor& grad_values, const at::Tensor& p,
                                                               int64_t heads, int64_t shift, const at::Tensor& mix,
                                                               const at::Tensor& scale) {
  const BackwardBuffers buffers = start_backward(grad_values, p, heads, mix, "mix", scale);
  const at::Tensor &grad = buffers.grad, &grad_p = buffers.grad_input;
  const at::Tensor &mix_dots = buffers.parameter_dots, &scale_dots = buffers.scale_dots;
  const int64_t B = p.size(0), T = p.size(1), C = p.size(2), head_dim = C / heads;
  DISPATCH_FLOAT_AND_BF16(p.scalar_type(), "value_backward", [&] {
    with_head_dim(head_dim, [&](auto dim) {
      const int64_t d = dim;
      at::parallel_for(0, heads * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> local(T * d), u(d), difference(d);  // local: dL/du_t for every t
        for (int64_t item = begin; item < end; ++item) {
          const int64_t h = item / B, b = item % B;
          const float w = mix.data_ptr<float>()[h], s_h = scale.data_ptr<float>()[h];
          const auto in = head_rows<scalar_t>(p, b, h, d);
          const scalar_t* g_base = grad.data_ptr<scalar_t>() + b * grad.stride(0) + h * grad.stride(1);
          scalar_t* dp = grad_p.data_ptr<scalar_t>() + b * T * C + h * d;
          float mix_dot = 0.f, scale_dot = 0.f;
          for (int64_t t = 0; t < T; ++t, dp += C) {
            mix_row(in, t, T, shift, w, u.data(), difference.data(), d);
            const scalar_t* g = g_base + t * grad.stride(2);
            const float norm = std::sqrt(squared_norm(u.data(), d));
            const float factor = s_h / std::max(norm, EPS);
            const float ug = dot(u.data(), g, d);
            scale_dot += factor * ug / s_h;
            const float along = norm > EPS ? factor * ug / (norm * norm) : 0.f;
            float* du = local.data() + t * d;
            SIMD
            for (int64_t j = 0; j < d; ++j) du[j] = factor * to_float(g[j]) - along * u[j];
            mix_dot += dot(du, difference.data(), d);
            // p_t enters u_t with weight mix and u_{t-m} with weight 1 - mix: both known by now.
            const float* before = t >= shift ? du - shift * d : nullptr;
            SIMD
            for (int64_t j = 0; j < d; ++j)
              dp[j] = from_float<scalar_t>(w * du[j] + (before ? (1.f - w) * before[j] : 0.f));
          }
          mix_dots.data_ptr<float>()[b * heads + h] = mix_dot;
          scale_dots.data_ptr<float>()[b * heads + h] = scale_dot;
        }
      });
    });
  });
  return {grad_p, mix_dots, scale_dots};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_forward", &key_forward, "keys: leaky average and scaled normalisation, forward");
  m.def("key_backward", &key_backward, "keys: leaky average and scaled normalisation, backward");
  m.def("value_forward", &value_forward, "values: look-ahead mix and scaled normalisation, forward");
  m.def("value_backward", &value_backward, "values: look-ahead mix and scaled normalisation, backward");
}
