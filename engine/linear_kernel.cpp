// int8, int6 and int4 weight-only linears on CPU: Y [M, N] (+)= X [M, K] @ W.T + bias (see kernels.h's `Lin`).
//
// Why this shape of kernel (2-core Zen 3, AVX2 without VNNI):
// - Activations are quantized to int8 per block of 32 (scale = max|x| / 127, like GGUF's Q8_1), so the
//   products run on _mm256_maddubs_epi16: u8 x s8 -> int16 pair sums, 32 multiply-adds an instruction
//   (twice madd_epi16's 16). int4 weights (0..15) against int8 activations (|x| <= 127) make pair sums of
//   at most 2 * 15 * 127 = 3810, so a group's 8 maddubs add up in int16 (<= 30480) before one madd with
//   ones widens them. int8 weights (|q| <= 127) take the sign trick (|w| x sign(x, w)), pair sums <= 32258.
//   int6 weights are unsigned (q = w / d + 32, 0..63) against the activations, less 32 times their sum.
// - With `int16` (the caller's choice, the same for every row) each activation row is split in two int8
//   rows, x ~= s * q1 + s / 254 * q2: int16-like precision for 1.5x the linear time at 1 row, 2x at 4 and
//   more (SmolLM2 layer shapes, one thread). On SmolLM2-135M int4-fused vs fp32, 256 teacher-forced
//   tokens one a step: top-1 agreement 100% with int16 vs 96.9% with int8 alone (greedy continuations
//   of 8 prompts: 32 of 32 tokens identical either way). The precision never depends on the row count,
//   so a row comes out the same alone, in a decode batch or in a prefill chunk.
// - Weights are stored in the kernel's order (kernels.h): 8 output columns interleaved by 4 inputs, so
//   one broadcast of 4 activation bytes meets 8 columns in one register, and each weight register serves
//   up to 4 activation rows: batch rows share the unpacking and loads. int4 tiles are 4 rows x 16 columns
//   (two blocks share each broadcast) when more than 4 rows read the blocks, else 8 columns: a decode step
//   waits on streaming the weights from memory, and one block's streams at a time stream faster than two.
//   int8 tiles are 4 x 8 (their sign trick needs more registers).
// - The tiles are bound by vector op issue, not by the maddubs alone: a 4 x 16 int4 group is 64 maddubs + 56
//   int16 adds + 32 broadcasts + a float epilogue per accumulator (madd, cvt, mul, 2 fma: the bit-exact order) +
//   the nibble unpacking. So the tile keeps its float sums in locals (a __m256 pointer may alias anything, and GCC
//   then stores each sum twice a group), runs the low-nibble steps of a group for all rows before the high ones
//   (fewer registers live), and, when three row tiles or more read a pair of blocks, reads a copy unpacked to
//   bytes (one load a step instead of a load, an and and, for the high nibbles, a shift). Row tiles stay inside
//   the column blocks, so each weight block streams from cache once for all the rows it serves.
// - Per-group scales (and int4 mins) are float16 or float32 in the same column order: one load (and, for
//   float16, one vcvtph2ps) for 8 columns; or Q4_K's super-block scales, whose d = D * sc and m = -(Dm * mn)
//   the tile makes per group (two converts and a multiply each), once per call for many rows.
// - One parallel region per call (output column blocks split over the kernels' pool, torch's thread count),
//   activation scratch reused per thread.
#include "kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace agentrt {
namespace {

constexpr int64_t kNR = 8;      // output columns of a block (one float32 register)
constexpr int64_t kMR = 4;      // activation rows of a tile
// activation rows whose int8 values (<= 128 * K bytes) stay in L2 across column blocks (even: split
// rows stay together)
constexpr int64_t kMChunk = 128;

inline int64_t pad32(int64_t k) { return (k + 31) / 32 * 32; }

// Activations of one call: XQ [M, Kp] int8, xs [M, G] block scales, xsum [M, G] block sums of the
// rounded x (for the int4 mins). Kept per thread and only grown, so a decode step allocates nothing.
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> s, sum;
  std::vector<int32_t> half;  // [rows, 2G]: sums of the rounded q over each 16 inputs (int6's -32 offset)
};
Acts& acts() {
  thread_local Acts a;
  return a;
}

#ifdef AGENTRT_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
#endif

