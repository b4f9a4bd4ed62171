// What the two retrieval kernels (persistent_read_cpu.cpp, context_read_cpu.cpp) share: bf16 conversions
// in AVX-512 registers, packing of the micro-kernel's right factors, the micro-kernel call itself, row
// reductions, register transposes, per-thread scratch buffers, and the two precisions.
//
// Both kernels compute softmax(q k^T) v in blocks of query rows with scores in float32 and products in
// oneDNN's brgemm micro-kernels (bf16 operands on AMX, or float32). The Python loaders build them only
// where the CPU has AVX512-BF16 and the micro-kernel packs bf16 (memory_mosaics/ops/cpu_extensions.py,
// which also rebuilds a kernel when this header changes).
#pragma once

#include <torch/extension.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace amx_bf16 {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace cpublas = at::native::cpublas;

// Indices for _mm512_permutex2var_epi16 that take a[start], b[start], a[start + 1], b[start + 1], ...
// (entries 0-31 pick from a, 32-63 from b).
inline __m512i interleave_indices(int start) {
  alignas(64) uint16_t indices[32];
  for (int n = 0; n < 16; ++n) {
    indices[2 * n] = static_cast<uint16_t>(start + n);
    indices[2 * n + 1] = static_cast<uint16_t>(32 + start + n);
  }
  return _mm512_load_si512(indices);
}

// Two float vectors -> 2 x 16 bf16 numbers in one register, a first (rounded to nearest even). An
// AVX512-BF16 instruction: the Python loaders build and run the kernels only where the CPU has it.
inline __m512i bf16_pair(const Vec& a, const Vec& b) { return (__m512i)_mm512_cvtne2ps_pbh(b, a); }

// 32 consecutive numbers as bf16 in one register (float32 ones rounded to nearest even).
inline __m512i load_bf16x32(const float* in) { return bf16_pair(Vec::loadu(in), Vec::loadu(in + Vec::size())); }
inline __m512i load_bf16x32(const BFloat16* in) { return _mm512_loadu_si512(in); }

// bf16_pair(a, b) stored at out.
inline void to_bf16(const Vec& a, const Vec& b, BFloat16* out) {
  _mm512_storeu_si512(reinterpret_cast<__m512i*>(out), bf16_pair(a, b));
}

// 16 bf16 numbers -> 16 floats (exact: a bf16 number is the top half of a float's bits).
inline Vec widen(__m256i bf16x16) {
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16), 16)));
}

// 16 numbers as the products used them: rounded to bf16 (if float32), as floats.
inline Vec load_as_bf16(const float* in) { return widen((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in))); }
inline Vec load_as_bf16(const BFloat16* in) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in)));
}

// The micro-kernel's right factors are "VNNI"-packed: a (K x N) matrix, K even, as (K / 2, N, 2) — rows
// 2i and 2i + 1 interleaved element by element. One product takes the whole width N at once: measured
// against 64-column panels (cpublas::pack's widest), a (128 x 64) by (64 x 896) product took 25 instead
// of 35 us, and (64 x 128) by (128 x 896) 24 instead of 26 (one thread, median of 7 x 100 calls).
//
// Columns [column, column + 32) of rows 2i (a) and 2i + 1 (b), as bf16 -> their place in pair i of a packed
// (K x N) factor (checked by the tests through the results: a wrong layout gives wrong gradients).
inline void store_row_pair(__m512i a, __m512i b, int64_t column, int64_t N, int64_t pair, BFloat16* packed) {
  static const __m512i first_half = interleave_indices(0), second_half = interleave_indices(16);
  BFloat16* out = packed + pair * 2 * N + column * 2;
  _mm512_storeu_si512(reinterpret_cast<__m512i*>(out), _mm512_permutex2var_epi16(a, first_half, b));
  _mm512_storeu_si512(reinterpret_cast<__m512i*>(out + 32), _mm512_permutex2var_epi16(a, second_half, b));
}

// Packing reads float32 or bf16 rows where they are, rounding to bf16 on the way: no bf16 copy or
// transposed copy is made first. Rows past `rows` are packed as zeros: a zero weight times an unset
// entry (possibly NaN) would not be zero.

