// Context-memory read on CPUs with AMX, bf16 or float32, forward and backward: each position t >= m (m = shift) reads
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
// entries past the diagonal get weight zero), products in oneDNN's micro-kernels (bf16 or float32; see
// Precision below).
//
// Layouts. Queries and stored keys are the same tensor: query i (i = 0 .. L - 1, L = T - m) is k_{i + m},
// stored key j is k_j, and query i reads j <= i. keys and values are (B, H, T, d) with any batch and
// head strides (the features kernels write them head-major) and rows of d contiguous numbers; the read is
// written straight into the (B, T, H d) layout the output projection takes, rows t < m zero; the
// gradients of keys and values come back with the strides of keys and values, the queries' and the
// stored keys' parts of the keys' gradient already summed.
#include "amx_bf16.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace {

using namespace amx_bf16;

// Stored keys are packed, and each query block's admissible columns rounded up, in multiples of this.
constexpr int64_t COLUMNS = 64;
// The forward pass takes a block's columns this many at a time, with a running maximum and sum per row (flash
// attention's online softmax), so that its float32 scores stay in the L2 cache however long the sequence.
constexpr int64_t FORWARD_SLICE = 512;
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
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kBFloat16 || keys.scalar_type() == at::kFloat),
              "keys and values must both be bf16 or both float32");
  const int64_t T = keys.size(2), d = keys.size(3);
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == d && values.stride(3) == 1 && values.stride(2) == d,
              "keys and values need contiguous (T, d) sequences");
  TORCH_CHECK(d % D_MULTIPLE == 0, "d must be a multiple of ", D_MULTIPLE);
  TORCH_CHECK(shift > 0 && shift < T, "need 0 < shift < T");
  TORCH_CHECK(block_rows > 0 && block_rows % 2 == 0, "block_rows must be even and positive");
}

// Query i of a block reads columns j <= i: the number of admissible columns of row r of a block at row i0.
int64_t admissible(int64_t i0, int64_t r) { return i0 + r + 1; }