// x [n <= 32] -> q [32] int8 (zero-padded), returns the block scale s; *sum = s * sum(q), the block sum
// of the rounded x: the int4 mins then multiply the same rounded activations as the nibbles, so the
// product is exactly w . x_rounded (its error sum w * dx beats the exact sum's sum (w - m) * dx).
inline float quantize_block(const float* x, int64_t n, int8_t* q, float* sum) {
#ifdef AGENTRT_AVX2
  if (n == 32) {
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
                 v3 = _mm256_loadu_ps(x + 24);
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // round to nearest (even), |value| <= 127, then pack 32 int32 -> 32 int8 in order
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    *sum = float(hsum_i32(isum)) * (amax / 127.f);
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return amax / 127.f;
  }
#endif
  float amax = 0.f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t isum = 0;
  for (int64_t j = 0; j < 32; ++j) isum += q[j] = j < n ? int8_t(std::nearbyint(x[j] * inv)) : 0;
  *sum = float(isum) * (amax / 127.f);
  return amax / 127.f;
}

// Rows of X -> a's activation rows: one int8 row per row of X, or with `split` two (2m: x rounded to the
// block step s, 2m + 1: what that left, rounded to s / 254), an int16-like precision from the same kernels.
void quantize_rows(const float* X, int64_t M, int64_t K, bool split, Acts& a) {
  const int64_t Kp = pad32(K), G = Kp / 32, V = split ? 2 : 1;
  if (int64_t(a.q.size()) < V * M * Kp) a.q.resize(V * M * Kp);
  if (int64_t(a.s.size()) < V * M * G) a.s.resize(V * M * G), a.sum.resize(V * M * G), a.half.resize(2 * V * M * G);
  auto halves = [&](const int8_t* q, int64_t v, int64_t g) {
    int32_t h0 = 0, h1 = 0;
    for (int j = 0; j < 16; ++j) h0 += q[j], h1 += q[16 + j];
    a.half[(v * G + g) * 2] = h0, a.half[(v * G + g) * 2 + 1] = h1;
  };
  auto rows = [&](int64_t m0, int64_t m1) {
    float r[32];
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const float* x = X + m * K + g * 32;
        const int64_t n = std::min<int64_t>(32, K - g * 32), v = V * m;
        int8_t* q = a.q.data() + v * Kp + g * 32;
        const float s = a.s[v * G + g] = quantize_block(x, n, q, &a.sum[v * G + g]);
        halves(q, v, g);
        if (!split) continue;
        for (int64_t j = 0; j < 32; ++j) r[j] = j < n ? x[j] - s * float(q[j]) : 0.f;  // |r| <= s / 2
        int8_t* q2 = q + Kp;
        const float inv = s > 0.f ? 254.f / s : 0.f;
        int32_t isum = 0;
        for (int64_t j = 0; j < 32; ++j)
          isum += q2[j] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(r[j] * inv))));
        a.s[(v + 1) * G + g] = s / 254.f;
        a.sum[(v + 1) * G + g] = float(isum) * (s / 254.f);
        halves(q2, v + 1, g);
      }
  };
  if (M * K < (1 << 16)) rows(0, M);  // a decode batch: cheaper than waking the pool
  else agentrt::parallel_for(0, M, 16, rows);
}

