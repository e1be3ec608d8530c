// A whole decode step of a Llama-family model with int8 weight-only linears, in one C++ call.
//
// Why: a decode step of a 135M model on CPU is bound by per-op dispatch (hundreds of small torch ops
// per token) and by torch's M=1 int8 kernels, which stream well below memory bandwidth. Here every
// layer is plain loops: RMSNorm, an AVX2 int8 GEMV (activations quantized per row to int16, per-output-row
// weight scale, integer multiply-adds), RoPE on interleaved pairs, the new K/V
// written to the paged cache, attention over the sequence's slots, SwiGLU. Output rows are split over
// threads with at::parallel_for (torch's own thread pool and thread count).
//
// int4 weights (groups of 32, float16 scale and min, the GGUF Q4_1 grid) halve the bytes a step reads.
//
// Layouts (same as engine/model.py): qkv rows are [q (nh*hd) | k (nkv*hd) | v (nkv*hd)] with q/k in
// interleaved RoPE pair order; gate_up rows are [gate (I) | up (I)]; the cache is
// [layers, slots, nkv, hd] float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AGENTRT_AVX2 1
#endif

namespace {

#ifdef AGENTRT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef AGENTRT_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
  }
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f32(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef AGENTRT_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

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
void gemv(const torch::Tensor& W, const torch::Tensor& S, const torch::Tensor& bias, const float* X, float* Y,
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

// A linear as the kernel sees it (bias float [N] or empty in every case):
//   int8 rows:   w int8 [N, K], s float32 [N], z empty
//   int8 groups: w int8 [N, K], s = d float16 [N, K/32], z empty
//   int4 groups: w uint8 [N, K/2], s = d and z = m float16 [N, K/32]
struct Lin {
  torch::Tensor w, s, z, b;
  bool rows() const { return w.scalar_type() == torch::kInt8 && s.scalar_type() == torch::kFloat; }
};

void check_lin(const Lin& l, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(l.w.is_contiguous() && l.w.dim() == 2 && l.w.size(0) == N && l.s.is_contiguous(), what, ": bad weight");
  if (l.rows()) {
    TORCH_CHECK(l.w.size(1) == K && l.s.numel() == N, what, ": int8 rows need weight [N, K] and float32 scales [N]");
  } else {
    const bool q4 = l.w.scalar_type() == torch::kUInt8;
    TORCH_CHECK((q4 || l.w.scalar_type() == torch::kInt8) && K % 32 == 0 && l.w.size(1) == (q4 ? K / 2 : K), what,
                ": group weights need int8 [N, K] or packed uint8 [N, K/2], K a multiple of 32");
    TORCH_CHECK(l.s.scalar_type() == torch::kHalf && l.s.numel() == N * (K / 32), what, ": group scales: float16 [N, K/32]");
    TORCH_CHECK(!q4 || (l.z.scalar_type() == torch::kHalf && l.z.is_contiguous() && l.z.numel() == N * (K / 32)), what,
                ": int4 groups need float16 mins [N, K/32]");
  }
  TORCH_CHECK(!l.b.defined() || l.b.numel() == 0 || (l.b.scalar_type() == torch::kFloat && l.b.numel() == N), what,
              ": bias must be float32 [N]");
}

// Y [M, N] (+)= X [M, K] @ W.T + bias for any kind of linear.
void linear(const Lin& l, const float* X, float* Y, int64_t M, int64_t K, bool accumulate) {
  if (l.rows()) return gemv(l.w, l.s, l.b, X, Y, M, accumulate);
  const bool q4 = l.w.scalar_type() == torch::kUInt8;
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

void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t H, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * H;
    float ss = dot_f32(xm, xm, H);
    const float r = 1.f / std::sqrt(ss / float(H) + float(eps));
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = xm[i] * r * w[i];
  }
}

}  // namespace