template <typename scalar_t>
void forward_sequences(const torch::Tensor& keys, const torch::Tensor& values, int64_t shift, int64_t block_rows,
                       torch::Tensor& out, torch::Tensor& lse) {
  using P = Precision<scalar_t>;
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), d = keys.size(3);
  const int64_t C = H * d, L = T - shift, padded = round_up(L, COLUMNS);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> scores(0, R * FORWARD_SLICE), read(1, R * d), row_max(2, R), row_sum(3, R);
    Scratch<scalar_t> weights(OPERANDS, R * FORWARD_SLICE), keys_t(OPERANDS + 1, d * padded);
    Scratch<scalar_t> values_rows(OPERANDS + 2, padded * d);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / H, h = s % H;
      const scalar_t *kh = sequence<scalar_t>(keys, b, h), *queries = kh + shift * d;
      scalar_t* oh = op + b * T * C + h * d;  // row t of this head's read at oh + t C
      float* lh = lse.data_ptr<float>() + (b * H + h) * L;
      for (int64_t t = 0; t < shift; ++t) std::fill(oh + t * C, oh + t * C + d, scalar_t(0.f));
      P::transposed(kh, L, padded, d, keys_t.data());
      P::rows(sequence<scalar_t>(values, b, h), L, padded, d, values_rows.data());
      for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = std::min(R, L - i0), width = round_up(i0 + rows, COLUMNS);
        std::fill(row_max.data(), row_max.data() + rows, -std::numeric_limits<float>::infinity());
        std::fill(row_sum.data(), row_sum.data() + rows, 0.f);
        for (int64_t c0 = 0; c0 < width; c0 += FORWARD_SLICE) {
          const int64_t slice = std::min(FORWARD_SLICE, width - c0);
          multiply(rows, slice, d, d, padded, slice, false, queries + i0 * d, keys_t.data() + column<scalar_t>(c0),
                   scores.data());
          for (int64_t r = 0; r < rows; ++r) {
            float* row = scores.data() + r * slice;
            scalar_t* w = weights.data() + r * slice;
            const int64_t valid = std::min(admissible(i0, r) - c0, slice);
            if (valid <= 0) {  // past this row's diagonal: no weight, and its sums stay as they are
              std::fill(w, w + slice, scalar_t(0.f));
              continue;
            }
            const int64_t vectors = round_up(valid, 2 * Vec::size());
            std::fill(row + valid, row + vectors, -std::numeric_limits<float>::infinity());
            Vec vmax(-std::numeric_limits<float>::infinity());
            for (int64_t j = 0; j < vectors; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
            const float new_max = std::max(row_max[r], horizontal_max(vmax));
            for (int64_t j = 0; j < vectors; j += Vec::size()) {
              P::exp(Vec::loadu(row + j) - Vec(new_max)).store(row + j);
            }
            std::fill(row + valid, row + vectors, 0.f);  // whatever the exponential made of -inf
            Vec vsum(0.f);
            for (int64_t j = 0; j < vectors; j += 2 * Vec::size()) {  // sum, and store (rounded) for the product
              const Vec low = Vec::loadu(row + j), high = Vec::loadu(row + j + Vec::size());
              vsum = vsum + low + high;
              P::store(low, high, w + j);
            }
            std::fill(w + vectors, w + slice, scalar_t(0.f));
            const float factor = std::exp(row_max[r] - new_max);  // 0 for the first slice (max -inf)
            row_sum[r] = row_sum[r] * factor + horizontal_sum(vsum);
            row_max[r] = new_max;
            if (c0 > 0 && factor != 1.f) {  // the read so far was weighted against the old maximum
              float* read_row = read.data() + r * d;
              for (int64_t e = 0; e < d; e += Vec::size()) {
                (Vec::loadu(read_row + e) * Vec(factor)).store(read_row + e);
              }
            }
          }
          multiply(rows, d, slice, slice, d, d, c0 > 0, weights.data(), values_rows.data() + c0 * d, read.data());
        }
        for (int64_t r = 0; r < rows; ++r) {  // normalise by the row's sum
          const Vec inverse(1.f / row_sum[r]);
          const float* read_row = read.data() + r * d;
          scalar_t* out_row = oh + (shift + i0 + r) * C;
          for (int64_t e = 0; e < d; e += 2 * Vec::size()) {
            P::store(Vec::loadu(read_row + e) * inverse, Vec::loadu(read_row + e + Vec::size()) * inverse, out_row + e);
          }
          lh[i0 + r] = row_max[r] + std::log(row_sum[r]);
        }
      }
    }
    cpublas::brgemm_release(P::vnni);
  });
}