#ifdef AGENTRT_AVX2
// u8 x s8 dot products of 4 bytes into 8 lanes. AVX2: maddubs makes int16 pair sums, which a group
// adds up in int16 (int4: <= 30480) before `widen` makes them int32 (int8: `dot4_i32` widens each step).
// VNNI: vpdpbusd adds the 4-byte sums straight into int32 lanes: the same sums, fewer instructions.
#ifdef AGENTRT_VNNI
inline __m256i dot_first(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
inline __m256i widen(__m256i acc) { return acc; }
inline __m256i dot4_i32(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#else
inline __m256i dot_first(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
inline __m256i widen(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
inline __m256i dot4_i32(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif
#endif

// The weights' kind (kernels.h's `Lin`): int8, int4 (d * q + m), int5 (Q5_K: d * q + m, a plane of high bits),
// int6 (Q6_K: d_h * (q - 32) per 16 inputs)
enum class Bits { k8, k4, k5, k6 };
// Bytes a group of a block takes: the nibbles' 128, then int5's plane of high bits (32) or int6's two (64).
constexpr int64_t group_bytes(Bits kB) { return kB == Bits::k5 ? 160 : kB == Bits::k6 ? 192 : 128; }

// How a block's group scales are stored: float32 / float16 per group, Q4_K or Q6_K super-block records.
// int6 keeps its two half-group scales where int4 keeps d and m.
enum class Scales { kFloat, kHalf, kSuper, kSix };

// Column c's d (or, with `min`, m) of group g in a block of nb columns whose scales are d (and mn), stored as
// `kind`; for kSix the scale of the group's first (second) 16 inputs.
inline float scale_at(Scales kind, const void* d, const void* mn, int64_t nb, int64_t g, int64_t c, bool min) {
  if (kind == Scales::kFloat || kind == Scales::kHalf) {
    const void* p = min ? mn : d;
    const int64_t i = g * nb + c;
    return kind == Scales::kHalf ? float(static_cast<const at::Half*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  const uint8_t* s = static_cast<const uint8_t*>(d);
  if (kind == Scales::kSix) {
    const uint8_t* r = s + (g / 8) * kSixRecord * nb;
    return float(reinterpret_cast<const at::Half*>(r)[c]) * float(int8_t(r[(2 + (g % 8) * 2 + min) * nb + c]));
  }
  const uint8_t* r = s + (g / 8) * kSuperRecord * nb;
  const float D = float(reinterpret_cast<const at::Half*>(r)[(min ? nb : 0) + c]);
  const float q = float(r[(min ? 12 : 4) * nb + (g % 8) * nb + c]);
  return min ? -(D * q) : D * q;
}

// The column block of 8 outputs as the tile kernels read it (see kernels.h's `Lin` for the order).
struct Block {
  const uint8_t* w;   // int4: [G][4][8][4] bytes; int6: [G][6][8][4]; int8: [G][8][8][4]
  const void* d;      // [G][8] float16 or float32; kSuper / kSix: [G / 8] records of 20 (18) * 8 bytes
  const void* mn;     // [G][8] (int4, int6), as d; kSuper / kSix: unused
  Scales kind;

  bool records() const { return kind == Scales::kSuper || kind == Scales::kSix; }

  float d1(int64_t g, int64_t c) const { return scale_at(kind, d, mn, 8, g, c, false); }  // column c's d of group g
  float m1(int64_t g, int64_t c) const { return scale_at(kind, d, mn, 8, g, c, true); }
#ifdef AGENTRT_AVX2
  __m256 d8(int64_t g) const { return eight(d, g, false); }  // group g's d (m) of the block's 8 columns
  __m256 m8(int64_t g) const { return eight(mn, g, true); }
  __m256 eight(const void* p, int64_t g, bool min) const {
    if (kind == Scales::kSix) {  // D * sc of the first (second) 16 inputs
      const uint8_t* r = static_cast<const uint8_t*>(d) + (g >> 3) * kSixRecord * 8;
      const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + 16 + ((g & 7) * 2 + min) * 8));
      return _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
    }
    if (kind == Scales::kSuper) {  // D * sc, -(Dm * mn): the float32 products super_scale makes
      const uint8_t* r = static_cast<const uint8_t*>(d) + (g >> 3) * kSuperRecord * 8;
      const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + (min ? 16 : 0))));
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + (min ? 96 : 32) + (g & 7) * 8));
      const __m256 v = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8)));
      return min ? _mm256_xor_ps(v, _mm256_set1_ps(-0.f)) : v;
    }
    return kind == Scales::kHalf
               ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const at::Half*>(p) + g * 8)))
               : _mm256_loadu_ps(static_cast<const float*>(p) + g * 8);
  }
#endif
};

#ifdef AGENTRT_AVX2
inline __m256i bcast4(const int8_t* p) {  // 4 activation bytes to all 8 lanes
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Step i of block w's group g as bytes (inputs 4i..4i+3 of 8 columns; steps 0..3 are the low nibbles,
// 4..7 the high ones): from the stored nibbles ([G][4][32] bytes; int5: then [32] bytes of the high bit, step
// i's at bit i; int6: then [2][32] bytes of the high two bits, step i's at bits 2 (i % 4) of plane i / 4) or
// from `unpack`'s copy ([G][8][32], kUnpacked), which saves the unpacking of every step for every row tile
// after the first.
template <bool kUnpacked, Bits kB>
inline __m256i step_q(const uint8_t* w, int64_t g, int i, __m256i low) {
  if (kUnpacked) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 256 + i * 32));
  const uint8_t* grp = w + g * group_bytes(kB);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + (i & 3) * 32));
  const __m256i q = _mm256_and_si256(i < 4 ? v : _mm256_srli_epi16(v, 4), low);
  if (kB == Bits::k4) return q;
  if (kB == Bits::k5) {  // bit i of each byte -> bit 4 (16-bit shifts: the mask drops what crosses)
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + 128));
    const __m256i h = i == 0 ? _mm256_slli_epi16(p, 4) : i == 1 ? _mm256_slli_epi16(p, 3)
                    : i == 2 ? _mm256_slli_epi16(p, 2) : i == 3 ? _mm256_slli_epi16(p, 1) : i == 4 ? p
                    : i == 5 ? _mm256_srli_epi16(p, 1) : i == 6 ? _mm256_srli_epi16(p, 2) : _mm256_srli_epi16(p, 3);
    return _mm256_or_si256(q, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
  }
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + 128 + (i >> 2) * 32));
  const int j = i & 3;  // bits 2j, 2j + 1 of each byte -> bits 4, 5 (16-bit shifts: the mask drops what crosses)
  const __m256i h = j == 0 ? _mm256_slli_epi16(p, 4) : j == 1 ? _mm256_slli_epi16(p, 2) : j == 2 ? p : _mm256_srli_epi16(p, 2);
  return _mm256_or_si256(q, _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
}