// x [M, K] float32 -> [M, N] float32 through any kind of `Lin` (w, s, z, bias; see there).
torch::Tensor linear_op(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor z, torch::Tensor bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2, "linear: x must be float32 [M, K]");
  const Lin l{w, s, z, bias};
  check_lin(l, w.size(0), x.size(1), "linear");
  x = x.contiguous();
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  linear(l, x.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), false);
  return y;
}

// One decode step for B one-token sequences; writes each layer's new K/V into the cache.
//   x [B, H] float32: the new tokens' embeddings (overwritten: the residual stream)
//   positions [B] int64 (= earlier tokens of each sequence); new_slots [B] int64: the new tokens' slots
//   kv_slots [B, Lp] int64: slots of each sequence's earlier tokens (only the first positions[b] are read)
//   rope_cos / rope_sin [max_len, hd/2] float32; k_cache / v_cache [layers, slots, nkv, hd] float32
//   layers: 15 tensors per layer: qkv (w, s, z, bias), o (w, s, z), gate_up (w, s, z), down (w, s, z),
//           input_norm, post_attention_norm (see Lin; empty tensors where there is none)
// Returns the final-normed hidden states [B, H].
constexpr size_t kPerLayer = 15;

torch::Tensor decode_step(torch::Tensor x, torch::Tensor positions, torch::Tensor new_slots, torch::Tensor kv_slots,
                          torch::Tensor rope_cos, torch::Tensor rope_sin, torch::Tensor k_cache, torch::Tensor v_cache,
                          std::vector<torch::Tensor> layers, torch::Tensor final_norm, int64_t nh, int64_t nkv,
                          int64_t hd, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "decode_step: x must be contiguous float32 [B, H]");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat && v_cache.scalar_type() == torch::kFloat && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "decode_step: the KV cache must be contiguous float32");
  TORCH_CHECK(layers.size() % kPerLayer == 0 && int64_t(layers.size() / kPerLayer) == k_cache.size(0),
              "decode_step: 15 tensors per layer, one layer per cache layer");
  TORCH_CHECK(k_cache.size(2) == nkv && k_cache.size(3) == hd && nh % nkv == 0, "decode_step: cache shape does not match the heads");
  positions = positions.contiguous();
  new_slots = new_slots.contiguous();
  kv_slots = kv_slots.contiguous();
  const int64_t B = x.size(0), H = x.size(1), L = layers.size() / kPerLayer, S = k_cache.size(1);
  const int64_t I = layers[7].size(0) / 2, qd = nh * hd, kvd = nkv * hd, nqkv = qd + 2 * kvd, half = hd / 2;
  const int64_t Lp = kv_slots.dim() == 2 ? kv_slots.size(1) : 0;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* nslot = new_slots.data_ptr<int64_t>();
  const int64_t* slots = kv_slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < rope_cos.size(0) && pos[b] <= Lp && nslot[b] >= 0 && nslot[b] < S,
                "decode_step: position or slot out of range");
    for (int64_t j = 0; j < pos[b]; ++j) TORCH_CHECK(slots[b * Lp + j] >= 0 && slots[b * Lp + j] < S, "decode_step: kv slot out of range");
  }
  std::vector<Lin> lins;  // 4 per layer: qkv, o, gate_up, down
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * kPerLayer];
    lins.push_back({p[0], p[1], p[2], p[3]});
    lins.push_back({p[4], p[5], p[6], torch::Tensor()});
    lins.push_back({p[7], p[8], p[9], torch::Tensor()});
    lins.push_back({p[10], p[11], p[12], torch::Tensor()});
    check_lin(lins[l * 4], nqkv, H, "qkv");
    check_lin(lins[l * 4 + 1], H, qd, "o");
    check_lin(lins[l * 4 + 2], 2 * I, H, "gate_up");
    check_lin(lins[l * 4 + 3], H, I, "down");
    TORCH_CHECK(p[13].numel() == H && p[14].numel() == H && p[13].scalar_type() == torch::kFloat &&
                p[14].scalar_type() == torch::kFloat, "decode_step: norm weights must be float32 [H]");
  }
  auto opt = x.options();
  auto h = torch::empty({B, H}, opt);
  auto qkv = torch::empty({B, nqkv}, opt);
  auto att = torch::empty({B, qd}, opt);
  auto gu = torch::empty({B, 2 * I}, opt);
  auto act = torch::empty({B, I}, opt);
  float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *attp = att.data_ptr<float>(), *gup = gu.data_ptr<float>(), *actp = act.data_ptr<float>();
  const float *cosp = rope_cos.data_ptr<float>(), *sinp = rope_sin.data_ptr<float>();
  float *kc0 = k_cache.data_ptr<float>(), *vc0 = v_cache.data_ptr<float>();
  const float scale = 1.f / std::sqrt(float(hd));
  const int64_t group = nh / nkv, layer_stride = S * kvd;

  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * kPerLayer];
    const Lin* lin = &lins[l * 4];
    float* kc = kc0 + l * layer_stride;
    float* vc = vc0 + l * layer_stride;
    rms_norm(xp, p[13].data_ptr<float>(), hp, B, H, eps);
    linear(lin[0], hp, qkvp, B, H, false);
    for (int64_t b = 0; b < B; ++b) {  // RoPE on q and k (adjacent pairs), then the new K/V to the cache
      float* r = qkvp + b * nqkv;
      const float* c = cosp + pos[b] * half;
      const float* sn = sinp + pos[b] * half;
      for (int64_t head = 0; head < nh + nkv; ++head) {
        float* e = r + head * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = e[2 * i], x1 = e[2 * i + 1];
          e[2 * i] = x0 * c[i] - x1 * sn[i];
          e[2 * i + 1] = x0 * sn[i] + x1 * c[i];
        }
      }
      std::copy(r + qd, r + qd + kvd, kc + nslot[b] * kvd);
      std::copy(r + qd + kvd, r + nqkv, vc + nslot[b] * kvd);
    }
    at::parallel_for(0, B * nh, 1, [&](int64_t t0, int64_t t1) {  // one task per (sequence, head)
      std::vector<float> sc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nh, head = t % nh, g = head / group, n = pos[b] + 1;
        const float* q = qkvp + b * nqkv + head * hd;
        sc.resize(n);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t s = j < pos[b] ? slots[b * Lp + j] : nslot[b];
          sc[j] = dot_f32(q, kc + s * kvd + g * hd, hd) * scale;
          mx = std::max(mx, sc[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
        float* o = attp + b * qd + head * hd;
        std::fill(o, o + hd, 0.f);
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t s = j < pos[b] ? slots[b * Lp + j] : nslot[b];
          axpy_f32(sc[j] * inv, vc + s * kvd + g * hd, o, hd);
        }
      }
    });
    linear(lin[1], attp, xp, B, qd, true);  // x += o_proj(att)
    rms_norm(xp, p[14].data_ptr<float>(), hp, B, H, eps);
    linear(lin[2], hp, gup, B, H, false);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gup[b * 2 * I + i];
        actp[b * I + i] = g / (1.f + std::exp(-g)) * gup[b * 2 * I + I + i];
      }
    linear(lin[3], actp, xp, B, I, true);  // x += down(silu(gate) * up)
  }
  auto out = torch::empty({B, H}, opt);
  rms_norm(xp, final_norm.data_ptr<float>(), out.data_ptr<float>(), B, H, eps);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear_op, "x [M, K] float32 through an int8 (rows or groups of 32) or int4 linear -> [M, N]");
  m.def("decode_step", &decode_step, "one fused decode step (int8 or int4 weights, float32 activations and cache)");
  m.def("has_avx2", []() {
#ifdef AGENTRT_AVX2
    return true;
#else
    return false;
#endif
  });
}
