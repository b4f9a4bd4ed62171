// Persistent-memory read on CPUs with AMX, bf16 or float32: out = scale_h softmax(q k^T) v per head h, forward
// and backward (scale_h: the persistent memory's output scale, applied where the read is written).
//
// Plain twin: memory_mosaics.ops.retrieval.persistent_retrieval_reference. Python side, loading and
// fallback: memory_mosaics/ops/persistent_read_cpu.py. Shapes: q (H, N, d) with the batch folded into
// N; the tables k and v (H, P, d); all contiguous; d and P multiples of 64. bf16 queries take float32
// tables (the parameters themselves) or bf16 ones; float32 queries float32 tables.
//
// Why a kernel: on CPUs PyTorch's fused attention spends most of this read's backward pass in
// elementwise work on the (N, P) weights. Here each block of query rows is done in one pass that stays
// in the L2 cache: scores and their gradient in float32 (products by oneDNN's brgemm micro-kernel), the
// exponential and the softmax backward fused in one vectorised loop, and dK, dV accumulated in float32
// over the blocks. The precisions are amx_bf16.h's: in bf16 the tables are packed for the micro-kernel once
// per head and every weight and score gradient is rounded to bf16 in the same loop; in float32 nothing is
// rounded and the products take the tables' rows where they are (only their transposes are copied).
//
// The exponential in bf16 is ATen's fexp_u20 (a degree-3 polynomial; relative error at most 1.1e-4 on
// [-87, 0], measured against float64), not exp_u20 (degree 5): every weight is rounded to bf16 (relative
// step 2^-9 = 2e-3) before it is used, so the extra error does not show (errors against float64 unchanged
// to two digits), and in interleaved runs the forward pass took 4-15 % less time, the backward 2-10 % less.
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
  const bool bf16_queries = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_queries || q.scalar_type() == at::kFloat, "bf16 or float32 queries only");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || (k.scalar_type() == at::kBFloat16 && bf16_queries)),
              "the tables must both be float32, or both bf16 with bf16 queries");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous inputs only");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2), "shape mismatch");
  TORCH_CHECK(q.size(2) % SIZE_MULTIPLE == 0 && k.size(1) % SIZE_MULTIPLE == 0,
              "d and P must be multiples of ", SIZE_MULTIPLE);
  static_assert(SIZE_MULTIPLE % (2 * Vec::size()) == 0, "rows are handled 2 x Vec::size() numbers at a time");
  TORCH_CHECK(block_rows > 0 && block_rows % 2 == 0, "block_rows must be even and positive");
}

// Head h of a (H, P, d) table as the (P x d) right factor of a product: in bf16 packed into `buffer` (from
// float32 or bf16 tables), in float32 the table's own rows.
template <typename scalar_t>
const scalar_t* table_rows(const torch::Tensor& table, int64_t h, scalar_t* buffer) {
  if constexpr (Precision<scalar_t>::vnni) {
    pack_head(table, h, false, buffer);
    return buffer;
  } else {
    return table.data_ptr<float>() + h * table.size(1) * table.size(2);
  }
}

// Its transpose as the (d x P) right factor, written into `buffer`: in bf16 packed in column slices of
// `slice` slots (0: one slice), in float32 whole. `transposed_slice` says where slots [c0, c0 + width) of
// it start and its row stride there.
template <typename scalar_t>
void table_transposed(const torch::Tensor& table, int64_t h, scalar_t* buffer, int64_t slice = 0) {
  if constexpr (Precision<scalar_t>::vnni) {
    pack_head(table, h, true, buffer, slice);
  } else {
    const int64_t P = table.size(1), d = table.size(2);
    Precision<float>::transposed(table.data_ptr<float>() + h * P * d, P, P, d, buffer);
  }
}

struct Slice {
  int64_t offset, stride;
};

template <typename scalar_t>
Slice transposed_slice(int64_t c0, int64_t width, int64_t d, int64_t P) {
  if constexpr (Precision<scalar_t>::vnni) return {c0 * d, width};
  return {c0, P};
}