// One 4-byte product step into an accumulator; int5 and int6 widen every step (their pair sums of up to
// 2 * 63 * 127 would overflow int16 over four steps on AVX2), int4 adds a group's eight in int16 (`widen` at
// its end).
template <bool kWide>
inline __m256i dot_step(__m256i acc, __m256i u, __m256i x, bool first) {
  if (kWide) return dot4_i32(first ? _mm256_setzero_si256() : acc, u, x);
  return first ? dot_first(u, x) : dot_add(acc, u, x);
}

// out[r * NB + j] [8 columns of block j] = sum over groups of block j's int4 (int5, int6) dot with activation
// row r (of MR rows). NB = 2 blocks (16 columns) share each activation broadcast: fewer non-maddubs ops a product.
template <int MR, int NB, bool kUnpacked, Bits kB>
inline void tile_q(const Block* b, const int8_t* xq, const float* xs, const float* xsum, const int32_t* xhalf,
                   int64_t Kp, int64_t G, __m256* out) {
  constexpr bool kSix = kB == Bits::k6;       // two half-group scales and the -32 offset
  constexpr bool kPlanes = kB != Bits::k4;    // int5 and int6: the high bits in planes, wide steps
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256 acc[MR * NB];  // locals, not `out`: a __m256 pointer may alias anything, so each update would be stored
  for (int r = 0; r < MR * NB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* x = xq + g * 32;
    __m256i s16[MR * NB], h16[MR * NB];  // int6 sums its two halves apart (each has its scale); int4 all in s16
    for (int i = 0; i < 4; ++i) {  // the low nibbles' steps for all rows, then the high ones'
      __m256i lo[NB];
      for (int j = 0; j < NB; ++j) lo[j] = step_q<kUnpacked, kB>(b[j].w, g, i, low);
      for (int r = 0; r < MR; ++r) {
        const __m256i xa = bcast4(x + r * Kp + i * 4);
        for (int j = 0; j < NB; ++j) s16[r * NB + j] = dot_step<kPlanes>(s16[r * NB + j], lo[j], xa, i == 0);
      }
    }
    for (int i = 4; i < 8; ++i) {
      __m256i hi[NB];
      for (int j = 0; j < NB; ++j) hi[j] = step_q<kUnpacked, kB>(b[j].w, g, i, low);
      for (int r = 0; r < MR; ++r) {
        const __m256i xb = bcast4(x + r * Kp + i * 4);
        for (int j = 0; j < NB; ++j) {
          __m256i& t = kSix ? h16[r * NB + j] : s16[r * NB + j];
          t = dot_step<kPlanes>(t, hi[j], xb, kSix && i == 4);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m256 d = b[j].d8(g), mn = b[j].m8(g);
      for (int r = 0; r < MR; ++r) {
        __m256& c = acc[r * NB + j];
        const __m256 sx = _mm256_set1_ps(xs[r * G + g]);
        if (kSix) {  // w = d_h * (q - 32) per half h: d_h * sx * (q . xq - 32 sum(xq))
          const int32_t* hs = xhalf + (r * G + g) * 2;
          const __m256i t0 = _mm256_sub_epi32(s16[r * NB + j], _mm256_set1_epi32(32 * hs[0]));
          const __m256i t1 = _mm256_sub_epi32(h16[r * NB + j], _mm256_set1_epi32(32 * hs[1]));
          c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_mul_ps(d, sx), c);
          c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_mul_ps(mn, sx), c);
        } else {  // w = d * q + m: d * sx * (q . xq) + m * sx * sum(xq); int5's sums are int32 already
          const __m256i dot = kPlanes ? s16[r * NB + j] : widen(s16[r * NB + j]);
          c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, sx), c);
          c = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsum[r * G + g]), c);
        }
      }
    }
  }
  for (int r = 0; r < MR * NB; ++r) out[r] = acc[r];
}

