// What the C++ kernel files share: the linear a kernel reads (`Lin`), the linear and attention entry
// points, and small vector helpers. One extension is built from decode_kernel.cpp (the step and the
// Python bindings), linear_kernel.cpp (int8 / int6 / int4 linears) and attention_kernel.cpp (paged attention).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <functional>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AGENTRT_AVX2 1
// AVX-512 VNNI on 256-bit registers (AVX512VL): one vpdpbusd does what maddubs + madd (+ add) do, with the
// same integer sums (no int16 step saturates here), so the results are bit-identical to the AVX2 build's
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define AGENTRT_VNNI 1
#endif
#endif

namespace agentrt {

// A linear as the kernels see it, in the kernel's order (decode_fused.FusedLinear.pack builds it from the
// plain grids). Output rows n go in blocks of 8 (the last block has nb = N % 8 rows if that is not 0); a
// block's tensors are stored contiguously where its rows would be, interleaved so one 32-byte load holds 4
// consecutive inputs of each of the block's columns. With G = ceil(K / 32) groups of 32 inputs:
//   int8 (Q8_0 grid, or per-row scales repeated per group): w int8 [N, 32 G], w = d_g * q, K padded with 0;
//        in block b, byte ((g * 8 + i) * nb + c) * 4 + r holds q[8b + c][32g + 4i + r] (i < 8, r < 4)
//   int4 (Q4_1 grid, K % 32 == 0): w uint8 [N, K/2], w = d_g * q + m_g, q in 0..15; in block b, byte
//        ((g * 4 + i) * nb + c) * 4 + r holds q[8b + c][32g + 4i + r] in its low nibble and
//        q[8b + c][32g + 16 + 4i + r] in its high nibble (i < 4, r < 4)
//   s = d [N, G] and (int4) z = m [N, G], both float16 or both float32: in block b, element g * nb + c is
//        column 8b + c's d (m) of group g. float16 where every value is one exactly (a GGUF's own Q4_0 / Q4_1 /
//        Q8_0 scales, our quantizers'): a 4-bit weight then takes 5 bits, not 6, and decode reads that much less
//   or (int4 only, K % 256 == 0) super-block scales, Q4_K's own form: s uint8 [N, 20 K/256], z empty, and
//        w = D * sc_g * q - Dm * mn_g. In block b, super-block t (groups 8t..8t+7) is a record of 20 nb bytes at
//        byte 20 nb t: D float16 [nb], Dm float16 [nb], sc uint8 [8][nb], mn uint8 [8][nb] (group, column).
//        A weight takes 4.625 bits (Q4_K's 4.5), where float32 d and m per group took 6
//   int6 (Q6_K's own form, K % 256 == 0): w uint8 [N, 3K/4], w = d_h * (q - 32), q in 0..63, a scale d_h per 16
//        inputs; in block b a group is 192 bytes: its low 4 bits as int4's 128, then two 32-byte planes of the
//        high 2 bits (plane p, byte (c * 4 + r) holds those of q[8b + c][32g + 16p + 4i + r] at bits 2i, i < 4).
//        s int8 [N, 18 K/256] (the records' dtype marks int6), z empty: super-block t is a record of 18 nb bytes:
//        D float16 [nb], sc int8 [16][nb] (half-group, column); d_h = D * sc_h. 6.5625 bits a weight, as Q6_K
//   int5 (Q5_K's own form, K % 256 == 0): w uint8 [N, 5K/8], q in 0..31: in block b a group is 160 bytes, its
//        low 4 bits as int4's 128, then a 32-byte plane of the high bit (byte c * 4 + r holds that of
//        q[8b + c][32g + 4i + r] at bit i, i < 8); Q4_K's super-block scales (s uint8 [N, 20 K/256], z empty):
//        w = D * sc_g * q - Dm * mn_g. 5.625 bits a weight (Q5_K's 5.5; int8 groups took 8.5)
//   bias float32 [N] (plain order) or empty
struct Lin {
  at::Tensor w, s, z, b;
  bool int6() const { return s.scalar_type() == at::kChar; }
  // super-block scales beside 5K/8 bytes of weights (int4's take K/2): w.size(1) / s.size(1) = 8, not 6.4
  bool int5() const { return super_scales() && w.size(1) == s.size(1) * 8; }
  bool int4() const { return w.scalar_type() == at::kByte && !int6(); }
  bool half_scales() const { return s.scalar_type() == at::kHalf; }
  bool super_scales() const { return s.scalar_type() == at::kByte; }
};

constexpr int64_t kSuperRecord = 20;  // bytes a column's super-block scales take (see Lin)
constexpr int64_t kSixRecord = 18;    // int6's

// at::parallel_for's contract (f gets contiguous chunks of [begin, end), at most `num_threads()` of them,
// none smaller than `grain` but the last) on the kernels' own thread pool (thread_pool.cpp says why).
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

// The kernels' thread count: set by `set_num_threads` (n >= 1), else (0, the start) torch's intra-op count.
// `set_num_threads` returns the setting it replaced (0 or a count), for a caller that restores it.
int64_t num_threads();
int64_t set_num_threads(int64_t n);

// Throws (TORCH_CHECK) naming `what` unless `l` is a well-formed [N, K] linear.
void check_lin(const Lin& l, int64_t N, int64_t K, const char* what);

// Y [M, N] (+)= X [M, K] @ W.T + bias for any kind of `Lin` (Y's rows ldy floats apart, ldy >= N), X rounded
// to int8 per block of 32 inputs
// (step max|x| / 127: at most half a step of error per element); with `int16` the kernel also multiplies
// what that rounding left, rounded to step / 254 (int16-like precision for twice the multiply work).
// Each row's result depends only on that row (never on M): a request's numbers do not change with what
// else is in its batch. Threads over the kernels' pool (`num_threads()` of them).
void linear(const Lin& l, const float* X, float* Y, int64_t M, int64_t K, bool accumulate, bool int16, int64_t ldy);

// x [M, K] float32 -> [M, N] float32 through the `Lin` (w, s, z, bias): `linear` for Python.
at::Tensor linear_op(at::Tensor x, at::Tensor w, at::Tensor s, at::Tensor z, at::Tensor bias, bool int16);

// Causal attention over a paged KV cache for a batch of sequences, each with n_i >= 1 new query rows
// (a decode token or a prefill chunk) whose K/V are already in the cache.
//   q:        [T, *] float32; row t's head h starts at q + t * q_stride + h * hd
//   k_cache / v_cache: one layer, [slots, nkv, hd] float32 or float16 (KV = float or at::Half)
//   seq_start [B + 1]: sequence i owns query rows [seq_start[i], seq_start[i + 1])
//   ctx_len   [B]: keys sequence i's last query row sees (its earlier tokens + n_i)
//   slots     [B, ld_slots]: slot of each key position of sequence i (first ctx_len[i] read)
//   out:      [T, nh * hd] float32
// Query row j (0-based within sequence i) sees key positions 0 .. ctx_len[i] - n_i + j.
template <class KV>
void attention(const float* q, int64_t q_stride, const KV* k_cache, const KV* v_cache, const int64_t* seq_start,
               const int64_t* ctx_len, const int64_t* slots, int64_t ld_slots, int64_t B, int64_t nh, int64_t nkv,
               int64_t hd, float* out);

// `attention` for Python: q [T, >= nh * hd], caches [slots, nkv, hd] (both float32 or both float16), seq_start [B + 1], ctx_len [B],
// slots [B, L] (int64) -> out [T, nh * hd]; checks every index first.
at::Tensor attention_op(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor seq_start, at::Tensor ctx_len,
                        at::Tensor slots, int64_t nh, int64_t nkv, int64_t hd);

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

#ifdef AGENTRT_AVX2
// 8 consecutive cache values as float32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// A KV cache row of n values as float32: the row itself, or (float16) widened into buf
inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const at::Half* row, int64_t n, float* buf) {
  int64_t i = 0;
#ifdef AGENTRT_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, load8(row + i));
#endif
  for (; i < n; ++i) buf[i] = float(row[i]);
  return buf;
}

inline void axpy_f32(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef AGENTRT_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

}  // namespace agentrt