template <typename scalar_t>
void forward_heads(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& scale,
                   int64_t block_rows, torch::Tensor& out, torch::Tensor& lse, torch::Tensor& kept) {
  using Prec = Precision<scalar_t>;
  const int64_t H = q.size(0), N = q.size(1), d = q.size(2), P = k.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> scores(0, R * P), read(1, R * d);
    // (Packed tables in bf16 only: float32 products read the tables' rows where they are.)
    const int64_t packed_table = Prec::vnni ? P * d : 0;
    Scratch<scalar_t> weights(OPERANDS, R * P), keys_t(OPERANDS + 1, d * P), values_rows(OPERANDS + 2, packed_table);
    for (int64_t h = begin; h < end; ++h) {
      table_transposed(k, h, keys_t.data());
      const scalar_t* values_right = table_rows(v, h, values_rows.data());
      for (int64_t m = 0; m < N; m += R) {
        const int64_t rows = std::min(R, N - m);
        // The block's weights: straight into the kept ones (float32, for the backward pass), or scratch.
        scalar_t* block_weights = weights.data();
        if constexpr (!Prec::vnni) {
          if (kept.defined()) block_weights = kept.data_ptr<float>() + (h * N + m) * P;
        }
        multiply(rows, P, d, d, P, P, false, qp + (h * N + m) * d, keys_t.data(), scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* s = scores.data() + r * P;
          Vec vmax(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < P; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
          const float row_max = horizontal_max(vmax);
          Vec vsum(0.f);
          for (int64_t j = 0; j < P; j += Vec::size()) {
            Vec e = Prec::exp(Vec::loadu(s + j) - Vec(row_max));
            e.store(s + j);
            vsum = vsum + e;
          }
          const float total = horizontal_sum(vsum);
          const Vec inverse(1.f / total);
          scalar_t* w = block_weights + r * P;
          for (int64_t j = 0; j < P; j += 2 * Vec::size()) {  // normalise (and round) in one pass
            Prec::store(Vec::loadu(s + j) * inverse, Vec::loadu(s + j + Vec::size()) * inverse, w + j);
          }
          lp[h * N + m + r] = row_max + std::log(total);
        }
        multiply(rows, d, P, P, d, d, false, block_weights, values_right, read.data());
        const Vec head_scale(scale.data_ptr<float>()[h]);
        for (int64_t i = 0; i < rows * d; i += 2 * Vec::size()) {  // scale (and round)
          Prec::store(Vec::loadu(read.data() + i) * head_scale, Vec::loadu(read.data() + i + Vec::size()) * head_scale,
                      op + (h * N + m) * d + i);
        }
      }
    }
    cpublas::brgemm_release(Prec::vnni);
  });
}

// One head's sums dK^T and dV^T (d x P, dV^T of the unscaled values) -> its rows of dk and dv (P x d), dv
// times the head's scale, 16 x 16 at a time; returns dL/dscale = sum over slots j of <dV_j, v_j> (the
// read is scale times softmax weights times v), with v as the products used it (rounded to bf16 in bf16).
template <typename scalar_t, typename table_t>
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
        const table_t* value = values + (j0 + i) * d + e0;
        Vec used;
        if constexpr (Precision<scalar_t>::vnni) {
          used = load_as_bf16(value);
        } else {
          used = Vec::loadu(value);  // float32 tables (check_inputs)
        }
        scale_grad = at::vec::fmadd(unscaled, used, scale_grad);
      }
    }
  }
  return horizontal_sum(scale_grad);
}