// The nblk int4 (int5, int6) blocks of b as `step_q` reads them unpacked, in u ([nblk][G][8][32] bytes),
// super-block scales as float32 per group (in f): the row tiles then share the products too.
template <Bits kB>
inline void unpack(Block* b, int nblk, int64_t G, std::vector<uint8_t>& u, std::vector<float>& f) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  u.resize(nblk * G * 256);
  f.resize(nblk * G * 16);
  for (int j = 0; j < nblk; ++j) {
    uint8_t* o = u.data() + j * G * 256;
    for (int64_t g = 0; g < G; ++g)
      for (int i = 0; i < 8; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g * 256 + i * 32), step_q<false, kB>(b[j].w, g, i, low));
    b[j].w = o;
    if (!b[j].records()) continue;
    float* d = f.data() + j * G * 16;
    for (int64_t g = 0; g < G; ++g) {
      _mm256_storeu_ps(d + g * 8, b[j].d8(g));
      _mm256_storeu_ps(d + (G + g) * 8, b[j].m8(g));
    }
    b[j] = {o, d, d + G * 8, Scales::kFloat};
  }
}

template <int MR>
inline void tile_q8(const Block& b, const int8_t* xq, const float* xs, const float*, int64_t Kp, int64_t G, __m256* acc) {
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* w = b.w + g * 256;
    const int8_t* x = xq + g * 32;
    __m256i s32[MR];
    for (int r = 0; r < MR; ++r) s32[r] = _mm256_setzero_si256();
    for (int i = 0; i < 8; ++i) {  // inputs 4i..4i+3 of 8 columns
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * 32));
      const __m256i av = _mm256_abs_epi8(v);
      for (int r = 0; r < MR; ++r) s32[r] = dot4_i32(s32[r], av, _mm256_sign_epi8(bcast4(x + r * Kp + i * 4), v));
    }
    const __m256 d = b.d8(g);
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r]), _mm256_mul_ps(d, _mm256_set1_ps(xs[r * G + g])), acc[r]);
  }
}

// Y rows m0.. (mr of them), columns n0..n0+nb: (+)= acc + bias.
inline void store(const __m256* acc, int mr, int64_t nb, const float* bias, float* Y, int64_t ldy, bool accumulate) {
  alignas(32) float t[kNR];
  for (int r = 0; r < mr; ++r) {
    float* y = Y + r * ldy;
    if (nb == kNR) {
      __m256 v = acc[r];
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
      if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(y));
      _mm256_storeu_ps(y, v);
    } else {
      _mm256_store_ps(t, acc[r]);
      for (int64_t c = 0; c < nb; ++c) {
        const float v = t[c] + (bias ? bias[c] : 0.f);
        y[c] = accumulate ? y[c] + v : v;
      }
    }
  }
}

// One tile: the row count and the kind are template arguments so the accumulators stay in registers.
template <Bits kB, int MR>
inline void tile(const Block* b, int NB, bool unpacked, const int8_t* xq, const float* xs, const float* xsum,
                 const int32_t* xhalf, int64_t Kp, int64_t G, __m256* acc) {
  if constexpr (kB == Bits::k8) tile_q8<MR>(*b, xq, xs, xsum, Kp, G, acc);
  else if (NB == 2) unpacked ? tile_q<MR, 2, true, kB>(b, xq, xs, xsum, xhalf, Kp, G, acc)
                             : tile_q<MR, 2, false, kB>(b, xq, xs, xsum, xhalf, Kp, G, acc);
  else unpacked ? tile_q<MR, 1, true, kB>(b, xq, xs, xsum, xhalf, Kp, G, acc)
                : tile_q<MR, 1, false, kB>(b, xq, xs, xsum, xhalf, Kp, G, acc);
}

