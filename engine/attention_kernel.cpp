// Causal attention over a paged KV cache (see kernels.h's `attention` for the layout).
//
// AVX2 path, two kernels, both reading K/V rows straight from their pages (no gather copy) and both
// sharing each K/V row among the `group` query heads of its kv head (GQA), so a row is read once per
// tile instead of once per head:
//  - tiled (sequences with >= 2 query rows, i.e. prefill chunks): flash attention. A task is a run of
//    query vectors (query row x head of one kv head) cut into columns of 24; per key block, a column
//    computes s^T = K q^T [keys, 24] (vectorized over the 24 query vectors, so the online-softmax max,
//    sum and rescale are plain vector ops with no horizontal reductions), masks the causal diagonal,
//    takes exp2 (q is prescaled by log2(e) / sqrt(hd)) and accumulates o^T [hd, 24] += V^T p^T, both
//    products in register tiles of 4 keys (dims) x 24 vectors that keep the two FMA pipes busy.
//    Each column stops at its own last visible key, so only the causal triangle (to within a few keys)
//    is computed.
//  - decode (1 query row): scores 8 keys at a time (K rows transposed, shared by the kv head's query
//    heads), then the softmax and p.V per 32-dim slice of the output, with the tiled kernel's arithmetic
//    per query vector exactly, so a row's numbers do not depend on the kernel that computes it.
// Without AVX2 a plain loop (one (row, head) at a time) is compiled instead.
// The cache holds float32 or float16 (`KV`): float16 rows are widened to float32 as they are read (the
// tiled kernel a key block at a time into scratch, decode 8 values a load), so every product and sum is
// float32 either way, and the two kernels still agree bit for bit.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

namespace agentrt {

#ifdef AGENTRT_AVX2
namespace {

// A tiled task's columns are W ymm wide (8 W query vectors, "lanes"): 3, or 1 or 2 when the task has
// no more vectors than that (a short chunk: a decoded token with its draft, a few forced tokens), so
// no lanes are spent on padding. A lane's arithmetic is the same whatever W is.
constexpr int kMaxW = 3;
constexpr int64_t kMaxLanes = 8 * kMaxW;
constexpr int kRqk = 4;              // keys per q.K tile (W * kRqk accumulators)
constexpr int kRpv = 4;              // dims per p.V tile (W * kRpv accumulators)
constexpr int64_t kCols = 4;         // columns per tiled task
constexpr int64_t kKeyBlock = 64;    // keys per block (tiled); their K and V rows stay in L1 across the columns
constexpr double kSerialWork = 3000;  // below this many (key, head) pairs a call runs on one thread (~20 us)
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0: x = n + f with |f| <= 0.5, 2^f by a degree-5 polynomial fitted for relative error on
// [-0.5, 0.5] (2.3e-7 max in float32 arithmetic), 2^n put in the exponent. x below -125 (masked keys:
// -inf) gives about 2^-125, which next to the row max's 1 is nothing (it leaves every sum unchanged).
inline __m256 exp2_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-125.f));
  const __m256 magic = _mm256_set1_ps(12582912.f);  // 1.5 * 2^23: x + magic holds round(x) in its low bits
  const __m256 t = _mm256_add_ps(x, magic);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
  __m256 p = _mm256_set1_ps(0.0013266970636323094f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.009675459936261177f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.05550742521882057f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022121727466583f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931469440460205f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001192092896f));
  // round(x) << 23 added to the exponent field (two's complement wraps right for negative n)
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}

inline float exp2_neg1(float x) {
  return _mm256_cvtss_f32(exp2_neg(_mm256_set1_ps(x)));
}

// ---- tiled (prefill) kernel ----