template <typename scalar_t>
void backward_heads(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& scale,
                    const torch::Tensor& out, const torch::Tensor& lse, const torch::Tensor& grad_out,
                    const torch::Tensor& kept, int64_t block_rows, torch::Tensor& grad_q, torch::Tensor& grad_k,
                    torch::Tensor& grad_v, torch::Tensor& grad_scale) {
  using Prec = Precision<scalar_t>;
  const int64_t H = q.size(0), N = q.size(1), d = q.size(2), P = k.size(1);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  scalar_t* dqp = grad_q.data_ptr<scalar_t>();
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = block_rows;
    Scratch<float> weights(0, R * P), grad_scores(1, R * P), row_dot(2, R), grad_q_rows(3, R * d);
    Scratch<float> keys_sum(4, d * P), values_sum(5, d * P);  // dK^T and dV^T (of the unscaled values)
    // dS row-major (the dQ product's left factor), and W and dS as the dV and dK products' right factors
    // (in float32 dS row-major serves as both).
    // (Packed buffers in bf16 only: float32 products take row-major factors and the tables' rows as they are.)
    const int64_t packed_block = Prec::vnni ? R * P : 0, packed_table = Prec::vnni ? P * d : 0;
    Scratch<scalar_t> grad_scores_rows(OPERANDS, R * P), weights_right(OPERANDS + 1, R * P);
    Scratch<scalar_t> grad_scores_packed(OPERANDS + 2, packed_block);
    Scratch<scalar_t> grad_t(OPERANDS + 3, d * R), q_t(OPERANDS + 4, d * R);  // dO and q transposed, by block
    Scratch<scalar_t> keys_t(OPERANDS + 5, d * P), values_t(OPERANDS + 6, d * P);
    Scratch<scalar_t> keys_rows(OPERANDS + 7, packed_table);
    const scalar_t* grad_scores_right = Prec::vnni ? grad_scores_packed.data() : grad_scores_rows.data();
    float *dktp = keys_sum.data(), *dvtp = values_sum.data();
    for (int64_t h = begin; h < end; ++h) {
      const float head_scale = scale.data_ptr<float>()[h];
      const scalar_t *qh = qp + h * N * d, *gh = gp + h * N * d, *oh = op + h * N * d;
      const float* lh = lp + h * N;
      table_transposed(k, h, keys_t.data(), SLICE);
      table_transposed(v, h, values_t.data(), SLICE);
      const scalar_t* keys_right = table_rows(k, h, keys_rows.data());
      const float* kept_head = nullptr;  // float32: this head's weights, if the forward pass kept them
      if constexpr (!Prec::vnni) {
        if (kept.defined()) kept_head = kept.data_ptr<float>() + h * N * P;
      }
      const bool recompute = kept_head == nullptr;
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
          const Slice slice = transposed_slice<scalar_t>(c0, width, d, P);
          const float* kept_block = recompute ? nullptr : kept_head + m * P + c0;  // row stride P
          if (recompute) {
            multiply(rows, width, d, d, slice.stride, width, false, qh + m * d, keys_t.data() + slice.offset,
                     weights.data());  // S
          }
          multiply(rows, width, d, d, slice.stride, width, false, gh + m * d, values_t.data() + slice.offset,
                   grad_scores.data());  // dW
          // W = exp(S - lse) (or as kept) and dS = W (scale dW - <dO, O>) (the read is scaled: dL/dW = scale
          // dO V^T, and <dO, O> is taken with the scaled O), two rows at a time; dS row-major for the dQ
          // product, and in bf16 both written packed for the dV and dK products.
          for (int64_t r = 0; r < even_rows; r += 2) {
            for (int64_t j = 0; j < width; j += 2 * Vec::size()) {
              Vec w[2][2], ds[2][2];
              for (int64_t i = 0; i < 2; ++i) {
                w[i][0] = w[i][1] = ds[i][0] = ds[i][1] = Vec(0.f);
                if (r + i < rows) {
                  const float* s = weights.data() + (r + i) * width + j;
                  const float* dw = grad_scores.data() + (r + i) * width + j;
                  const Vec row_lse(lh[m + r + i]), dot(row_dot[r + i]);
                  if (recompute) {
                    w[i][0] = Prec::exp(Vec::loadu(s) - row_lse);
                    w[i][1] = Prec::exp(Vec::loadu(s + Vec::size()) - row_lse);
                  } else {
                    w[i][0] = Vec::loadu(kept_block + (r + i) * P + j);
                    w[i][1] = Vec::loadu(kept_block + (r + i) * P + j + Vec::size());
                  }
                  ds[i][0] = w[i][0] * (Vec::loadu(dw) * scaled - dot);
                  ds[i][1] = w[i][1] * (Vec::loadu(dw + Vec::size()) * scaled - dot);
                }
                if (r + i < rows || !Prec::vnni) {  // in float32 the padding row is a zero row of W and dS
                  Prec::store(ds[i][0], ds[i][1], grad_scores_rows.data() + (r + i) * width + j);
                }
                if constexpr (!Prec::vnni) {
                  if (recompute) Prec::store(w[i][0], w[i][1], weights_right.data() + (r + i) * width + j);
                }
              }
              if constexpr (Prec::vnni) {
                store_row_pair(bf16_pair(w[0][0], w[0][1]), bf16_pair(w[1][0], w[1][1]), j, width, r / 2,
                               weights_right.data());
                store_row_pair(bf16_pair(ds[0][0], ds[0][1]), bf16_pair(ds[1][0], ds[1][1]), j, width, r / 2,
                               grad_scores_packed.data());
              }
            }
          }
          const bool add = m > 0;
          if (recompute) {
            multiply(d, width, even_rows, R, width, P, add, grad_t.data(), weights_right.data(), dvtp + c0);  // dV^T
          } else if constexpr (!Prec::vnni) {  // the kept weights as they are (a float32 inner size may be odd)
            multiply(d, width, rows, R, P, P, add, grad_t.data(), kept_block, dvtp + c0);  // dV^T
          }
          multiply(d, width, even_rows, R, width, P, add, q_t.data(), grad_scores_right, dktp + c0);  // dK^T
          multiply(rows, d, width, width, d, d, c0 > 0, grad_scores_rows.data(), keys_right + c0 * d,
                   grad_q_rows.data());  // dQ
        }
        if constexpr (Prec::vnni) {
          at::vec::convert(grad_q_rows.data(), dqp + (h * N + m) * d, rows * d);
        } else {
          std::copy(grad_q_rows.data(), grad_q_rows.data() + rows * d, dqp + (h * N + m) * d);
        }
      }
      float* dk = grad_k.data_ptr<float>() + h * P * d;
      float* dv = grad_v.data_ptr<float>() + h * P * d;
      float& scale_grad = grad_scale.data_ptr<float>()[h];
      if (v.scalar_type() == at::kFloat) {
        scale_grad = finish_head<scalar_t>(dktp, dvtp, v.data_ptr<float>() + h * P * d, head_scale, P, d, dk, dv);
      } else if constexpr (Prec::vnni) {  // bf16 tables: with bf16 queries only
        scale_grad = finish_head<scalar_t>(dktp, dvtp, v.data_ptr<BFloat16>() + h * P * d, head_scale, P, d, dk, dv);
      }
    }
    cpublas::brgemm_release(Prec::vnni);
  });
}