// Activation rows v0..v1 (of a) times columns n0.. (nblk blocks of 8, the last one nb wide) through the
// tile kernels; with `split` activation rows 2m, 2m + 1 add up into output row m. Y: output row v0 / V.
template <Bits kB>
void tiles(const Block* b, int nblk, int64_t nb, const Acts& a, bool split, int64_t v0, int64_t v1, int64_t Kp,
           int64_t G, const float* bias, float* Y, int64_t ldy, bool accumulate) {
  __m256 acc[2 * kMR], part[kMR];
  const int V = split ? 2 : 1;
  Block bu[2] = {b[0], nblk > 1 ? b[1] : b[0]};
  constexpr bool nibbles = kB != Bits::k8;
  const bool unpacked = nibbles && v1 - v0 > 2 * kMR;  // three row tiles or more read the blocks: worth a copy
  if (unpacked) {
    thread_local std::vector<uint8_t> u;
    thread_local std::vector<float> f;
    unpack<kB>(bu, nblk, G, u, f);
    b = bu;
  }
  for (int64_t v = v0; v < v1; v += kMR) {
    const int mr = int(std::min(kMR, v1 - v));
    const int8_t* xq = a.q.data() + v * Kp;
    const float *xs = a.s.data() + v * G, *xsum = a.sum.data() + v * G;
    const int32_t* xhalf = a.half.data() + v * G * 2;
    const int NB = nibbles && nblk == 2 && v1 - v0 > kMR ? 2 : 1;
    for (int j0 = 0; j0 < nblk; j0 += NB) {
      switch (mr) {
        case 4: tile<kB, 4>(b + j0, NB, unpacked, xq, xs, xsum, xhalf, Kp, G, acc); break;
        case 3: tile<kB, 3>(b + j0, NB, unpacked, xq, xs, xsum, xhalf, Kp, G, acc); break;
        case 2: tile<kB, 2>(b + j0, NB, unpacked, xq, xs, xsum, xhalf, Kp, G, acc); break;
        default: tile<kB, 1>(b + j0, NB, unpacked, xq, xs, xsum, xhalf, Kp, G, acc); break;
      }
      for (int j = 0; j < NB; ++j) {
        const int64_t jb = j0 + j, width = jb + 1 < nblk ? kNR : nb;
        for (int r = 0; r < mr / V; ++r)
          part[r] = split ? _mm256_add_ps(acc[2 * r * NB + j], acc[(2 * r + 1) * NB + j]) : acc[r * NB + j];
        store(part, mr / V, width, bias ? bias + jb * kNR : nullptr, Y + (v - v0) / V * ldy + jb * kNR, ldy, accumulate);
      }
    }
  }
}
#else
// Portable fallback on the same layouts and the same integer products (slow, but exact alike).
template <Bits kB>
void tiles1(const Block& b, int64_t nb, const Acts& a, int V, int64_t v0, int64_t v1, int64_t Kp, int64_t G,
            const float* bias, float* Y, int64_t ldy, bool accumulate) {
  for (int64_t m = v0; m < v1; ++m) {  // activation row m adds into output row (m - v0) / V
    const int8_t* x = a.q.data() + m * Kp;
    for (int64_t c = 0; c < nb; ++c) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot[2] = {0, 0};  // inputs 0..15, 16..31
        for (int64_t j = 0; j < 32; ++j) {
          const int64_t i = j / 4, r = j % 4;  // input j of the group is step i, byte r
          int32_t q;
          if constexpr (kB == Bits::k8) {
            q = int8_t(b.w[g * 256 + (i * kNR + c) * 4 + r]);
          } else {
            const uint8_t* grp = b.w + g * group_bytes(kB);
            const uint8_t byte = grp[((i % 4) * kNR + c) * 4 + r];
            q = i < 4 ? (byte & 15) : (byte >> 4);
            if constexpr (kB == Bits::k5) q |= (grp[128 + c * 4 + r] >> i & 1) << 4;
            if constexpr (kB == Bits::k6) q = (q | ((grp[128 + ((i / 4) * kNR + c) * 4 + r] >> (2 * (i % 4)) & 3) << 4)) - 32;
          }
          dot[j / 16] += q * int32_t(x[g * 32 + j]);
        }
        if constexpr (kB == Bits::k6) {
          acc += float(dot[0]) * (b.d1(g, c) * a.s[m * G + g]);
          acc += float(dot[1]) * (b.m1(g, c) * a.s[m * G + g]);
          continue;
        }
        acc += float(dot[0] + dot[1]) * (b.d1(g, c) * a.s[m * G + g]);
        if constexpr (kB == Bits::k4 || kB == Bits::k5) acc += b.m1(g, c) * a.sum[m * G + g];
      }
      float& y = Y[(m - v0) / V * ldy + c];
      const bool first = (m - v0) % V == 0;  // the row's first part: bias, and replace unless accumulating
      const float val = acc + (first && bias ? bias[c] : 0.f);
      y = accumulate || !first ? y + val : val;
    }
  }
}

