// int8 and int4 weight-only linears on CPU: Y [M, N] (+)= X [M, K] @ W.T + bias (see kernels.h's `Lin`).
//
// Activations are quantized per row to int16 and multiplied in integers (AVX2 madd); output rows are
// split over threads with at::parallel_for (torch's own thread pool and thread count).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace agentrt {
namespace {

// Activations are quantized per row to int16 (x ~= xq * sx) so the GEMV is an integer dot: int8
// weights widen to int16 and _mm256_madd_epi16 multiplies and pairs 16 of them per instruction, twice
// the float path's rate (int8 -> int32 -> float -> FMA per 8). The row's largest value maps to
// act_limit(K) <= 32767 (16 bits, far finer than the weights' 8), small enough that no int32 lane
// can overflow: a lane adds ceil(K / 16) pair sums of at most 2 * 128 * limit each.
inline int32_t act_limit(int64_t K) {
  const int64_t per_lane = (K + 15) / 16;
  return int32_t(std::min<int64_t>(32767, (int64_t(1) << 31) / (per_lane * 2 * 128) - 1));
}

void quantize_rows(const float* X, int16_t* Q, float* sx, int64_t M, int64_t K) {
  const float limit = float(act_limit(K));
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * K;
    float mx = 0.f;
    for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(x[k]));
    const float s = mx > 0.f ? mx / limit : 1.f;
    const float inv = 1.f / s;
    for (int64_t k = 0; k < K; ++k) Q[m * K + k] = int16_t(std::nearbyint(x[k] * inv));
    sx[m] = s;
  }
}

inline int32_t dot_i8_i16(const int8_t* w, const int16_t* x, int64_t k0, int64_t K) {
  int32_t s = 0;
  for (int64_t k = k0; k < K; ++k) s += int32_t(w[k]) * int32_t(x[k]);
  return s;
}

#ifdef AGENTRT_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
inline __m256i madd_i8(const int8_t* w, __m256i x) {  // 16 int8 weights x 16 int16 activations -> 8 int32
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), x);
}
#endif

// Y[m, n] (+)= S[n] * sx[m] * dot(W[n, :], XQ[m, :]) + bias[n] for rows n in [n0, n1); W [N, K] int8.
void gemv_rows(const int8_t* W, const float* S, const float* bias, const int16_t* XQ, const float* sx, float* Y,
               int64_t M, int64_t K, int64_t ldy, bool accumulate, int64_t n0, int64_t n1) {
  int64_t n = n0;
  auto put = [&](int64_t m, int64_t row, int32_t dot) {
    float v = float(dot) * sx[m] * S[row] + (bias ? bias[row] : 0.f);
    float& y = Y[m * ldy + row];
    y = accumulate ? y + v : v;
  };
#ifdef AGENTRT_AVX2
  const int64_t K16 = K & ~int64_t(15);
  for (; n + 4 <= n1; n += 4) {  // 4 rows at once: each activation load serves 4 weight rows
    const int8_t* w0 = W + n * K;
    const int8_t* w1 = w0 + K;
    const int8_t* w2 = w1 + K;
    const int8_t* w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {  // the 4 rows (4K bytes) stay in L1 across the batch rows
      const int16_t* x = XQ + m * K;
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K16; k += 16) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
        a0 = _mm256_add_epi32(a0, madd_i8(w0 + k, xv));
        a1 = _mm256_add_epi32(a1, madd_i8(w1 + k, xv));
        a2 = _mm256_add_epi32(a2, madd_i8(w2 + k, xv));
        a3 = _mm256_add_epi32(a3, madd_i8(w3 + k, xv));
      }
      put(m, n, hsum_i32(a0) + dot_i8_i16(w0, x, K16, K));
      put(m, n + 1, hsum_i32(a1) + dot_i8_i16(w1, x, K16, K));
      put(m, n + 2, hsum_i32(a2) + dot_i8_i16(w2, x, K16, K));
      put(m, n + 3, hsum_i32(a3) + dot_i8_i16(w3, x, K16, K));
    }
  }
#endif
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) put(m, n, dot_i8_i16(W + n * K, XQ + m * K, 0, K));
}

// Y [M, N] (+)= X [M, K] @ (W * S[:, None]).T + bias, output rows split over threads.
void gemv(const at::Tensor& W, const at::Tensor& S, const at::Tensor& bias, const float* X, float* Y,
          int64_t M, bool accumulate) {
  const int64_t N = W.size(0), K = W.size(1);
  const int8_t* w = W.data_ptr<int8_t>();
  const float* s = S.data_ptr<float>();
  const float* b = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M);
  quantize_rows(X, xq.data(), sx.data(), M, K);
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    gemv_rows(w, s, b, xq.data(), sx.data(), Y, M, K, N, accumulate, b0 * 4, std::min(b1 * 4, N));
  });
}

// Rows in groups of 32 weights with a float16 scale d_g each, the GGUF grids:
//   int4 (Q4_1): w = d_g * q + m_g, q in 0..15; byte j of a group holds q[j] (low nibble) and q[j + 16]
//                (high nibble); half the bytes of int8 per weight.
//   int8 (Q8_0): w = d_g * q, q in -127..127.
// The dot is d_g * (q . xq)_g (+ m_g * (sum xq)_g) per group, the integer part by the same madd as above.
inline float half_to_float(at::Half h) {
#ifdef AGENTRT_AVX2
  return _cvtsh_ss(h.x);
#else
  return float(h);
#endif
}

