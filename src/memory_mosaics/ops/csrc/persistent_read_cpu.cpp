// Persistent-memory read on CPUs with AMX, bf16: out = scale_h softmax(q k^T) v per head h, forward and
// backward (scale_h: the persistent memory's output scale, applied where the read is rounded to bf16).
//
// Plain twin: memory_mosaics.ops.retrieval.persistent_retrieval_reference. Python side, loading and
// fallback: memory_mosaics/ops/persistent_read_cpu.py. Shapes: q (H, N, d) with the batch folded into
// N, bf16; the tables k and v (H, P, d), float32 (the parameters themselves) or bf16; all contiguous;
// d and P multiples of 64.
//
// Why a kernel: on CPUs PyTorch's fused attention spends most of this read's backward pass in
// elementwise work on the (N, P) weights. Here each block of query rows is done in one pass that stays
// in the L2 cache: scores and their gradient in float32 (products by oneDNN's brgemm micro-kernel with
// bf16 operands packed once per head), the exponential, the softmax backward and the bf16 conversion
// fused in one vectorised loop, and dK, dV accumulated in float32 over the blocks.
//
// The exponential is ATen's fexp_u20 (a degree-3 polynomial; relative error at most 1.1e-4 on [-87, 0],
// measured against float64), not exp_u20 (degree 5): every weight is rounded to bf16 (relative step 2^-9
// = 2e-3) before it is used, so the extra error does not show (errors against float64 unchanged to two
// digits), and in interleaved runs the forward pass took 4-15 % less time, the backward 2-10 % less.
#include "amx_bf16.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace {

using namespace amx_bf16;

// Slots whose scores the backward pass handles at a time: its float32 scores and score gradients for a
// block of 128 rows are then 2 x 128 KB, not 2 x 448 KB at P = 896, and the dK, dV sums (2 x 224 KB)
// they are multiplied into stay in the L2 cache. One layer's backward, 11 interleaved rounds against the
// whole width: 128 slots -4 %, 256 slots -12 %, 448 slots -9 % (B x T = 2,048; -6, -11, -8 % at 8,192).
constexpr int64_t SLICE = 256;
// d and P must be multiples of this: rows are handled in whole AVX-512 registers, 32 numbers at a time.
constexpr int64_t SIZE_MULTIPLE = 64;

// Head h of a (H, P, d) table, float32 or bf16, packed as the (P x d) right factor, or its transpose as the
// (d x P) one in column slices of `slice` slots (the last one narrower): slots [c0, c0 + width) at out + c0 d.
void pack_head(const torch::Tensor& table, int64_t h, bool transposed, BFloat16* out, int64_t slice = 0) {
  const int64_t P = table.size(1), d = table.size(2);
  auto pack = [&](const auto* head) {
    if (!transposed) return pack_rows(head, P, P, d, out);
    const int64_t step = slice > 0 ? slice : P;
    for (int64_t c0 = 0; c0 < P; c0 += step) {
      const int64_t width = std::min(step, P - c0);
      pack_rows_transposed(head + c0 * d, width, width, d, out + c0 * d);
    }
  };
  if (table.scalar_type() == at::kFloat) {
    pack(table.data_ptr<float>() + h * P * d);
  } else {
    pack(table.data_ptr<BFloat16>() + h * P * d);
  }
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& scale,
                  int64_t block_rows) {
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0) && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous(), "scale must be a contiguous float32 (H,) tensor");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (H, N, d), (H, P, d), (H, P, d)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "bf16 queries only");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "the tables must both be float32 or both bf16");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous inputs only");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2), "shape mismatch");
  TORCH_CHECK(q.size(2) % SIZE_MULTIPLE == 0 && k.size(1) % SIZE_MULTIPLE == 0,
              "d and P must be multiples of ", SIZE_MULTIPLE);
  static_assert(SIZE_MULTIPLE % (2 * Vec::size()) == 0, "rows are handled 2 x Vec::size() numbers at a time");
  TORCH_CHECK(block_rows > 0 && block_rows % 2 == 0, "block_rows must be even and positive");
}

}  // namespace