template <Bits kB>
void tiles(const Block* b, int nblk, int64_t nb, const Acts& a, bool split, int64_t v0, int64_t v1, int64_t Kp,
           int64_t G, const float* bias, float* Y, int64_t ldy, bool accumulate) {
  for (int j = 0; j < nblk; ++j)
    tiles1<kB>(b[j], j + 1 < nblk ? kNR : nb, a, split ? 2 : 1, v0, v1, Kp, G, bias ? bias + j * kNR : nullptr,
                Y + j * kNR, ldy, accumulate);
}
#endif

// The last column block when N % 8 != 0, widened to 8 columns (zeros, float32 scales) so the tile kernels
// read it alike.
struct TailBlock {
  std::vector<uint8_t> w;
  std::vector<float> d, mn;
  Block widen(const Block& src, int64_t nt, int64_t G, Bits bits) {
    const int64_t steps = bits == Bits::k8 ? 8 : group_bytes(bits) / 32;  // chunks of 4 inputs x 8 columns
    w.assign(G * steps * kNR * 4, 0);
    d.assign(G * kNR, 0.f);
    mn.assign(G * kNR, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < steps; ++i)
        std::memcpy(&w[(g * steps + i) * kNR * 4], src.w + (g * steps + i) * nt * 4, nt * 4);
      for (int64_t c = 0; c < nt; ++c) {
        d[g * kNR + c] = scale_at(src.kind, src.d, src.mn, nt, g, c, false);
        if (bits != Bits::k8) mn[g * kNR + c] = scale_at(src.kind, src.d, src.mn, nt, g, c, true);
      }
    }
    return {w.data(), d.data(), mn.data(), Scales::kFloat};
  }
};

template <Bits kB>
void run(const Lin& l, const Acts& a, bool split, float* Y, int64_t ldy, int64_t M, int64_t K, bool accumulate) {
  const int64_t N = l.w.size(0), Kp = pad32(K), G = Kp / 32;
  const int64_t row_bytes = kB == Bits::k8 ? Kp : Kp / 32 * group_bytes(kB) / 8;
  const uint8_t* w = static_cast<const uint8_t*>(l.w.data_ptr());
  const Scales kind = l.int6() ? Scales::kSix : l.super_scales() ? Scales::kSuper
                    : l.half_scales() ? Scales::kHalf : Scales::kFloat;
  // bytes of s (and z) a column takes
  const int64_t scale_bytes = kind == Scales::kSix ? G / 8 * kSixRecord : kind == Scales::kSuper ? G / 8 * kSuperRecord
                            : G * (kind == Scales::kHalf ? 2 : 4);
  const char* d = static_cast<const char*>(l.s.data_ptr());
  const char* mn = kB == Bits::k4 && kind != Scales::kSuper ? static_cast<const char*>(l.z.data_ptr()) : nullptr;
  const float* bias = l.b.defined() && l.b.numel() ? l.b.data_ptr<float>() : nullptr;
  const int64_t blocks = (N + kNR - 1) / kNR, pairs = (blocks + 1) / 2;
  // a task of at least ~64K multiply-adds, so tiny linears do not wake the pool
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (M * Kp * 2 * kNR));
  agentrt::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) {  // pairs of column blocks (16 columns)
    TailBlock tail;
    const int64_t V = split ? 2 : 1, MV = M * V;  // activation rows
    for (int64_t v0 = 0; v0 < MV; v0 += kMChunk) {
      const int64_t v1 = std::min(MV, v0 + kMChunk);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * 2 * kNR, nblk = std::min<int64_t>(2, blocks - 2 * p);
        const int64_t nb = std::min(kNR, N - n0 - (nblk - 1) * kNR);  // columns of the pair's last block
        Block blk[2];
        for (int64_t j = 0; j < nblk; ++j) {
          const int64_t c0 = n0 + j * kNR;
          blk[j] = {w + c0 * row_bytes, d + c0 * scale_bytes, mn ? mn + c0 * scale_bytes : nullptr, kind};
        }
        if (nb < kNR) blk[nblk - 1] = tail.widen(blk[nblk - 1], nb, G, kB);
        tiles<kB>(blk, int(nblk), nb, a, split, v0, v1, Kp, G, bias ? bias + n0 : nullptr, Y + v0 / V * ldy + n0, ldy,
                   accumulate);
      }
    }
  });
}

}  // namespace