// s: [R, lanes] = K rows kp[0..R) (each hd floats) times qt: [hd, lanes]
template <int W, int R>
inline void qk_tile(const float* const* kp, const float* qt, int64_t hd, float* s, __m256* mx) {
  constexpr int64_t kLanes = 8 * W;
  __m256 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_setzero_ps();
  const float* k[R];
  for (int r = 0; r < R; ++r) k[r] = kp[r];
  for (int64_t d = 0; d < hd; ++d) {
    __m256 qv[W];
    for (int w = 0; w < W; ++w) qv[w] = _mm256_loadu_ps(qt + d * kLanes + 8 * w);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(k[r] + d);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(b, qv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) {
      _mm256_storeu_ps(s + r * kLanes + 8 * w, acc[r][w]);
      mx[w] = _mm256_max_ps(mx[w], acc[r][w]);
    }
}

// ot: [R, lanes] (dims d0 .. d0 + R of o^T) = alpha * ot + sum over n keys of V[key][d0 + r] * p[key]
//   vp[key]: the key's V row; p: [n, lanes]
template <int W, int R>
inline void pv_tile(const float* const* vp, int64_t n, const float* p, int64_t d0, float* ot, const __m256* al) {
  constexpr int64_t kLanes = 8 * W;
  __m256 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_mul_ps(_mm256_loadu_ps(ot + r * kLanes + 8 * w), al[w]);
  for (int64_t j = 0; j < n; ++j) {
    __m256 pv[W];
    for (int w = 0; w < W; ++w) pv[w] = _mm256_loadu_ps(p + j * kLanes + 8 * w);
    const float* v = vp[j] + d0;
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(v + r);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(b, pv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(ot + r * kLanes + 8 * w, acc[r][w]);
}

// `f.template operator()<R>()` for R = rem in 1 .. 7 (tile tails; query heads at a time in decode)
template <class F>
inline void with_tail(int64_t rem, F&& f) {
  switch (rem) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: break;
  }
}

// In place: row r of m[0..8) becomes column r.
inline void transpose8(__m256* m) {
  const __m256 t0 = _mm256_unpacklo_ps(m[0], m[1]), t1 = _mm256_unpackhi_ps(m[0], m[1]);
  const __m256 t2 = _mm256_unpacklo_ps(m[2], m[3]), t3 = _mm256_unpackhi_ps(m[2], m[3]);
  const __m256 t4 = _mm256_unpacklo_ps(m[4], m[5]), t5 = _mm256_unpackhi_ps(m[4], m[5]);
  const __m256 t6 = _mm256_unpacklo_ps(m[6], m[7]), t7 = _mm256_unpackhi_ps(m[6], m[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  m[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  m[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  m[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  m[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  m[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  m[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  m[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  m[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// qt: [hd, lanes] = scale * src[lane][d]
template <int W>
inline void transpose_in(const float* const* src, int64_t hd, float scale, float* qt) {
  constexpr int64_t kLanes = 8 * W;
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t l0 = 0; l0 < kLanes; l0 += 8) {
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8) {
      __m256 m[8];
      for (int r = 0; r < 8; ++r) m[r] = _mm256_loadu_ps(src[l0 + r] + d);
      transpose8(m);
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(qt + (d + r) * kLanes + l0, _mm256_mul_ps(m[r], sv));
    }
    for (; d < hd; ++d)
      for (int r = 0; r < 8; ++r) qt[d * kLanes + l0 + r] = src[l0 + r][d] * scale;
  }
}

// dst[lane][d] = ot[d][lane] * inv[lane]
template <int W>
inline void transpose_out(const float* ot, int64_t hd, const float* inv, float* const* dst) {
  constexpr int64_t kLanes = 8 * W;
  for (int64_t l0 = 0; l0 < kLanes; l0 += 8) {
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8) {
      __m256 m[8];
      for (int r = 0; r < 8; ++r) m[r] = _mm256_loadu_ps(ot + (d + r) * kLanes + l0);
      transpose8(m);
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(dst[l0 + r] + d, _mm256_mul_ps(m[r], _mm256_set1_ps(inv[l0 + r])));
    }
    for (; d < hd; ++d)
      for (int r = 0; r < 8; ++r) dst[l0 + r][d] = ot[d * kLanes + l0 + r] * inv[l0 + r];
  }
}

// One column of a tiled task: its query vectors' state across key blocks.
struct Column {
  float* qt;        // [hd, lanes] prescaled queries
  float* ot;        // [hd, lanes] unnormalized output
  float m[kMaxLanes];  // running max (log2 units)
  float l[kMaxLanes];  // running sum
  int32_t lim[kMaxLanes];  // last visible key of each lane
  int64_t lo, hi;   // smallest and largest lim
};

// One key block [k0, k0 + n) for a column (n already cut at the column's last visible key).
template <int W>
void column_block(Column& c, const float* const* kp, const float* const* vp, int64_t k0, int64_t n, int64_t hd,
                  float* s /* [n, lanes] scratch */) {
  constexpr int64_t kLanes = 8 * W;
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 mx[W], nm[W], al[W], sum[W];
  for (int w = 0; w < W; ++w) mx[w] = ninf;
  int64_t j = 0;
  for (; j + kRqk <= n; j += kRqk) qk_tile<W, kRqk>(kp + j, c.qt, hd, s + j * kLanes, mx);
  with_tail(n - j, [&]<int R>() { qk_tile<W, R>(kp + j, c.qt, hd, s + j * kLanes, mx); });
  const bool masked = k0 + n - 1 > c.lo;
  if (masked) {  // the block crosses some lane's last key: mask key > lim, max again
    __m256i lim[W];
    for (int w = 0; w < W; ++w) {
      lim[w] = _mm256_loadu_si256((const __m256i*)(c.lim + 8 * w));
      mx[w] = ninf;
    }
    for (j = 0; j < n; ++j) {
      const __m256i key = _mm256_set1_epi32(int32_t(k0 + j));
      for (int w = 0; w < W; ++w) {
        float* r = s + j * kLanes + 8 * w;
        const __m256 x = _mm256_blendv_ps(_mm256_loadu_ps(r), ninf, _mm256_castsi256_ps(_mm256_cmpgt_epi32(key, lim[w])));
        _mm256_storeu_ps(r, x);
        mx[w] = _mm256_max_ps(mx[w], x);
      }
    }
  }
  // A lane's numbers must not depend on which rows share its column (that changes with how a prompt is
  // cut into steps, e.g. at a prefix-cache hit): its masked keys add exactly 0, and a block it sees no key
  // of (the column goes on for other lanes) leaves its state exactly as it was (al = 1, not exp2(0)).
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (int w = 0; w < W; ++w) {
    // every lane sees key 0, so after the first block m is finite and so is the new max
    const __m256 m = _mm256_loadu_ps(c.m + 8 * w);
    nm[w] = _mm256_max_ps(m, mx[w]);
    al[w] = exp2_neg(_mm256_sub_ps(m, nm[w]));
    if (masked) al[w] = _mm256_blendv_ps(al[w], one, _mm256_cmp_ps(mx[w], ninf, _CMP_EQ_OQ));
    sum[w] = _mm256_setzero_ps();
  }
  for (j = 0; j < n; ++j)
    for (int w = 0; w < W; ++w) {
      float* r = s + j * kLanes + 8 * w;
      const __m256 x = _mm256_loadu_ps(r);
      __m256 p = exp2_neg(_mm256_sub_ps(x, nm[w]));
      if (masked) p = _mm256_blendv_ps(p, zero, _mm256_cmp_ps(x, ninf, _CMP_EQ_OQ));
      _mm256_storeu_ps(r, p);
      sum[w] = _mm256_add_ps(sum[w], p);
    }
  for (int w = 0; w < W; ++w) {
    _mm256_storeu_ps(c.m + 8 * w, nm[w]);
    _mm256_storeu_ps(c.l + 8 * w, _mm256_fmadd_ps(_mm256_loadu_ps(c.l + 8 * w), al[w], sum[w]));
  }
  int64_t d = 0;
  for (; d + kRpv <= hd; d += kRpv) pv_tile<W, kRpv>(vp, n, s, d, c.ot + d * kLanes, al);
  with_tail(hd - d, [&]<int R>() { pv_tile<W, R>(vp, n, s, d, c.ot + d * kLanes, al); });
}

template <class T>
struct Shape {
  const float* q;
  int64_t q_stride;
  const T* k_cache;
  const T* v_cache;
  const int64_t* seq_start;
  const int64_t* ctx_len;
  const int64_t* slots;
  int64_t ld_slots, nh, nkv, hd, group;
  float* out;
};

// Scratch a thread keeps across tasks.
struct Scratch {
  std::vector<float> f;
  std::vector<float> kv;  // a key block's float16 K and V rows, widened
  std::vector<const float*> heads;
  std::vector<Column> cols;
};

// Query vectors [v0, v1) of sequence i's kv head g; vector v is row v / group, head g * group + v % group.
template <int W, class T>
void tiled_task(const Shape<T>& a, int64_t i, int64_t g, int64_t v0, int64_t v1, Scratch& sc) {
  constexpr int64_t kLanes = 8 * W;
  const int64_t hd = a.hd, G = a.group, kvd = a.nkv * hd;
  const int64_t r0 = a.seq_start[i], prev = a.ctx_len[i] - (a.seq_start[i + 1] - r0);
  const int64_t C = (v1 - v0 + kLanes - 1) / kLanes;
  const float qscale = kLog2e / std::sqrt(float(hd));
  sc.f.assign(2 * C * hd * kLanes + kKeyBlock * kLanes + 2 * hd, 0.f);
  sc.kv.resize(2 * kKeyBlock * hd);  // used by float16 caches only
  sc.cols.resize(C);
  float* s = sc.f.data() + 2 * C * hd * kLanes;
  const float* zeros = s + kKeyBlock * kLanes;  // [hd]
  float* trash = s + kKeyBlock * kLanes + hd;    // [hd] where padding lanes' outputs go
  const float* kp[kKeyBlock];
  const float* vp[kKeyBlock];
  int64_t kend = 0;
  const float* src[kLanes];  // each lane's query (a row of zeros for padding lanes)
  for (int64_t c = 0; c < C; ++c) {
    Column& col = sc.cols[c];
    col.qt = sc.f.data() + 2 * c * hd * kLanes;
    col.ot = col.qt + hd * kLanes;
    col.lo = INT64_MAX;
    col.hi = 0;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      col.m[lane] = -INFINITY;
      col.l[lane] = 0.f;
      const int64_t v = v0 + c * kLanes + lane;
      src[lane] = zeros;
      if (v >= v1) continue;
      const int64_t row = v / G;
      src[lane] = a.q + (r0 + row) * a.q_stride + (g * G + v % G) * hd;
      col.lim[lane] = int32_t(prev + row);
      col.lo = std::min(col.lo, prev + row);
      col.hi = std::max(col.hi, prev + row);
    }
    for (int64_t lane = 0; lane < kLanes; ++lane)  // padding lanes (q = 0) see what the column sees
      if (v0 + c * kLanes + lane >= v1) col.lim[lane] = int32_t(col.hi);
    kend = std::max(kend, col.hi + 1);
    transpose_in<W>(src, hd, qscale, col.qt);
  }
  const int64_t* sl = a.slots + i * a.ld_slots;
  for (int64_t k0 = 0; k0 < kend; k0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, kend - k0);
    for (int64_t j = 0; j < nb; ++j) {
      kp[j] = as_float(a.k_cache + sl[k0 + j] * kvd + g * hd, hd, sc.kv.data() + j * hd);
      vp[j] = as_float(a.v_cache + sl[k0 + j] * kvd + g * hd, hd, sc.kv.data() + (kKeyBlock + j) * hd);
    }
    for (int64_t c = 0; c < C; ++c) {
      Column& col = sc.cols[c];
      const int64_t n = std::min(nb, col.hi + 1 - k0);
      if (n > 0) column_block<W>(col, kp, vp, k0, n, hd, s);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const Column& col = sc.cols[c];
    float* dst[kLanes];
    float inv[kLanes];
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const int64_t v = v0 + c * kLanes + lane;
      dst[lane] = v < v1 ? a.out + (r0 + v / G) * a.nh * hd + (g * G + v % G) * hd : trash;  // padding lanes
      inv[lane] = 1.f / col.l[lane];
    }
    transpose_out<W>(col.ot, hd, inv, dst);
  }
}

// ---- decode kernel ----
// One query row, with exactly the arithmetic the tiled kernel applies to each of its lanes: the same
// 64-key blocks, q.K as one fma chain over d per key, a block's sum in key order, l = fma(l, alpha, sum),
// o = alpha * o then fma chains over the keys, out = o * (1 / l). So a row comes out bit-identical
// whether it is decoded alone or computed inside a prefill chunk (a prefix-cache hit can leave one row
// of a prompt to compute; a generated token's KV is reused by the next step's prompt). The work is laid
// out for one row: 8 keys per vector (K rows transposed 8 x 8), shared by the kv head's query heads.

// s[h][0..8) = q[h] . K row kp[j], j < 8, for H query heads (ld_s: s's row stride)
template <int H, class T>
inline void dec_qk8(const float* const* q, const T* const* kp, int64_t hd, float* s, int64_t ld_s) {
  __m256 acc[H];
  for (int h = 0; h < H; ++h) acc[h] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    __m256 m[8];
    for (int j = 0; j < 8; ++j) m[j] = load8(kp[j] + d);
    transpose8(m);  // m[r]: dim d + r of the 8 keys
    for (int r = 0; r < 8; ++r)
      for (int h = 0; h < H; ++h) acc[h] = _mm256_fmadd_ps(m[r], _mm256_broadcast_ss(q[h] + d + r), acc[h]);
  }
  for (int h = 0; h < H; ++h) _mm256_storeu_ps(s + h * ld_s, acc[h]);
  for (; d < hd; ++d)  // dims left over (hd % 8)
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < 8; ++j) s[h * ld_s + j] = std::fma(float(kp[j][d]), q[h][d], s[h * ld_s + j]);
}

// o[h][d0 .. d0 + 8 NV) = alpha[h] * o[h] + sum over n keys of p[h][j] * V row vp[j], H heads
template <int H, int NV, class T>
inline void dec_pv(const T* const* vp, int64_t n, const float* p, int64_t ld_p, int64_t d0, float* o, int64_t ld_o,
                   const float* alpha) {
  __m256 acc[H][NV];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < NV; ++c)
      acc[h][c] = _mm256_mul_ps(_mm256_loadu_ps(o + h * ld_o + d0 + 8 * c), _mm256_set1_ps(alpha[h]));
  for (int64_t j = 0; j < n; ++j) {
    __m256 v[NV];
    for (int c = 0; c < NV; ++c) v[c] = load8(vp[j] + d0 + 8 * c);
    for (int h = 0; h < H; ++h) {
      const __m256 b = _mm256_broadcast_ss(p + h * ld_p + j);
      for (int c = 0; c < NV; ++c) acc[h][c] = _mm256_fmadd_ps(b, v[c], acc[h][c]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(o + h * ld_o + d0 + 8 * c, acc[h][c]);
}

template <int H, class T>
void dec_pv_heads(const T* const* vp, int64_t n, const float* p, int64_t ld_p, int64_t hd, float* o, int64_t ld_o,
                  const float* alpha) {
  constexpr int NV = H == 3 ? 3 : 4;  // H * NV accumulators + NV values + 1 broadcast fit the 16 ymm
  int64_t d = 0;
  for (; d + 8 * NV <= hd; d += 8 * NV) dec_pv<H, NV>(vp, n, p, ld_p, d, o, ld_o, alpha);
  for (; d + 16 <= hd; d += 16) dec_pv<H, 2>(vp, n, p, ld_p, d, o, ld_o, alpha);
  for (; d + 8 <= hd; d += 8) dec_pv<H, 1>(vp, n, p, ld_p, d, o, ld_o, alpha);
  for (; d < hd; ++d)  // dims left over (hd % 8)
    for (int h = 0; h < H; ++h) {
      float acc = o[h * ld_o + d] * alpha[h];
      for (int64_t j = 0; j < n; ++j) acc = std::fma(float(vp[j][d]), p[h * ld_p + j], acc);
      o[h * ld_o + d] = acc;
    }
}

// A decode row runs in two passes, so that one long context keeps every thread busy while each query
// vector still gets the tiled kernel's arithmetic: (1) its scores, by ranges of keys; (2) per kv head and
// 32-dim slice of the output, the online softmax over the 64-key blocks in order (every slice computes the
// same numbers) and p.V for its dims. A batch with rows enough to share out runs both passes of a row in
// one task instead: one wait for the threads per call, not two (on a busy machine each wait can cost a
// time slice).
constexpr int64_t kSlice = 32;       // output dims per pass-2 task when sliced
constexpr int64_t kScoreKeys = 256;  // keys per pass-1 task, at least

// Pass 1: scores of keys [k0, k1) (k0 a multiple of 8) of sequence i's last row, every head, into
// s [nh, ld] (ld >= ctx rounded up to 8). The kv heads of a slot are adjacent in the cache: each group of
// 8 keys is read for every kv head in turn, so the rows are read whole and in order.
template <class T>
void decode_scores(const Shape<T>& a, int64_t i, int64_t k0, int64_t k1, float* s, int64_t ld, Scratch& sc) {
  const int64_t hd = a.hd, G = a.group, nh = a.nh, kvd = a.nkv * hd;
  const float qscale = kLog2e / std::sqrt(float(hd));
  sc.f.resize(nh * hd);
  sc.heads.resize(nh);
  float* qs = sc.f.data();  // [nh, hd] prescaled queries
  const float** qh = sc.heads.data();
  const T* kp[8];
  const float* qr = a.q + (a.seq_start[i + 1] - 1) * a.q_stride;
  for (int64_t x = 0; x < nh * hd; ++x) qs[x] = qr[x] * qscale;
  for (int64_t h = 0; h < nh; ++h) qh[h] = qs + h * hd;
  const int64_t* sl = a.slots + i * a.ld_slots;
  for (int64_t k = k0; k < k1; k += 8) {
    const int64_t n = std::min<int64_t>(8, k1 - k);
    for (int64_t g = 0; g < a.nkv; ++g) {
      for (int64_t j = 0; j < 8; ++j) kp[j] = a.k_cache + sl[k + (j < n ? j : 0)] * kvd + g * hd;  // pad: unused
      for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += 4)
        with_tail(std::min<int64_t>(4, (g + 1) * G - h0),
                  [&]<int H>() { dec_qk8<H>(qh + h0, kp, hd, s + h0 * ld + k, ld); });
    }
  }
}

// One key block's online-softmax step for H query heads: scores s[h][0..n) (row stride ld) become
// probabilities p[h][0..n) (row stride 64); the heads' running max and sum ml[h] = (m, l) are updated and
// alpha[h] = 2^(m_old - m_new) set. Each head's sum runs over its keys in order, as a tiled lane's does;
// the H heads' sums are interleaved, so the additions' latency is shared.
template <int H>
inline void softmax_block(const float* s, int64_t ld, int64_t n, float* p, float* ml, float* alpha) {
  float m[H], sum[H];
  for (int h = 0; h < H; ++h) {
    const float* sh = s + h * ld;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sh + j));
    float mx = -INFINITY;
    for (int c = 0; c < 8; ++c) mx = std::max(mx, ((float*)&vm)[c]);
    for (; j < n; ++j) mx = std::max(mx, sh[j]);
    m[h] = std::max(ml[2 * h], mx);
    sum[h] = 0.f;
  }
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int h = 0; h < H; ++h)
      _mm256_storeu_ps(p + h * kKeyBlock + j,
                       exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(s + h * ld + j), _mm256_set1_ps(m[h]))));
    for (int r = 0; r < 8; ++r)
      for (int h = 0; h < H; ++h) sum[h] += p[h * kKeyBlock + j + r];
  }
  for (; j < n; ++j)
    for (int h = 0; h < H; ++h) sum[h] += (p[h * kKeyBlock + j] = exp2_neg1(s[h * ld + j] - m[h]));
  for (int h = 0; h < H; ++h) {
    alpha[h] = exp2_neg1(ml[2 * h] - m[h]);
    ml[2 * h] = m[h];
    ml[2 * h + 1] = std::fma(ml[2 * h + 1], alpha[h], sum[h]);
  }
}

// Pass 2: output dims [d0, d1) of the query heads of kv heads [g0, g1), from their scores in s [nh, ld].
template <class T>
void decode_values(const Shape<T>& a, int64_t i, int64_t g0, int64_t g1, int64_t d0, int64_t d1, const float* s,
                   int64_t ld, Scratch& sc) {
  const int64_t hd = a.hd, G = a.group, kvd = a.nkv * hd, ctx = a.ctx_len[i], w = d1 - d0, nq = (g1 - g0) * G;
  sc.f.assign(nq * w + G * kKeyBlock + 2 * nq + G, 0.f);
  float* o = sc.f.data();           // [nq, w] unnormalized outputs
  float* pb = o + nq * w;           // [G, 64] probabilities of one kv head's key block
  float* ml = pb + G * kKeyBlock;   // [nq, 2] running max (log2 units) and sum
  float* alpha = ml + 2 * nq;       // [G]
  const T* vp[kKeyBlock];
  for (int64_t h = 0; h < nq; ++h) ml[2 * h] = -INFINITY;
  const int64_t* sl = a.slots + i * a.ld_slots;
  for (int64_t k0 = 0; k0 < ctx; k0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, ctx - k0);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t q0 = (g - g0) * G;  // its first query head among ours
      for (int64_t j = 0; j < n; ++j) vp[j] = a.v_cache + sl[k0 + j] * kvd + g * hd + d0;
      for (int64_t h0 = 0; h0 < G; h0 += 4)
        with_tail(std::min<int64_t>(4, G - h0), [&]<int H>() {
          softmax_block<H>(s + (g * G + h0) * ld + k0, ld, n, pb + h0 * kKeyBlock, ml + 2 * (q0 + h0), alpha + h0);
        });
      for (int64_t h0 = 0; h0 < G; h0 += 4)
        with_tail(std::min<int64_t>(4, G - h0), [&]<int H>() {
          dec_pv_heads<H>(vp, n, pb + h0 * kKeyBlock, kKeyBlock, w, o + (q0 + h0) * w, w, alpha + h0);
        });
    }
  }
  const int64_t row = a.seq_start[i + 1] - 1;
  for (int64_t h = 0; h < nq; ++h) {
    float* dst = a.out + row * a.nh * hd + (g0 * G + h) * hd + d0;
    const float inv = 1.f / ml[2 * h + 1];
    for (int64_t d = 0; d < w; ++d) dst[d] = o[h * w + d] * inv;
  }
}