template <bool kQ4>
void gemv_groups_rows(const uint8_t* W, const at::Half* D, const at::Half* Mn, const float* bias, const int16_t* XQ,
                      const float* gsum, const float* sx, float* Y, int64_t M, int64_t K, int64_t ldy, bool accumulate,
                      int64_t n0, int64_t n1) {
  const int64_t G = K / 32, gbytes = kQ4 ? 16 : 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * G * gbytes;
    const at::Half* d = D + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* x = XQ + m * K;
      float dot = 0.f;
      int64_t g = 0;
#ifdef AGENTRT_AVX2
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
      auto group = [&](int64_t gi) {  // 8 int32 partial sums of the group's q . xq, as float
        const uint8_t* wg = w + gi * gbytes;
        __m256i lo, hi;
        if constexpr (kQ4) {
          const __m128i low = _mm_set1_epi8(0x0f);
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg));
          lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, low));
          hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low));
        } else {
          lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
          hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)));
        }
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + gi * 32));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + gi * 32 + 16));
        return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1)));
      };
      for (; g + 2 <= G; g += 2) {  // two groups a round: two independent FMA chains
        acc0 = _mm256_fmadd_ps(group(g), _mm256_set1_ps(half_to_float(d[g])), acc0);
        acc1 = _mm256_fmadd_ps(group(g + 1), _mm256_set1_ps(half_to_float(d[g + 1])), acc1);
      }
      dot = hsum(_mm256_add_ps(acc0, acc1));
#endif
      for (; g < G; ++g) {
        const uint8_t* wg = w + g * gbytes;
        int32_t t = 0;
        for (int64_t j = 0; j < 16; ++j) {
          if constexpr (kQ4) {
            t += int32_t(wg[j] & 15) * x[g * 32 + j] + int32_t(wg[j] >> 4) * x[g * 32 + 16 + j];
          } else {
            t += int32_t(int8_t(wg[j])) * x[g * 32 + j] + int32_t(int8_t(wg[16 + j])) * x[g * 32 + 16 + j];
          }
        }
        dot += float(t) * half_to_float(d[g]);
      }
      if constexpr (kQ4) {
        const at::Half* mn = Mn + n * G;
        const float* gs = gsum + m * G;
        for (int64_t gi = 0; gi < G; ++gi) dot += half_to_float(mn[gi]) * gs[gi];
      }
      float v = dot * sx[m] + (bias ? bias[n] : 0.f);
      float& y = Y[m * ldy + n];
      y = accumulate ? y + v : v;
    }
  }
}

}  // namespace

void check_lin(const Lin& l, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(l.w.is_contiguous() && l.w.dim() == 2 && l.w.size(0) == N && l.s.is_contiguous(), what, ": bad weight");
  if (l.rows()) {
    TORCH_CHECK(l.w.size(1) == K && l.s.numel() == N, what, ": int8 rows need weight [N, K] and float32 scales [N]");
  } else {
    const bool q4 = l.w.scalar_type() == at::kByte;
    TORCH_CHECK((q4 || l.w.scalar_type() == at::kChar) && K % 32 == 0 && l.w.size(1) == (q4 ? K / 2 : K), what,
                ": group weights need int8 [N, K] or packed uint8 [N, K/2], K a multiple of 32");
    TORCH_CHECK(l.s.scalar_type() == at::kHalf && l.s.numel() == N * (K / 32), what, ": group scales: float16 [N, K/32]");
    TORCH_CHECK(!q4 || (l.z.scalar_type() == at::kHalf && l.z.is_contiguous() && l.z.numel() == N * (K / 32)), what,
                ": int4 groups need float16 mins [N, K/32]");
  }
  TORCH_CHECK(!l.b.defined() || l.b.numel() == 0 || (l.b.scalar_type() == at::kFloat && l.b.numel() == N), what,
              ": bias must be float32 [N]");
}

// Y [M, N] (+)= X [M, K] @ W.T + bias for any kind of linear.
void linear(const Lin& l, const float* X, float* Y, int64_t M, int64_t K, bool accumulate) {
  if (l.rows()) return gemv(l.w, l.s, l.b, X, Y, M, accumulate);
  const bool q4 = l.w.scalar_type() == at::kByte;
  const int64_t N = l.w.size(0), G = K / 32;
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M), gsum(q4 ? M * G : 0);
  quantize_rows(X, xq.data(), sx.data(), M, K);
  for (int64_t i = 0; i < int64_t(gsum.size()); ++i) {
    int32_t t = 0;
    for (int64_t j = 0; j < 32; ++j) t += xq[i * 32 + j];
    gsum[i] = float(t);
  }
  const float* b = l.b.defined() && l.b.numel() ? l.b.data_ptr<float>() : nullptr;
  const uint8_t* w = static_cast<const uint8_t*>(l.w.data_ptr());
  const at::Half* d = l.s.data_ptr<at::Half>();
  const at::Half* mn = q4 ? l.z.data_ptr<at::Half>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (q4) gemv_groups_rows<true>(w, d, mn, b, xq.data(), gsum.data(), sx.data(), Y, M, K, N, accumulate, n0, n1);
    else gemv_groups_rows<false>(w, d, mn, b, xq.data(), gsum.data(), sx.data(), Y, M, K, N, accumulate, n0, n1);
  });
}

// x [M, K] float32 -> [M, N] float32 through any kind of `Lin` (w, s, z, bias; see there).
at::Tensor linear_op(at::Tensor x, at::Tensor w, at::Tensor s, at::Tensor z, at::Tensor bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "linear: x must be float32 [M, K]");
  const Lin l{w, s, z, bias};
  check_lin(l, w.size(0), x.size(1), "linear");
  x = x.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear(l, x.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), false);
  return y;
}

}  // namespace agentrt
