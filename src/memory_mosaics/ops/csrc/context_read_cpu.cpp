// Context-memory read on CPUs with AMX, bf16, forward and backward: each position t >= m (m = shift) reads
// the pairs (k_s, v_s) of its own sequence with s <= t - m,
//
//   out_t = sum_{s <= t - m} softmax_s(<k_t, k_s>) v_s,        out_t = 0 for t < m,
//
// one (batch, head) sequence at a time. Plain twin: memory_mosaics.ops.retrieval.context_retrieval_reference.
// Python side, loading and fallback: memory_mosaics/ops/context_read_cpu.py.
//
// Why a kernel: PyTorch's fused attention on CPUs spends 5-8x its forward time in its backward pass
// (the largest item of a training step at T = 256, most of it from T = 1,024; docs/performance.md).
// This is the persistent read's kernel (persistent_read_cpu.cpp) made causal: query rows in blocks,
// scores in float32 over the admissible columns only (whole 64-column slices; inside the last one the
// entries past the diagonal get weight zero), products in oneDNN's bf16 micro-kernel.
//
// Layouts. Queries and stored keys are the same tensor: query i (i = 0 .. L - 1, L = T - m) is k_{i + m},
// stored key j is k_j, and query i reads j <= i. keys and values are (B, H, T, d) bf16 with any batch and
// head strides (the features kernels write them head-major) and rows of d contiguous numbers; the read is
// written straight into the (B, T, H d) layout the output projection takes, rows t < m zero; the
// gradients of keys and values come back with the strides of keys and values, the queries' and the
// stored keys' parts of the keys' gradient already summed.
#include "amx_bf16.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace {

using namespace amx_bf16;

// Stored keys are packed, and each query block's admissible columns rounded up, in multiples of this.
constexpr int64_t COLUMNS = 64;
// The backward pass handles a block's columns this many at a time (the persistent read's SLICE: its float32
// scores and score gradients then stay small beside the dK, dV sums they are multiplied into).
constexpr int64_t SLICE = 256;
// d must be a multiple of this: rows are handled 32 numbers at a time.
constexpr int64_t D_MULTIPLE = 32;

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// One (batch, head) sequence of a (B, H, T, d) tensor.
template <typename T>
T* sequence(const torch::Tensor& x, int64_t b, int64_t h) {
  return x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1);
}

void check_features(const torch::Tensor& keys, const torch::Tensor& values, int64_t shift, int64_t block_rows) {
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes(), "keys and values must both be (B, H, T, d)");
  TORCH_CHECK(keys.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16, "bf16 only");
  const int64_t T = keys.size(2), d = keys.size(3);
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == d && values.stride(3) == 1 && values.stride(2) == d,
              "keys and values need contiguous (T, d) sequences");
  TORCH_CHECK(d % D_MULTIPLE == 0, "d must be a multiple of ", D_MULTIPLE);
  TORCH_CHECK(shift > 0 && shift < T, "need 0 < shift < T");
  TORCH_CHECK(block_rows > 0 && block_rows % 2 == 0, "block_rows must be even and positive");
}

// Query i of a block reads columns j <= i: the number of admissible columns of row r of a block at row i0.
int64_t admissible(int64_t i0, int64_t r) { return i0 + r + 1; }

}  // namespace

// Returns the read (B, T, H d) bf16, rows t < shift zero, and the rows' log-sum-exp (B, H, T - shift) float32.
std::vector<torch::Tensor> forward(torch::Tensor keys, torch::Tensor values, int64_t shift, int64_t block_rows) {
  check_features(keys, values, shift, block_rows);
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), d = keys.size(3);
  const int64_t C = H * d, L = T - shift, padded = round_up(L, COLUMNS);
  auto out = torch::empty({B, T, C}, keys.options());
  auto lse = torch::empty({B, H, L}, keys.options().dtype(torch::kFloat));
  BFloat16* op = out.data_ptr<BFloat16>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> scores(0, R * padded), read(1, R * d);
    Scratch<BFloat16> weights(0, R * padded), keys_t_packed(1, d * padded), values_packed(2, padded * d);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / H, h = s % H;
      const BFloat16 *kh = sequence<BFloat16>(keys, b, h), *queries = kh + shift * d;
      BFloat16* oh = op + b * T * C + h * d;  // row t of this head's read at oh + t C
      float* lh = lse.data_ptr<float>() + (b * H + h) * L;
      for (int64_t t = 0; t < shift; ++t) std::memset(oh + t * C, 0, d * sizeof(BFloat16));
      pack_rows_transposed(kh, L, padded, d, keys_t_packed.data());
      pack_rows(sequence<BFloat16>(values, b, h), L, padded, d, values_packed.data());
      for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = std::min(R, L - i0), width = round_up(i0 + rows, COLUMNS);
        multiply(rows, width, d, d, padded, width, false, queries + i0 * d, keys_t_packed.data(), scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* row = scores.data() + r * width;
          BFloat16* w = weights.data() + r * width;
          const int64_t valid = admissible(i0, r), vectors = round_up(valid, 2 * Vec::size());
          std::fill(row + valid, row + vectors, -std::numeric_limits<float>::infinity());
          Vec vmax(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < vectors; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
          const float row_max = horizontal_max(vmax);
          for (int64_t j = 0; j < vectors; j += Vec::size()) {
            (Vec::loadu(row + j) - Vec(row_max)).fexp_u20().store(row + j);
          }
          std::fill(row + valid, row + vectors, 0.f);  // whatever the exponential made of -inf
          Vec vsum(0.f);
          for (int64_t j = 0; j < vectors; j += Vec::size()) vsum = vsum + Vec::loadu(row + j);
          const float total = horizontal_sum(vsum);
          const Vec inverse(1.f / total);
          for (int64_t j = 0; j < vectors; j += 2 * Vec::size()) {  // normalise and round in one pass
            to_bf16(Vec::loadu(row + j) * inverse, Vec::loadu(row + j + Vec::size()) * inverse, w + j);
          }
          std::fill(w + vectors, w + width, BFloat16(0.f));
          lh[i0 + r] = row_max + std::log(total);
        }
        multiply(rows, d, width, width, d, d, false, weights.data(), values_packed.data(), read.data());
        for (int64_t r = 0; r < rows; ++r) at::vec::convert(read.data() + r * d, oh + (shift + i0 + r) * C, d);
      }
    }
    cpublas::brgemm_release();
  });
  return {out, lse};
}