// The weights a float32 forward pass keeps for its backward pass (a contiguous (H, N, P) float32 tensor the
// caller provides), or an undefined tensor where they are recomputed.
torch::Tensor kept_weights(const std::optional<torch::Tensor>& kept, const torch::Tensor& q, const torch::Tensor& k) {
  if (!kept.has_value()) return torch::Tensor();
  TORCH_CHECK(q.scalar_type() == at::kFloat && kept->scalar_type() == at::kFloat && kept->is_contiguous() &&
                  kept->sizes() == at::IntArrayRef({q.size(0), q.size(1), k.size(1)}),
              "weights are kept for float32 queries only, in a contiguous (H, N, P) float32 tensor");
  return *kept;
}

}  // namespace

// Returns out = scale_h softmax(q k^T) v, (H, N, d) of the queries' dtype, and the rows' log-sum-exp (H, N)
// float32; with `keep_into` (float32 only) also writes the softmax weights there for the backward pass.
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor scale,
                                   int64_t block_rows, std::optional<torch::Tensor> keep_into) {
  check_inputs(q, k, v, scale, block_rows);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat));
  torch::Tensor kept = kept_weights(keep_into, q, k);
  if (q.scalar_type() == at::kFloat) {
    forward_heads<float>(q, k, v, scale, block_rows, out, lse, kept);
  } else {
    forward_heads<BFloat16>(q, k, v, scale, block_rows, out, lse, kept);
  }
  return {out, lse};
}

// Returns dq (H, N, d) of the queries' dtype, dk and dv (H, P, d) float32 (whatever the tables' dtype) and
// dscale (H,). `kept`: the weights the forward pass kept, if it did.
std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor scale,
                                    torch::Tensor out, torch::Tensor lse, torch::Tensor grad_out,
                                    std::optional<torch::Tensor> kept, int64_t block_rows) {
  check_inputs(q, k, v, scale, block_rows);
  TORCH_CHECK(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes() && out.is_contiguous() &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "out and grad_out must be contiguous, of the queries' shape and dtype");
  const torch::Tensor weights = kept_weights(kept, q, k);
  const int64_t H = q.size(0), N = q.size(1), d = q.size(2), P = k.size(1);
  auto grad_q = torch::empty_like(q);
  if (N == 0) {
    auto zero = torch::zeros({H, P, d}, q.options().dtype(torch::kFloat));
    return {grad_q, zero, zero.clone(), torch::zeros({H}, zero.options())};
  }
  auto grad_k = torch::empty({H, P, d}, q.options().dtype(torch::kFloat));
  auto grad_v = torch::empty({H, P, d}, q.options().dtype(torch::kFloat));
  auto grad_scale = torch::empty({H}, q.options().dtype(torch::kFloat));
  if (q.scalar_type() == at::kFloat) {
    backward_heads<float>(q, k, v, scale, out, lse, grad_out, weights, block_rows, grad_q, grad_k, grad_v, grad_scale);
  } else {
    backward_heads<BFloat16>(q, k, v, scale, out, lse, grad_out, weights, block_rows, grad_q, grad_k, grad_v,
                             grad_scale);
  }
  return {grad_q, grad_k, grad_v, grad_scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "persistent read, forward");
  m.def("backward", &backward, "persistent read, backward");
  m.def("supported", &amx_bf16::supported, "whether this CPU runs the packed bf16 micro-kernels");
}