struct Task {
  int64_t i, g, v0, v1;  // sequence i; tiled: kv head g's query vectors [v0, v1); decode scores: keys [v0, v1);
                         // decode values: dims [v0, v1) of kv heads [g, g + 1), or of all with g = -1
  int kind;              // 0 tiled, 1 decode scores, 2 decode values, 3 both passes of a decode row
  double cost;
};

// Run tasks longest first, handed out dynamically (the causal triangle balances); tiny calls (a short
// decode batch) stay on this thread: waking the pool costs more than it saves.
template <class F>
void run_tasks(std::vector<Task>& tasks, int64_t nthreads, F&& run) {
  std::sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  double work = 0;
  for (const Task& w : tasks) work += w.cost;
  std::atomic<int64_t> next{0};
  const int64_t ntasks = int64_t(tasks.size());
  const int64_t workers = work < kSerialWork ? 1 : std::min(nthreads, ntasks);
  agentrt::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch sc;
    for (int64_t t; (t = next.fetch_add(1)) < ntasks;) run(tasks[t], sc);
  });
}

}  // namespace

template <class T>
void attention(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int64_t* seq_start,
               const int64_t* ctx_len, const int64_t* slots, int64_t ld_slots, int64_t B, int64_t nh, int64_t nkv,
               int64_t hd, float* out) {
  const int64_t G = nh / nkv;
  const Shape<T> a{q, q_stride, k_cache, v_cache, seq_start, ctx_len, slots, ld_slots, nh, nkv, hd, G, out};
  const int64_t nthreads = agentrt::num_threads();
  std::vector<Task> first, second;
  std::vector<int64_t> score_at(B, -1), ld(B, 0);  // decode rows: offset and row stride of their scores
  int64_t nscores = 0, n_decode = 0;
  for (int64_t i = 0; i < B; ++i) n_decode += seq_start[i + 1] - seq_start[i] == 1;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = seq_start[i + 1] - seq_start[i], ctx = ctx_len[i];
    if (n == 1) {
      ld[i] = (ctx + 7) / 8 * 8;
      score_at[i] = nscores;
      nscores += nh * ld[i];
      if (n_decode >= 2 * nthreads) {  // enough rows to share out: one task per row, both passes in it
        first.push_back({i, -1, 0, ctx, 3, double(ctx) * nh * 2});
        continue;
      }
      // few rows: scores by key ranges, then values per kv head and 32-dim slice, so every thread has work
      const int64_t parts = std::max<int64_t>(1, std::min(4 * nthreads, ctx / kScoreKeys));
      for (int64_t p = 0; p < parts; ++p)
        first.push_back({i, -1, ctx * p / parts / 8 * 8, p + 1 < parts ? ctx * (p + 1) / parts / 8 * 8 : ctx, 1,
                         double(ctx / parts) * nh});
      for (int64_t g = 0; g < nkv; ++g)
        for (int64_t d = 0; d < hd; d += kSlice)
          second.push_back({i, g, d, std::min(hd, d + kSlice), 2, double(ctx) * G * std::min(kSlice, hd - d) / hd});
      continue;
    }
    const int64_t prev = ctx - n, per = kCols * kMaxLanes;
    for (int64_t g = 0; g < nkv; ++g)
      for (int64_t v0 = 0; v0 < n * G; v0 += per) {
        const int64_t v1 = std::min(n * G, v0 + per);
        first.push_back({i, g, v0, v1, 0, double(v1 - v0) * double(prev + (v0 + v1) / (2 * G) + 1)});
      }
  }
  std::vector<float> scores(nscores);
  run_tasks(first, nthreads, [&](const Task& w, Scratch& sc) {
    if (w.kind == 0) {
      const int64_t vectors = w.v1 - w.v0;
      if (vectors <= 8) tiled_task<1>(a, w.i, w.g, w.v0, w.v1, sc);
      else if (vectors <= 16) tiled_task<2>(a, w.i, w.g, w.v0, w.v1, sc);
      else tiled_task<kMaxW>(a, w.i, w.g, w.v0, w.v1, sc);
    }
    if (w.kind == 1 || w.kind == 3) decode_scores(a, w.i, w.v0, w.v1, scores.data() + score_at[w.i], ld[w.i], sc);
    if (w.kind == 3) decode_values(a, w.i, 0, nkv, 0, hd, scores.data() + score_at[w.i], ld[w.i], sc);
  });
  if (!second.empty())
    run_tasks(second, nthreads, [&](const Task& w, Scratch& sc) {
      decode_values(a, w.i, w.g < 0 ? 0 : w.g, w.g < 0 ? nkv : w.g + 1, w.v0, w.v1, scores.data() + score_at[w.i],
                    ld[w.i], sc);
    });
}