template <typename scalar_t>
void backward_sequences(const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& out,
                        const torch::Tensor& lse, const torch::Tensor& grad_out, int64_t shift, int64_t block_rows,
                        torch::Tensor& grad_keys, torch::Tensor& grad_values) {
  using P = Precision<scalar_t>;
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), d = keys.size(3);
  const int64_t C = H * d, L = T - shift, padded = round_up(L, COLUMNS);
  const scalar_t *op = out.data_ptr<scalar_t>(), *gp = grad_out.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> scores(0, R * SLICE), grad_weights(1, R * SLICE), row_dot(2, R);
    Scratch<float> keys_sum(3, d * padded), values_sum(4, d * padded);  // dK^T and dV^T of the stored pairs
    Scratch<float> grad_queries(5, L * d), rows_buffer(6, padded * d);
    // dS row-major (the dQ product's left factor), and W and dS as the dV and dK products' right factors
    // (for float32 dS serves as both).
    Scratch<scalar_t> grad_scores_rows(OPERANDS, R * SLICE), weights_right(OPERANDS + 1, R * SLICE);
    Scratch<scalar_t> grad_scores_packed(OPERANDS + 2, R * SLICE);
    Scratch<scalar_t> grad_t(OPERANDS + 3, d * R), q_t(OPERANDS + 4, d * R);  // dO and q transposed, by block
    Scratch<scalar_t> keys_t(OPERANDS + 5, d * padded), values_t(OPERANDS + 6, d * padded);
    Scratch<scalar_t> keys_rows(OPERANDS + 7, padded * d);
    const scalar_t* grad_scores_right = P::vnni ? grad_scores_packed.data() : grad_scores_rows.data();
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / H, h = s % H;
      const scalar_t *kh = sequence<scalar_t>(keys, b, h), *vh = sequence<scalar_t>(values, b, h);
      const scalar_t *queries = kh + shift * d, *oh = op + b * T * C + h * d, *gh = gp + b * T * C + h * d;
      const float* lh = lse.data_ptr<float>() + (b * H + h) * L;
      P::transposed(kh, L, padded, d, keys_t.data());
      P::transposed(vh, L, padded, d, values_t.data());
      P::rows(kh, L, padded, d, keys_rows.data());
      std::fill(keys_sum.data(), keys_sum.data() + d * padded, 0.f);
      std::fill(values_sum.data(), values_sum.data() + d * padded, 0.f);
      for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = std::min(R, L - i0), width = round_up(i0 + rows, COLUMNS);
        const int64_t even_rows = rows + (rows & 1);  // the inner size of the dK, dV products must be even
        const scalar_t *g_block = gh + (shift + i0) * C, *q_block = queries + i0 * d;
        backward_block_rows(rows, d, R, g_block, oh + (shift + i0) * C, C, C, q_block, d, row_dot.data(), grad_t.data(),
                            q_t.data());
        for (int64_t c0 = 0; c0 < width; c0 += SLICE) {
          const int64_t slice = std::min(SLICE, width - c0);
          multiply(rows, slice, d, d, padded, slice, false, q_block, keys_t.data() + column<scalar_t>(c0),
                   scores.data());  // S
          multiply(rows, slice, d, C, padded, slice, false, g_block, values_t.data() + column<scalar_t>(c0),
                   grad_weights.data());  // dW = dO V^T
          // W = exp(S - lse) on admissible entries, zero past the diagonal, and dS = W (dW - <dO, O>), two rows
          // (a pair of a packed factor) and 32 columns at a time.
          for (int64_t r = 0; r < even_rows; r += 2) {
            for (int64_t j = 0; j < slice; j += 2 * Vec::size()) {
              Vec w[2][2], ds[2][2];
              for (int64_t i = 0; i < 2; ++i) {
                const int64_t valid = r + i < rows ? admissible(i0, r + i) - (c0 + j) : 0;  // in these 32
                w[i][0] = w[i][1] = ds[i][0] = ds[i][1] = Vec(0.f);
                if (valid > 0) {
                  const float *sc = scores.data() + (r + i) * slice + j;
                  const float* dw = grad_weights.data() + (r + i) * slice + j;
                  const Vec row_lse(lh[i0 + r + i]), dot(row_dot[r + i]);
                  w[i][0] = P::exp(Vec::loadu(sc) - row_lse);
                  w[i][1] = P::exp(Vec::loadu(sc + Vec::size()) - row_lse);
                  if (valid < 2 * Vec::size()) {  // the diagonal: keep the first `valid` entries
                    w[i][1] = Vec::set(Vec(0.f), w[i][1], std::max<int64_t>(valid - Vec::size(), 0));
                    w[i][0] = Vec::set(Vec(0.f), w[i][0], std::min<int64_t>(valid, Vec::size()));
                  }
                  ds[i][0] = w[i][0] * (Vec::loadu(dw) - dot);
                  ds[i][1] = w[i][1] * (Vec::loadu(dw + Vec::size()) - dot);
                }
                P::store(ds[i][0], ds[i][1], grad_scores_rows.data() + (r + i) * slice + j);
                if constexpr (!P::vnni) P::store(w[i][0], w[i][1], weights_right.data() + (r + i) * slice + j);
              }
              if constexpr (P::vnni) {
                store_row_pair(bf16_pair(w[0][0], w[0][1]), bf16_pair(w[1][0], w[1][1]), j, slice, r / 2,
                               weights_right.data());
                store_row_pair(bf16_pair(ds[0][0], ds[0][1]), bf16_pair(ds[1][0], ds[1][1]), j, slice, r / 2,
                               grad_scores_packed.data());
              }
            }
          }
          multiply(d, slice, even_rows, R, slice, padded, true, grad_t.data(), weights_right.data(),
                   values_sum.data() + c0);  // dV^T
          multiply(d, slice, even_rows, R, slice, padded, true, q_t.data(), grad_scores_right,
                   keys_sum.data() + c0);  // dK^T
          multiply(rows, d, slice, slice, d, d, c0 > 0, grad_scores_rows.data(), keys_rows.data() + c0 * d,
                   grad_queries.data() + i0 * d);  // dQ
        }
      }
      // dV: rows j < L from dV^T, zero after; dk_t = dK_t (t < L) + dQ_{t - shift} (t >= shift).
      scalar_t *dk = sequence<scalar_t>(grad_keys, b, h), *dv = sequence<scalar_t>(grad_values, b, h);
      transpose_into_rows(values_sum.data(), d, padded, rows_buffer.data());
      at::vec::convert(rows_buffer.data(), dv, L * d);
      std::fill(dv + L * d, dv + T * d, scalar_t(0.f));
      transpose_into_rows(keys_sum.data(), d, padded, rows_buffer.data());
      for (int64_t t = 0; t < T; ++t) {
        const float* stored = t < L ? rows_buffer.data() + t * d : nullptr;
        const float* queried = t >= shift ? grad_queries.data() + (t - shift) * d : nullptr;
        for (int64_t e = 0; e < d; e += 2 * Vec::size()) {
          Vec low(0.f), high(0.f);
          if (stored) low = low + Vec::loadu(stored + e), high = high + Vec::loadu(stored + e + Vec::size());
          if (queried) low = low + Vec::loadu(queried + e), high = high + Vec::loadu(queried + e + Vec::size());
          P::store(low, high, dk + t * d + e);
        }
      }
    }
    cpublas::brgemm_release(P::vnni);
  });
}

}  // namespace