// `rows` rows of d numbers (row stride d) as the packed (padded_rows x d) right factor, padded_rows even.
template <typename T>
void pack_rows(const T* in, int64_t rows, int64_t padded_rows, int64_t d, BFloat16* out) {
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t pair = 0; pair < padded_rows / 2; ++pair) {
    const int64_t even = 2 * pair, odd = even + 1;
    for (int64_t e = 0; e < d; e += 32) {
      store_row_pair(even < rows ? load_bf16x32(in + even * d + e) : zero,
                     odd < rows ? load_bf16x32(in + odd * d + e) : zero, e, d, pair, out);
    }
  }
}

// The same rows as the packed (d x columns) right factor of their transpose (columns >= rows; the
// columns past `rows` zero): entries (2i, j) and (2i + 1, j) of the transpose are entries 2i and 2i + 1
// of row j, already adjacent, so each row is scattered as d / 2 pairs (32-bit units), 16 at a time,
// `columns` units apart.
template <typename T>
void pack_rows_transposed(const T* in, int64_t rows, int64_t columns, int64_t d, BFloat16* out) {
  const __m512i unit_offsets = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(columns)));
  auto* units = reinterpret_cast<int*>(out);
  for (int64_t j = 0; j < columns; ++j) {
    for (int64_t e = 0; e < d; e += 32) {
      const __m512i row = j < rows ? load_bf16x32(in + j * d + e) : _mm512_setzero_si512();
      _mm512_i32scatter_epi32(units + (e / 2) * columns + j, unit_offsets, row, 4);
    }
  }
}

// C (M x N, row stride ldc) = A (M x K, row stride lda) times packed (K x N, pair-row stride ldb >= N)
// [+ C when accumulate].
inline void multiply(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool accumulate,
                     const BFloat16* A, const BFloat16* packed, float* C) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, packed, C, /*is_vnni=*/true);
}
// The same in float32: the right factor B (K x N, row stride ldb) row-major as it is, no packing.
inline void multiply(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool accumulate,
                     const float* A, const float* B, float* C) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

inline float horizontal_max(Vec v) {
  float lanes[Vec::size()];
  v.store(lanes);
  return *std::max_element(lanes, lanes + Vec::size());
}

inline float horizontal_sum(Vec v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (float lane : lanes) total += lane;
  return total;
}

// A 16 x 16 block of floats transposed (rows of `in` with stride in_stride -> rows of `out`), in registers:
// pairs of rows interleaved by 32, 64 and 128 bits, then 256.
inline void transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * in_stride);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0xDD);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * out_stride, r[i]);
}

// A (d x columns) float32 matrix (row stride columns, both multiples of 16) as (columns x d) rows.
inline void transpose_into_rows(const float* in, int64_t d, int64_t columns, float* out) {
  for (int64_t j0 = 0; j0 < columns; j0 += 16) {
    for (int64_t e0 = 0; e0 < d; e0 += 16) transpose16(in + e0 * columns + j0, columns, out + j0 * d + e0, d);
  }
}

// A thread's scratch buffer, kept from call to call (slot: which of its buffers of type T). Fresh vectors
// on every call — about 1 MB forward and 2.5 MB backward, zeroed, in memory the allocator had returned to
// the system — were a fixed cost of every call: with them gone (and the tables packed with AVX-512), a
// 16-row persistent read took 0.24 instead of 0.37 ms forward and 0.39 instead of 0.70 ms backward.
template <typename T>
class Scratch {
 public:
  Scratch(int slot, size_t size) {
    thread_local std::array<std::vector<T>, 16> buffers;
    std::vector<T>& buffer = buffers.at(slot);
    if (buffer.size() < size) buffer.resize(size);
    data_ = buffer.data();
  }
  T* data() const { return data_; }
  T& operator[](size_t i) const { return data_[i]; }

 private:
  T* data_;
};