#else  // no AVX2: one (row, head) at a time

template <class KV>
void attention(const float* q, int64_t q_stride, const KV* k_cache, const KV* v_cache, const int64_t* seq_start,
               const int64_t* ctx_len, const int64_t* slots, int64_t ld_slots, int64_t B, int64_t nh, int64_t nkv,
               int64_t hd, float* out) {
  const int64_t T = seq_start[B], group = nh / nkv, kvd = nkv * hd;
  const float scale = 1.f / std::sqrt(float(hd));
  std::vector<int64_t> seq_of(T);  // query row -> its sequence
  for (int64_t i = 0; i < B; ++i) std::fill(seq_of.begin() + seq_start[i], seq_of.begin() + seq_start[i + 1], i);
  agentrt::parallel_for(0, T * nh, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc, widened(hd);  // a float16 cache row as float32
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / nh, head = t % nh, i = seq_of[row], g = head / group;
      const int64_t n = ctx_len[i] - (seq_start[i + 1] - 1 - row);  // keys this row sees
      const int64_t* sl = slots + i * ld_slots;
      const float* qr = q + row * q_stride + head * hd;
      sc.resize(n);
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = dot_f32(qr, as_float(k_cache + sl[j] * kvd + g * hd, hd, widened.data()), hd) * scale;
        mx = std::max(mx, sc[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
      float* o = out + row * nh * hd + head * hd;
      std::fill(o, o + hd, 0.f);
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < n; ++j) axpy_f32(sc[j] * inv, as_float(v_cache + sl[j] * kvd + g * hd, hd, widened.data()), o, hd);
    }
  });
}