// Returns out = scale_h softmax(q k^T) v, (H, N, d) bf16, and the rows' log-sum-exp (H, N) float32.
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor scale,
                                   int64_t block_rows) {
  check_inputs(q, k, v, scale, block_rows);
  const int64_t H = q.size(0), N = q.size(1), d = q.size(2), P = k.size(1);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({H, N}, q.options().dtype(torch::kFloat));
  const BFloat16* qp = q.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> scores(0, R * P), read(1, R * d);
    Scratch<BFloat16> weights(0, R * P), keys_packed(1, d * P), values_packed(2, P * d);
    for (int64_t h = begin; h < end; ++h) {
      pack_head(k, h, true, keys_packed.data());
      pack_head(v, h, false, values_packed.data());
      for (int64_t m = 0; m < N; m += R) {
        const int64_t rows = std::min(R, N - m);
        multiply(rows, P, d, d, P, P, false, qp + (h * N + m) * d, keys_packed.data(), scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* s = scores.data() + r * P;
          Vec vmax(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < P; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
          const float row_max = horizontal_max(vmax);
          Vec vsum(0.f);
          for (int64_t j = 0; j < P; j += Vec::size()) {
            Vec e = (Vec::loadu(s + j) - Vec(row_max)).fexp_u20();
            e.store(s + j);
            vsum = vsum + e;
          }
          const float total = horizontal_sum(vsum);
          const Vec inverse(1.f / total);
          BFloat16* w = weights.data() + r * P;
          for (int64_t j = 0; j < P; j += 2 * Vec::size()) {  // normalise and round in one pass
            to_bf16(Vec::loadu(s + j) * inverse, Vec::loadu(s + j + Vec::size()) * inverse, w + j);
          }
          lp[h * N + m + r] = row_max + std::log(total);
        }
        multiply(rows, d, P, P, d, d, false, weights.data(), values_packed.data(), read.data());
        const Vec head_scale(scale.data_ptr<float>()[h]);
        for (int64_t i = 0; i < rows * d; i += 2 * Vec::size()) {  // scale and round
          to_bf16(Vec::loadu(read.data() + i) * head_scale, Vec::loadu(read.data() + i + Vec::size()) * head_scale,
                  op + (h * N + m) * d + i);
        }
      }
    }
    cpublas::brgemm_release();
  });
  return {out, lse};
}

// One head's sums dK^T and dV^T (d x P, dV^T of the unscaled values) -> its rows of dk and dv (P x d), dv
// times the head's scale, 16 x 16 at a time; returns dL/dscale = sum over slots j of <dV_j, v_j> (the
// read is scale times softmax weights times v), with v rounded to bf16 as the products used it.
template <typename table_t>
float finish_head(const float* keys_sum, const float* values_sum, const table_t* values, float scale, int64_t P,
                  int64_t d, float* grad_k, float* grad_v) {
  constexpr int64_t TILE = 16;  // P and d are multiples of 64
  alignas(64) float tile[TILE * TILE];
  Vec scale_grad(0.f);
  for (int64_t j0 = 0; j0 < P; j0 += TILE) {
    for (int64_t e0 = 0; e0 < d; e0 += TILE) {
      transpose16(keys_sum + e0 * P + j0, P, grad_k + j0 * d + e0, d);
      transpose16(values_sum + e0 * P + j0, P, tile, TILE);
      for (int64_t i = 0; i < TILE; ++i) {
        const Vec unscaled = Vec::loadu(tile + i * TILE);
        (unscaled * Vec(scale)).store(grad_v + (j0 + i) * d + e0);
        scale_grad = at::vec::fmadd(unscaled, load_as_bf16(values + (j0 + i) * d + e0), scale_grad);
      }
    }
  }
  return horizontal_sum(scale_grad);
}