// What the backward pass of a read needs per block of query rows, besides the scores: each row's <dO, O>
// (= rowsum(W * dW), W the softmax weights) into row_dot, and dO and q transposed, (d x R) with row stride
// R, for the dV and dK products — with a zero row after an odd last one, as those products' inner size
// must be even. Row r of dO, O, q starts at grad + r * grad_stride, out + r * out_stride, q + r * q_stride.
template <typename T>
void backward_block_rows(int64_t rows, int64_t d, int64_t R, const T* grad, const T* out, int64_t grad_stride,
                         int64_t out_stride, const T* q, int64_t q_stride, float* row_dot, T* grad_t, T* q_t) {
  for (int64_t r = 0; r < rows; ++r) {
    float dot = 0.f;
    const T *g_row = grad + r * grad_stride, *o_row = out + r * out_stride, *q_row = q + r * q_stride;
    for (int64_t e = 0; e < d; ++e) {
      dot += float(g_row[e]) * float(o_row[e]);
      grad_t[e * R + r] = g_row[e];
      q_t[e * R + r] = q_row[e];
    }
    row_dot[r] = dot;
  }
  if (rows % 2 == 1) {
    for (int64_t e = 0; e < d; ++e) grad_t[e * R + rows] = q_t[e * R + rows] = T(0.f);
  }
}

// The two precisions. bf16: products on bf16 operands, right factors VNNI-packed (above), weights
// and their gradients rounded to bf16 before the products that use them, the exponential of degree 3
// (fexp_u20: relative error 1.1e-4, below bf16's rounding step). float32: products in float32 on right
// factors as they are (row-major, the float32 micro-kernel takes them so), the exponential of degree 5
// (exp_u20, as PyTorch's fused attention uses), nothing rounded.
template <typename scalar_t>
struct Precision;

template <>
struct Precision<BFloat16> {
  static constexpr bool vnni = true;
  static Vec exp(const Vec& x) { return x.fexp_u20(); }
  static void store(const Vec& a, const Vec& b, BFloat16* out) { to_bf16(a, b, out); }
  // `rows` rows of d numbers as the right factor of their transpose, (d x columns), columns past `rows` zero
  static void transposed(const BFloat16* in, int64_t rows, int64_t columns, int64_t d, BFloat16* out) {
    pack_rows_transposed(in, rows, columns, d, out);
  }
  // the same rows as a (padded x d) right factor, rows past `rows` zero
  static void rows(const BFloat16* in, int64_t rows, int64_t padded, int64_t d, BFloat16* out) {
    pack_rows(in, rows, padded, d, out);
  }
};

template <>
struct Precision<float> {
  static constexpr bool vnni = false;
  static Vec exp(const Vec& x) { return x.exp_u20(); }
  static void store(const Vec& a, const Vec& b, float* out) {
    a.store(out);
    b.store(out + Vec::size());
  }
  static void transposed(const float* in, int64_t rows, int64_t columns, int64_t d, float* out) {
    for (int64_t j0 = 0; j0 < columns; j0 += 16) {
      for (int64_t e0 = 0; e0 < d; e0 += 16) {
        if (j0 + 16 <= rows) {
          transpose16(in + j0 * d + e0, d, out + e0 * columns + j0, columns);
          continue;
        }
        for (int64_t e = e0; e < e0 + 16; ++e) {
          for (int64_t j = j0; j < j0 + 16; ++j) out[e * columns + j] = j < rows ? in[j * d + e] : 0.f;
        }
      }
    }
  }
  static void rows(const float* in, int64_t rows, int64_t padded, int64_t d, float* out) {
    std::copy(in, in + rows * d, out);
    std::fill(out + rows * d, out + padded * d, 0.f);
  }
};

// Where column c of a right factor starts (a VNNI-packed one holds two numbers per column and pair of rows).
template <typename scalar_t>
int64_t column(int64_t c) {
  return Precision<scalar_t>::vnni ? 2 * c : c;
}

// Scratch slots of the operand type start here, so that float32 operands do not share the float32 buffers.
constexpr int OPERANDS = 8;

inline bool supported() { return cpublas::could_pack(at::kBFloat16); }

}  // namespace amx_bf16