// Returns the gradients of keys and values, with their strides.
std::vector<torch::Tensor> backward(torch::Tensor keys, torch::Tensor values, torch::Tensor out, torch::Tensor lse,
                                    torch::Tensor grad_out, int64_t shift, int64_t block_rows) {
  check_features(keys, values, shift, block_rows);
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), d = keys.size(3);
  const int64_t C = H * d, L = T - shift, padded = round_up(L, COLUMNS);
  TORCH_CHECK(out.sizes() == grad_out.sizes() && out.size(0) == B && out.size(1) == T && out.size(2) == C &&
                  out.is_contiguous() && grad_out.is_contiguous() && grad_out.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "out and grad_out must be contiguous bf16 (B, T, H d)");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == B * H * L, "lse must be (B, H, T - shift)");
  auto grad_keys = torch::empty_like(keys);
  auto grad_values = torch::empty_like(values);
  const BFloat16 *op = out.data_ptr<BFloat16>(), *gp = grad_out.data_ptr<BFloat16>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> scores(0, R * SLICE), grad_weights(1, R * SLICE), row_dot(2, R);
    Scratch<float> keys_sum(3, d * padded), values_sum(4, d * padded);  // dK^T and dV^T of the stored pairs
    Scratch<float> grad_queries(5, L * d), rows_buffer(6, padded * d);
    Scratch<BFloat16> grad_scores_bf(0, R * SLICE), weights_packed(1, R * SLICE), grad_scores_packed(2, R * SLICE);
    Scratch<BFloat16> grad_t(3, d * R), q_t(4, d * R), keys_t_packed(5, d * padded), values_t_packed(6, d * padded);
    Scratch<BFloat16> keys_packed(7, padded * d);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / H, h = s % H;
      const BFloat16 *kh = sequence<BFloat16>(keys, b, h), *vh = sequence<BFloat16>(values, b, h);
      const BFloat16 *queries = kh + shift * d, *oh = op + b * T * C + h * d, *gh = gp + b * T * C + h * d;
      const float* lh = lse.data_ptr<float>() + (b * H + h) * L;
      pack_rows_transposed(kh, L, padded, d, keys_t_packed.data());
      pack_rows_transposed(vh, L, padded, d, values_t_packed.data());
      pack_rows(kh, L, padded, d, keys_packed.data());
      std::fill(keys_sum.data(), keys_sum.data() + d * padded, 0.f);
      std::fill(values_sum.data(), values_sum.data() + d * padded, 0.f);
      for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = std::min(R, L - i0), width = round_up(i0 + rows, COLUMNS);
        const int64_t even_rows = rows + (rows & 1);  // the inner size of the dK, dV products must be even
        const BFloat16 *g_block = gh + (shift + i0) * C, *q_block = queries + i0 * d;
        for (int64_t r = 0; r < rows; ++r) {
          // rowsum(W * dW) = <dO, O> for this row; dO and q transposed for the dV and dK products
          float dot = 0.f;
          const BFloat16 *g_row = g_block + r * C, *o_row = oh + (shift + i0 + r) * C, *q_row = q_block + r * d;
          for (int64_t e = 0; e < d; ++e) {
            dot += float(g_row[e]) * float(o_row[e]);
            grad_t[e * R + r] = g_row[e];
            q_t[e * R + r] = q_row[e];
          }
          row_dot[r] = dot;
        }
        if (even_rows != rows) {  // a zero row pairs with the last one
          for (int64_t e = 0; e < d; ++e) grad_t[e * R + rows] = q_t[e * R + rows] = BFloat16(0.f);
        }
        for (int64_t c0 = 0; c0 < width; c0 += SLICE) {
          const int64_t slice = std::min(SLICE, width - c0);
          multiply(rows, slice, d, d, padded, slice, false, q_block, keys_t_packed.data() + 2 * c0,
                   scores.data());  // S
          multiply(rows, slice, d, C, padded, slice, false, g_block, values_t_packed.data() + 2 * c0,
                   grad_weights.data());  // dW = dO V^T
          // W = exp(S - lse) on admissible entries, zero past the diagonal, and dS = W (dW - <dO, O>), two rows
          // at a time: written packed for the dV and dK products, and dS also row-major for the dQ product.
          for (int64_t r = 0; r < even_rows; r += 2) {
            for (int64_t j = 0; j < slice; j += 2 * Vec::size()) {
              __m512i w[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, ds[2] = {w[0], w[1]};
              for (int64_t i = 0; i < 2 && r + i < rows; ++i) {
                const int64_t valid = admissible(i0, r + i) - (c0 + j);  // admissible columns in these 32
                if (valid > 0) {
                  const float *sc = scores.data() + (r + i) * slice + j;
                  const float* dw = grad_weights.data() + (r + i) * slice + j;
                  const Vec row_lse(lh[i0 + r + i]), dot(row_dot[r + i]);
                  Vec p0 = (Vec::loadu(sc) - row_lse).fexp_u20();
                  Vec p1 = (Vec::loadu(sc + Vec::size()) - row_lse).fexp_u20();
                  if (valid < 2 * Vec::size()) {  // the diagonal: keep the first `valid` entries
                    const Vec zero(0.f);
                    p1 = Vec::set(zero, p1, std::max<int64_t>(valid - Vec::size(), 0));
                    p0 = Vec::set(zero, p0, std::min<int64_t>(valid, Vec::size()));
                  }
                  w[i] = bf16_pair(p0, p1);
                  ds[i] = bf16_pair(p0 * (Vec::loadu(dw) - dot), p1 * (Vec::loadu(dw + Vec::size()) - dot));
                }
                _mm512_storeu_si512(reinterpret_cast<__m512i*>(grad_scores_bf.data() + (r + i) * slice + j), ds[i]);
              }
              store_row_pair(w[0], w[1], j, slice, r / 2, weights_packed.data());
              store_row_pair(ds[0], ds[1], j, slice, r / 2, grad_scores_packed.data());
            }
          }
          multiply(d, slice, even_rows, R, slice, padded, true, grad_t.data(), weights_packed.data(),
                   values_sum.data() + c0);  // dV^T
          multiply(d, slice, even_rows, R, slice, padded, true, q_t.data(), grad_scores_packed.data(),
                   keys_sum.data() + c0);  // dK^T
          multiply(rows, d, slice, slice, d, d, c0 > 0, grad_scores_bf.data(), keys_packed.data() + c0 * d,
                   grad_queries.data() + i0 * d);  // dQ
        }
      }
      // dV: rows j < L from dV^T, zero after; dk_t = dK_t (t < L) + dQ_{t - shift} (t >= shift).
      BFloat16 *dk = sequence<BFloat16>(grad_keys, b, h), *dv = sequence<BFloat16>(grad_values, b, h);
      for (int64_t j0 = 0; j0 < padded; j0 += 16) {
        for (int64_t e0 = 0; e0 < d; e0 += 16) transpose16(values_sum.data() + e0 * padded + j0, padded,
                                                           rows_buffer.data() + j0 * d + e0, d);
      }
      at::vec::convert(rows_buffer.data(), dv, L * d);
      std::fill(dv + L * d, dv + T * d, BFloat16(0.f));
      for (int64_t j0 = 0; j0 < padded; j0 += 16) {
        for (int64_t e0 = 0; e0 < d; e0 += 16) transpose16(keys_sum.data() + e0 * padded + j0, padded,
                                                           rows_buffer.data() + j0 * d + e0, d);
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* stored = t < L ? rows_buffer.data() + t * d : nullptr;
        const float* queried = t >= shift ? grad_queries.data() + (t - shift) * d : nullptr;
        for (int64_t e = 0; e < d; e += 2 * Vec::size()) {
          Vec low(0.f), high(0.f);
          if (stored) low = low + Vec::loadu(stored + e), high = high + Vec::loadu(stored + e + Vec::size());
          if (queried) low = low + Vec::loadu(queried + e), high = high + Vec::loadu(queried + e + Vec::size());
          to_bf16(low, high, dk + t * d + e);
        }
      }
    }
    cpublas::brgemm_release();
  });
  return {grad_keys, grad_values};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "context read, forward");
  m.def("backward", &backward, "context read, backward");
  m.def("supported", &amx_bf16::supported, "whether this CPU runs the packed bf16 micro-kernels");
}