void check_lin(const Lin& l, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(l.w.is_contiguous() && l.w.dim() == 2 && l.w.size(0) == N, what, ": weight must be contiguous [N, *]");
  TORCH_CHECK(!l.b.defined() || l.b.numel() == 0 ||
              (l.b.scalar_type() == at::kFloat && l.b.is_contiguous() && l.b.numel() == N), what,
              ": bias must be float32 [N]");
  if (l.int6()) {
    TORCH_CHECK(l.w.scalar_type() == at::kByte && K % 256 == 0 && l.w.size(1) == K / 4 * 3 && l.s.is_contiguous() &&
                l.s.numel() == N * K / 256 * kSixRecord && l.z.numel() == 0, what,
                ": int6 (Q6_K) needs K % 256 == 0, packed uint8 [N, 3K/4], records int8 [N, ", kSixRecord,
                " K/256] in kernel order and no mins");
    return;
  }
  if (l.super_scales() && l.w.scalar_type() == at::kByte && l.w.size(1) == K / 8 * 5) {  // int5 by its weights' size
    TORCH_CHECK(K % 256 == 0 && l.int5() && l.s.is_contiguous() &&
                l.s.numel() == N * K / 256 * kSuperRecord && l.z.numel() == 0, what,
                ": int5 (Q5_K) needs K % 256 == 0, packed uint8 [N, 5K/8], super-block records uint8 [N, ",
                kSuperRecord, " K/256] in kernel order and no separate mins");
    return;
  }
  const bool q4 = l.int4();
  TORCH_CHECK(q4 || l.w.scalar_type() == at::kChar, what, ": weight must be int8 or packed int4 (uint8)");
  TORCH_CHECK(!q4 || K % 32 == 0, what, ": int4 groups need K a multiple of 32");
  TORCH_CHECK(l.w.size(1) == (q4 ? K / 2 : pad32(K)), what, ": weight must be [N, ", q4 ? "K/2" : "K rounded up to 32",
              "] for K=", K);
  const int64_t G = pad32(K) / 32;
  if (l.super_scales()) {
    TORCH_CHECK(q4 && K % 256 == 0 && l.s.is_contiguous() && l.s.numel() == N * K / 256 * kSuperRecord &&
                l.z.numel() == 0, what, ": super-block scales need int4 weights, K % 256 == 0, s uint8 [N, ",
                kSuperRecord, " K/256] in kernel order and no separate mins");
    return;
  }
  TORCH_CHECK((l.s.scalar_type() == at::kFloat || l.s.scalar_type() == at::kHalf) && l.s.is_contiguous() &&
              l.s.numel() == N * G, what, ": group scales must be float32 or float16 [N, ceil(K/32)] in kernel order");
  TORCH_CHECK(!q4 || (l.z.scalar_type() == l.s.scalar_type() && l.z.is_contiguous() && l.z.numel() == N * G), what,
              ": int4 groups need mins [N, K/32] in kernel order, of the scales' dtype");
}

// Y [M, N] (+)= X [M, K] @ W.T + bias for any kind of linear, Y's rows ldy floats apart.
void linear(const Lin& l, const float* X, float* Y, int64_t M, int64_t K, bool accumulate, bool int16, int64_t ldy) {
  if (M <= 0) return;
  Acts& a = acts();
  quantize_rows(X, M, K, int16, a);
  if (l.int5()) run<Bits::k5>(l, a, int16, Y, ldy, M, K, accumulate);
  else if (l.int4()) run<Bits::k4>(l, a, int16, Y, ldy, M, K, accumulate);
  else if (l.int6()) run<Bits::k6>(l, a, int16, Y, ldy, M, K, accumulate);
  else run<Bits::k8>(l, a, int16, Y, ldy, M, K, accumulate);
}

// x [M, K] float32 -> [M, N] float32 through either kind of `Lin` (w, s, z, bias; see there).
at::Tensor linear_op(at::Tensor x, at::Tensor w, at::Tensor s, at::Tensor z, at::Tensor bias, bool int16) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "linear: x must be float32 [M, K]");
  const Lin l{w, s, z, bias};
  check_lin(l, w.size(0), x.size(1), "linear");
  x = x.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear(l, x.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), false, int16, w.size(0));
  return y;
}

}  // namespace agentrt