// Returns dq (H, N, d) bf16, dk and dv (H, P, d) float32 (whatever the tables' dtype) and dscale (H,).
std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor scale,
                                    torch::Tensor out, torch::Tensor lse, torch::Tensor grad_out, int64_t block_rows) {
  check_inputs(q, k, v, scale, block_rows);
  TORCH_CHECK(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes() && out.is_contiguous() &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == at::kBFloat16,
              "out and grad_out must be contiguous bf16 like q");
  const int64_t H = q.size(0), N = q.size(1), d = q.size(2), P = k.size(1);
  auto grad_q = torch::empty_like(q);
  if (N == 0) {
    auto zero = torch::zeros({H, P, d}, q.options().dtype(torch::kFloat));
    return {grad_q, zero, zero.clone(), torch::zeros({H}, zero.options())};
  }
  auto grad_k = torch::empty({H, P, d}, q.options().dtype(torch::kFloat));
  auto grad_v = torch::empty({H, P, d}, q.options().dtype(torch::kFloat));
  auto grad_scale = torch::empty({H}, q.options().dtype(torch::kFloat));
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *op = out.data_ptr<BFloat16>();
  const BFloat16* gp = grad_out.data_ptr<BFloat16>();
  const float* lp = lse.data_ptr<float>();
  BFloat16* dqp = grad_q.data_ptr<BFloat16>();
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> weights(0, R * P), grad_scores(1, R * P), row_dot(2, R), grad_q_rows(3, R * d);
    Scratch<BFloat16> grad_scores_bf(0, R * P), weights_packed(1, R * P), grad_scores_packed(2, R * P);
    Scratch<BFloat16> grad_t(3, d * R), q_t(4, d * R), keys_t_packed(5, d * P), values_t_packed(6, d * P);
    Scratch<BFloat16> keys_packed(7, P * d);
    Scratch<float> keys_sum(4, d * P), values_sum(5, d * P);  // dK^T and dV^T (of the unscaled values)
    float *dktp = keys_sum.data(), *dvtp = values_sum.data();
    for (int64_t h = begin; h < end; ++h) {
      const float head_scale = scale.data_ptr<float>()[h];
      const BFloat16 *qh = qp + h * N * d, *gh = gp + h * N * d, *oh = op + h * N * d;
      const float* lh = lp + h * N;
      pack_head(k, h, true, keys_t_packed.data(), SLICE);
      pack_head(v, h, true, values_t_packed.data(), SLICE);
      pack_head(k, h, false, keys_packed.data());
      for (int64_t m = 0; m < N; m += R) {
        const int64_t rows = std::min(R, N - m);
        const int64_t even_rows = rows + (rows & 1);  // the inner size of the dK, dV products must be even
        backward_block_rows(rows, d, R, gh + m * d, oh + m * d, d, d, qh + m * d, d, row_dot.data(), grad_t.data(),
                            q_t.data());
        // Column slices of SLICE slots, so that the float32 scores and their gradients stay small beside
        // the dK, dV sums they are multiplied into.
        const Vec scaled(head_scale);
        for (int64_t c0 = 0; c0 < P; c0 += SLICE) {
          const int64_t width = std::min(SLICE, P - c0);
          multiply(rows, width, d, d, width, width, false, qh + m * d, keys_t_packed.data() + c0 * d,
                   weights.data());  // S
          multiply(rows, width, d, d, width, width, false, gh + m * d, values_t_packed.data() + c0 * d,
                   grad_scores.data());  // dW
          // W = exp(S - lse) and dS = W (scale dW - <dO, O>) (the read is scaled: dL/dW = scale dO V^T, and
          // <dO, O> is taken with the scaled O), two rows at a time: written packed for the dV and dK
          // products, and dS also row-major for the dQ product.
          for (int64_t r = 0; r < even_rows; r += 2) {
            for (int64_t j = 0; j < width; j += 2 * Vec::size()) {
              __m512i w[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, ds[2] = {w[0], w[1]};
              for (int64_t i = 0; i < 2 && r + i < rows; ++i) {
                const float *s = weights.data() + (r + i) * width + j;
                const float* dw = grad_scores.data() + (r + i) * width + j;
                const Vec row_lse(lh[m + r + i]), dot(row_dot[r + i]);
                const Vec p0 = (Vec::loadu(s) - row_lse).fexp_u20();
                const Vec p1 = (Vec::loadu(s + Vec::size()) - row_lse).fexp_u20();
                w[i] = bf16_pair(p0, p1);
                ds[i] = bf16_pair(p0 * (Vec::loadu(dw) * scaled - dot),
                                  p1 * (Vec::loadu(dw + Vec::size()) * scaled - dot));
                _mm512_storeu_si512(reinterpret_cast<__m512i*>(grad_scores_bf.data() + (r + i) * width + j), ds[i]);
              }
              store_row_pair(w[0], w[1], j, width, r / 2, weights_packed.data());
              store_row_pair(ds[0], ds[1], j, width, r / 2, grad_scores_packed.data());
            }
          }
          const bool add = m > 0;
          multiply(d, width, even_rows, R, width, P, add, grad_t.data(), weights_packed.data(), dvtp + c0);  // dV^T
          multiply(d, width, even_rows, R, width, P, add, q_t.data(), grad_scores_packed.data(), dktp + c0);  // dK^T
          multiply(rows, d, width, width, d, d, c0 > 0, grad_scores_bf.data(), keys_packed.data() + c0 * d,
                   grad_q_rows.data());  // dQ
        }
        at::vec::convert(grad_q_rows.data(), dqp + (h * N + m) * d, rows * d);
      }
      float* dk = grad_k.data_ptr<float>() + h * P * d;
      float* dv = grad_v.data_ptr<float>() + h * P * d;
      grad_scale.data_ptr<float>()[h] = v.scalar_type() == at::kFloat
          ? finish_head(dktp, dvtp, v.data_ptr<float>() + h * P * d, head_scale, P, d, dk, dv)
          : finish_head(dktp, dvtp, v.data_ptr<BFloat16>() + h * P * d, head_scale, P, d, dk, dv);
    }
    cpublas::brgemm_release();
  });
  return {grad_q, grad_k, grad_v, grad_scale};
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "persistent read, forward");
  m.def("backward", &backward, "persistent read, backward");
  m.def("supported", &amx_bf16::supported, "whether this CPU runs the packed bf16 micro-kernels");
}