// Returns the read (B, T, H d), rows t < shift zero, and the rows' log-sum-exp (B, H, T - shift) float32.
std::vector<torch::Tensor> forward(torch::Tensor keys, torch::Tensor values, int64_t shift, int64_t block_rows) {
  check_features(keys, values, shift, block_rows);
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), d = keys.size(3);
  auto out = torch::empty({B, T, H * d}, keys.options());
  auto lse = torch::empty({B, H, T - shift}, keys.options().dtype(torch::kFloat));
  if (keys.scalar_type() == at::kFloat) {
    forward_sequences<float>(keys, values, shift, block_rows, out, lse);
  } else {
    forward_sequences<BFloat16>(keys, values, shift, block_rows, out, lse);
  }
  return {out, lse};
}

// Returns the gradients of keys and values, with their strides.
std::vector<torch::Tensor> backward(torch::Tensor keys, torch::Tensor values, torch::Tensor out, torch::Tensor lse,
                                    torch::Tensor grad_out, int64_t shift, int64_t block_rows) {
  check_features(keys, values, shift, block_rows);
  const int64_t B = keys.size(0), H = keys.size(1), T = keys.size(2), d = keys.size(3);
  TORCH_CHECK(out.sizes() == grad_out.sizes() && out.size(0) == B && out.size(1) == T && out.size(2) == H * d &&
                  out.is_contiguous() && grad_out.is_contiguous() && grad_out.scalar_type() == keys.scalar_type() &&
                  out.scalar_type() == keys.scalar_type(),
              "out and grad_out must be contiguous (B, T, H d), of the keys' dtype");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == B * H * (T - shift), "lse must be (B, H, T - shift)");
  auto grad_keys = torch::empty_like(keys);
  auto grad_values = torch::empty_like(values);
  if (keys.scalar_type() == at::kFloat) {
    backward_sequences<float>(keys, values, out, lse, grad_out, shift, block_rows, grad_keys, grad_values);
  } else {
    backward_sequences<BFloat16>(keys, values, out, lse, grad_out, shift, block_rows, grad_keys, grad_values);
  }
  return {grad_keys, grad_values};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "context read, forward");
  m.def("backward", &backward, "context read, backward");
  m.def("supported", &amx_bf16::supported, "whether this CPU runs the packed bf16 micro-kernels");
}