#endif

template void attention<float>(const float*, int64_t, const float*, const float*, const int64_t*, const int64_t*,
                               const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
template void attention<at::Half>(const float*, int64_t, const at::Half*, const at::Half*, const int64_t*,
                                  const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

at::Tensor attention_op(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor seq_start, at::Tensor ctx_len,
                        at::Tensor slots, int64_t nh, int64_t nkv, int64_t hd) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 2 && q.stride(1) == 1 && q.size(1) >= nh * hd,
              "attention: q must be float32 [T, >= nh * hd] with unit column stride");
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
              v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.dim() == 3 && k_cache.size(1) == nkv && k_cache.size(2) == hd && v_cache.sizes() == k_cache.sizes(),
              "attention: caches must be contiguous float32 or float16 [slots, nkv, hd], both the same");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "attention: nh must be a multiple of nkv");
  seq_start = seq_start.to(at::kLong).contiguous();
  ctx_len = ctx_len.to(at::kLong).contiguous();
  slots = slots.to(at::kLong).contiguous();
  const int64_t B = ctx_len.numel(), S = k_cache.size(0);
  TORCH_CHECK(seq_start.numel() == B + 1 && slots.dim() == 2 && slots.size(0) == B, "attention: seq_start [B + 1], slots [B, L]");
  const int64_t* st = seq_start.data_ptr<int64_t>();
  const int64_t* cl = ctx_len.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[B] == q.size(0), "attention: seq_start must run from 0 to T");
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = st[i + 1] - st[i];
    TORCH_CHECK(n >= 1 && cl[i] >= n && cl[i] <= slots.size(1), "attention: sequence ", i, " has ", n,
                " query rows and ctx_len ", cl[i], " (need 1 <= rows <= ctx_len <= slots.size(1))");
    for (int64_t j = 0; j < cl[i]; ++j)
      TORCH_CHECK(sl[i * slots.size(1) + j] >= 0 && sl[i * slots.size(1) + j] < S, "attention: slot out of range");
  }
  auto out = at::empty({q.size(0), nh * hd}, q.options());
  if (k_cache.scalar_type() == at::kHalf)
    attention(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), st, cl, sl,
              slots.size(1), B, nh, nkv, hd, out.data_ptr<float>());
  else
    attention(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), st, cl, sl,
              slots.size(1), B, nh, nkv, hd, out.data_ptr<float>());
  return out;
}

}  // namespace agentrt
