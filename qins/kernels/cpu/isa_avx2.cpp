// AVX2 + FMA kernels (no VBMI): the row's signed table sits in L1; each 32 weights are looked up
// either half by two vgatherdps and half by scalar loads assembled with vpinsrd (lookup8), or all by
// scalar loads (the gather knob, Args::gather). A gather is bound by the load ports, the scalar half
// mostly by the integer and shuffle ports, so on Intel the halves overlap; AMD's gathers are slower
// than the loads they replace. Measured (3072x3072 packed codes, 1 thread, a standalone loop, ms per
// pass): Intel Xeon 6/207 all gathers 2.0, all scalar 2.6, half and half 1.8-1.9; AMD EPYC family 25
// model 1 (Zen 3) all gathers 4.2, half and half 3.1, all scalar 2.1.
// Byte-plane shuffles (vpshufb over 16-entry chunks, as the AVX-512 path does with vpermi2b) lose
// on AVX2: a 128-entry float table is 32 16-byte planes, twice the 16 ymm registers, so each
// shuffle reloads its plane and the loop is load-bound (4.1). Compiled with -mavx2 -mfma
// -ffp-contract=off (the table code uses separate mul/add intrinsics; without contraction they
// stay separate).
#include "qins_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace qins {
namespace {

// The per-column helpers of the kernels' inner loops are always inlined: GCC's inliner decides per
// translation unit, and when this file grew it left lookup8 (then load_w32) out of line in every
// kernel, one call per 8 or 32 weights (batch 8 7-26% slower, bit-identical results).
// tests/test_build.py checks that the built AVX2 object holds none of them as a function.
#define QINS_HOT inline __attribute__((always_inline))

// 2**n for integral n, clamped to [-126, 127] as pow2_bits does (max/min return their second
// operand for a NaN first one: NaN -> -126, like the scalar path).
inline __m256 pow2_8(__m256 n) {
  n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(127.0f));
  __m256i i = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(i);
}

// qins_exp of NV vectors (the reference sequence, each op correctly rounded), issued stage by
// stage across the vectors: one vector's chain is ~25 dependent ops, so a per-row table built one
// vector at a time waits on latency.
template <int NV>
inline void qins_exp_n(const __m256* t, __m256* out, bool exact_scale) {
  __m256 n[NV], f[NV], p[NV];
#define QINS_EACH for (int v = 0; v < NV; ++v)
  QINS_EACH n[v] = _mm256_round_ps(_mm256_mul_ps(t[v], _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  QINS_EACH f[v] = _mm256_sub_ps(_mm256_sub_ps(t[v], _mm256_mul_ps(n[v], _mm256_set1_ps(kLn2Hi))),
                                 _mm256_mul_ps(n[v], _mm256_set1_ps(kLn2Lo)));
  QINS_EACH p[v] = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(kP0), f[v]), _mm256_set1_ps(kP1));
  QINS_EACH p[v] = _mm256_add_ps(_mm256_mul_ps(p[v], f[v]), _mm256_set1_ps(kP2));
  QINS_EACH p[v] = _mm256_add_ps(_mm256_mul_ps(p[v], f[v]), _mm256_set1_ps(kP3));
  QINS_EACH p[v] = _mm256_add_ps(_mm256_mul_ps(p[v], f[v]), _mm256_set1_ps(kP4));
  QINS_EACH p[v] = _mm256_add_ps(_mm256_mul_ps(p[v], f[v]), _mm256_set1_ps(kP5));
  QINS_EACH p[v] = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p[v], f[v]), f[v]), f[v]), _mm256_set1_ps(1.0f));
  if (exact_scale) {
    // Every n in [-124, 126] (exp_scale_exact): y * 2**n is a normal float, so the reference's two
    // exact power-of-two products equal one product with 2**n built from n's bits.
    QINS_EACH out[v] = _mm256_mul_ps(p[v], _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n[v]), _mm256_set1_epi32(127)), 23)));
    return;
  }
  QINS_EACH {
    const __m256 a = _mm256_round_ps(_mm256_mul_ps(n[v], _mm256_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    out[v] = _mm256_mul_ps(_mm256_mul_ps(p[v], pow2_8(a)), pow2_8(_mm256_sub_ps(n[v], a)));
  }
#undef QINS_EACH
}

// Entries 8*v0 .. 8*(v0+NV)-1 of the unsigned table (entry i holds level i - 1) into t.
// exact: exp_scale_exact of the row (qins_exp_n's one-product scaling).
template <int NV>
inline void table8_n(int v0, __m256 vhi, __m256 delta, __m256 vz, bool exact, float* t) {
  __m256 arg[NV], e[NV];
  for (int v = 0; v < NV; ++v) arg[v] = _mm256_sub_ps(vhi, _mm256_mul_ps(_mm256_load_ps(kLevelIndex + 8 * (v0 + v)), delta));
  qins_exp_n<NV>(arg, e, exact);
  for (int v = 0; v < NV; ++v) _mm256_store_ps(t + 8 * (v0 + v), _mm256_sub_ps(e[v], vz));
}

// Signed table (t 32-byte aligned): packed -> [256] with entries 128.. negated; split -> [256]
// magnitudes.
void avx2_table_aligned(float lo, float hi, int packed, int mulaw, float* t) {
  const int K = packed ? 127 : 255;
  const float d = (hi - lo) / table_steps(K, mulaw);
  const __m256 delta = _mm256_set1_ps(d), vz = _mm256_set1_ps(table_offset(lo, mulaw)), vhi = _mm256_set1_ps(hi);
  const bool exact = exp_scale_exact(hi, d, K);
  table8_n<16>(0, vhi, delta, vz, exact, t);
  if (!packed) table8_n<16>(16, vhi, delta, vz, exact, t);
  t[0] = 0.0f;
  if (packed) {
    const __m256 neg = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 128; i += 8) _mm256_store_ps(t + 128 + i, _mm256_xor_ps(_mm256_load_ps(t + i), neg));
  }
}

void avx2_table(float lo, float hi, int packed, int mulaw, float* out) {
  alignas(32) float t[256];
  avx2_table_aligned(lo, hi, packed, mulaw, t);
  std::copy(t, t + 256, out);
}

int64_t avx2_kpad(int64_t in) { return in; }

void avx2_xprep(const float* x, int64_t B, int64_t in, int64_t, float* xp) { std::copy(x, x + B * in, xp); }

// Applies the split format's signs (bit 7 of each sign byte) to the 8 weights of w.
QINS_HOT __m256 signed8(__m256 w, __m128i s8) {
  const __m256i sv = _mm256_cvtepi8_epi32(s8);
  return _mm256_xor_ps(w, _mm256_castsi256_ps(_mm256_and_si256(sv, _mm256_set1_epi32(INT32_MIN))));
}

// The 8 table entries of the codes in u's bytes, by scalar loads: each pair with vmovd + vpinsrd,
// the pairs joined by vpunpcklqdq and vinserti128. Written out because that is the sequence that
// runs beside the gathers best: scalar stores to a buffer reloaded as a vector stall on store
// forwarding (measured 1.7x slower).
QINS_HOT __m256 lookup8(const float* t, uint64_t u) {
  auto bits = [&](int i) {
    int32_t v;
    std::memcpy(&v, t + ((u >> (8 * i)) & 255), 4);
    return v;
  };
  auto pair = [&](int i) { return _mm_insert_epi32(_mm_cvtsi32_si128(bits(i)), bits(i + 1), 1); };
  const __m128i lo = _mm_unpacklo_epi64(pair(0), pair(2)), hi = _mm_unpacklo_epi64(pair(4), pair(6));
  return _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

// 8 signed weights at column k of a row: one vgatherdps (GATHER) or scalar loads (lookup8).
template <bool GATHER>
QINS_HOT __m256 load_w8(const float* t, const uint8_t* c, const int8_t* s) {
  __m256 w;
  if (GATHER) {
    w = _mm256_i32gather_ps(t, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))), 4);
  } else {
    uint64_t u;
    std::memcpy(&u, c, 8);
    w = lookup8(t, u);
  }
  return s ? signed8(w, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))) : w;
}

// 32 signed weights at column k of a row, W[q] = columns 8q .. 8q+7. GATHER: columns 0..15 by two
// gathers, 16..31 by scalar loads (lookup8); a gather spends its time on the load ports, the scalar
// lookups on the integer ports and the shuffle port, so the two halves overlap (Intel's best).
// Otherwise all 32 by scalar loads: on AMD (Zen 3 measured) the gathers are slower than the scalar
// loads they replace (the gather knob, ops.cpp).
template <bool SPLIT, bool GATHER>
QINS_HOT void load_w32(const float* t, const uint8_t* c, const int8_t* s, __m256* W) {
  // each 8 codes loaded straight into a register (one 32-byte copy to the stack, reloaded 8 bytes
  // at a time, stalls on store forwarding)
  auto codes8 = [c](int q) {
    uint64_t u;
    std::memcpy(&u, c + 8 * q, 8);
    return u;
  };
  if (GATHER) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
    W[0] = _mm256_i32gather_ps(t, _mm256_cvtepu8_epi32(lo), 4);
    W[1] = _mm256_i32gather_ps(t, _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)), 4);
  } else {
    W[0] = lookup8(t, codes8(0));
    W[1] = lookup8(t, codes8(1));
  }
  W[2] = lookup8(t, codes8(2));
  W[3] = lookup8(t, codes8(3));
  if (SPLIT) {
    const __m256i sv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    const __m128i s0 = _mm256_castsi256_si128(sv), s1 = _mm256_extracti128_si256(sv, 1);
    W[0] = signed8(W[0], s0);
    W[1] = signed8(W[1], _mm_unpackhi_epi64(s0, s0));
    W[2] = signed8(W[2], s1);
    W[3] = signed8(W[3], _mm_unpackhi_epi64(s1, s1));
  }
}

QINS_HOT float w1(const float* t, const uint8_t* c, const int8_t* s, int64_t k) {
  float w = t[c[k]];
  return (s && s[k] < 0) ? -w : w;
}

QINS_HOT float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [r0, r1) for B rows of x. Each row's sum: 32-column steps into A accumulators per x row
// (A = 4 at B = 1: four independent FMA chains hide the FMA latency), then 8-column steps into the
// first, the horizontal sum, and the scalar tail; the order depends only on the shape, never on the
// tuning knobs. Codes (and signs) are prefetched a.prefetch bytes ahead: measured at batch 1, cold,
// 1 thread, ratio to nn.Linear without / with 1-12 KiB: 3072x3072 packed 1.03 / 0.93-0.95, split
// 1.25 / 1.12-1.15, 3072x8192 packed 0.96 / 0.83-0.87 (the default 12 KiB among the best).
template <bool SPLIT, bool GATHER, int B>
void gemv_b(const Args& a, int64_t r0, int64_t r1) {
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);
  alignas(32) float tabs[kMaxTables][256];
  auto build = [&](float lo, float hi, float* t) { avx2_table_aligned(lo, hi, !SPLIT, a.mulaw, t); };
  shared_tables(a, tabs, build);
  const int64_t in32 = a.in & ~int64_t(31), in8 = a.in & ~int64_t(7);
  for (int64_t r = r0; r < r1; ++r) {
    const float* t = row_tab(a, tabs, r, build);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = SPLIT ? a.sign + r * a.in : nullptr;
    __m256 acc[B][A];
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < A; ++j) acc[b][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in32; k += 32) {
      if (a.prefetch && (k & 63) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(c + k + a.prefetch), _MM_HINT_T0);
        if (SPLIT) _mm_prefetch(reinterpret_cast<const char*>(s + k + a.prefetch), _MM_HINT_T0);
      }
      __m256 W[4];
      load_w32<SPLIT, GATHER>(t, c + k, SPLIT ? s + k : nullptr, W);
      for (int b = 0; b < B; ++b) {
        const float* x = a.xp + b * a.kpad + k;
        for (int q = 0; q < 4; ++q) acc[b][q % A] = _mm256_fmadd_ps(W[q], _mm256_loadu_ps(x + 8 * q), acc[b][q % A]);
      }
    }
    for (int64_t k = in32; k < in8; k += 8) {
      const __m256 w = load_w8<GATHER>(t, c + k, s ? s + k : nullptr);
      for (int b = 0; b < B; ++b) acc[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.xp + b * a.kpad + k), acc[b][0]);
    }
    for (int b = 0; b < B; ++b) {
      __m256 sum = acc[b][0];
      for (int j = 1; j < A; ++j) sum = _mm256_add_ps(sum, acc[b][j]);
      float v = hsum8(sum);
      for (int64_t k = in8; k < a.in; ++k) v += w1(t, c, s, k) * a.xp[b * a.kpad + k];
      a.y[b * a.out + r] = v;
    }
  }
}

// B <= kAvx2GemvGroup (ops.cpp calls gemv with at most gemv_group rows of x at a time).
template <bool SPLIT, bool GATHER>
void gemv_s(const Args& a, int64_t r0, int64_t r1) {
  static_assert(kAvx2GemvGroup == 8, "gemv_s instantiates batches 1..8");
  switch (a.B) {
    case 1: return gemv_b<SPLIT, GATHER, 1>(a, r0, r1);
    case 2: return gemv_b<SPLIT, GATHER, 2>(a, r0, r1);
    case 3: return gemv_b<SPLIT, GATHER, 3>(a, r0, r1);
    case 4: return gemv_b<SPLIT, GATHER, 4>(a, r0, r1);
    case 5: return gemv_b<SPLIT, GATHER, 5>(a, r0, r1);
    case 6: return gemv_b<SPLIT, GATHER, 6>(a, r0, r1);
    case 7: return gemv_b<SPLIT, GATHER, 7>(a, r0, r1);
    default: return gemv_b<SPLIT, GATHER, 8>(a, r0, r1);
  }
}

void avx2_gemv(const Args& a, int64_t r0, int64_t r1) {
  if (a.gather) return a.sign ? gemv_s<true, true>(a, r0, r1) : gemv_s<false, true>(a, r0, r1);
  return a.sign ? gemv_s<true, false>(a, r0, r1) : gemv_s<false, false>(a, r0, r1);
}

template <bool SPLIT, bool GATHER>
void decode_s(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w) {
  alignas(32) float tabs[kMaxTables][256];
  auto build = [&](float lo, float hi, float* t) { avx2_table_aligned(lo, hi, !SPLIT, a.mulaw, t); };
  shared_tables(a, tabs, build);
  const int64_t k32 = k0 + ((k1 - k0) & ~int64_t(31)), k8 = k0 + ((k1 - k0) & ~int64_t(7));
  for (int64_t r = r0; r < r1; ++r) {
    const float* t = row_tab(a, tabs, r, build);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = SPLIT ? a.sign + r * a.in : nullptr;
    float* wr = w + (r - r0) * (k1 - k0) - k0;
    for (int64_t k = k0; k < k32; k += 32) {
      __m256 W[4];
      load_w32<SPLIT, GATHER>(t, c + k, SPLIT ? s + k : nullptr, W);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(wr + k + 8 * q, W[q]);
    }
    for (int64_t k = k32; k < k8; k += 8) _mm256_storeu_ps(wr + k, load_w8<GATHER>(t, c + k, s ? s + k : nullptr));
    for (int64_t k = k8; k < k1; ++k) wr[k] = w1(t, c, s, k);
  }
}

void avx2_decode(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w) {
  if (a.gather) return a.sign ? decode_s<true, true>(a, r0, r1, k0, k1, w) : decode_s<false, true>(a, r0, r1, k0, k1, w);
  return a.sign ? decode_s<true, false>(a, r0, r1, k0, k1, w) : decode_s<false, false>(a, r0, r1, k0, k1, w);
}

// Batches above kAvx2MaxGemvBatch, straight from the codes: outer products over the batch instead
// of a decoded block and a GEMM. x is packed transposed into panels of 16 rows (pack_panels: panel
// p, column k holds x[16p .. 16p + 15][k], zeros past B); a tile of NR <= 6 weight rows and one
// panel keeps NR x 2 vector accumulators, and per column loads the panel's two vectors, broadcasts
// each row's weight from its table (one byte load and one vbroadcastss: the decode costs two loads,
// no shuffle) and issues 2 NR FMAs. The FMAs bound it (12 a column for 6 rows, 14 loads), so the
// decode is nearly free from batch 9 up, and no weight is ever written out. Each output is summed
// over k in column order, in one lane, whatever the tuning.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// x [B, in] into panels (xt: panel_floats(B, in)), 8 rows x 8 columns a step.
void avx2_pack_panels(const float* x, int64_t B, int64_t in, float* xt) {
  const int64_t k8 = in & ~int64_t(7);
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const int64_t nb = std::min<int64_t>(8, B - b0);
    float* dst = xt + b0 / kPanel * in * kPanel + b0 % kPanel;
    for (int64_t k = 0; k < k8; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = i < nb ? _mm256_loadu_ps(x + (b0 + i) * in + k) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kPanel, r[i]);
    }
    for (int64_t k = k8; k < in; ++k)
      for (int i = 0; i < 8; ++i) dst[k * kPanel + i] = i < nb ? x[(b0 + i) * in + k] : 0.0f;
  }
}

// NR weight rows times one panel (its first nb <= 8 NH rows of x): row j's weight at column k is
// tl[j * TS + idx[j * in + k]] (tl: the tile's signed tables, TS floats apart).
template <typename I, int TS, int NH, int NR>
void codes_tile(const float* tl, const I* idx, int64_t in, const float* xt, float* y, int64_t ldy, int nb) {
  __m256 acc[NR][NH];
#pragma GCC unroll 6
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) acc[j][h] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    __m256 xv[NH];
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) xv[h] = _mm256_loadu_ps(xt + k * kPanel + 8 * h);
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = _mm256_broadcast_ss(tl + j * TS + idx[j * in + k]);
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) acc[j][h] = _mm256_fmadd_ps(xv[h], wv, acc[j][h]);
    }
  }
  // through a buffer stored whole: indexing the accumulators by the runtime nb kept them in memory
  alignas(32) float l[NR][8 * NH];
#pragma GCC unroll 6
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) _mm256_store_ps(l[j] + 8 * h, acc[j][h]);
  for (int j = 0; j < NR; ++j)
    for (int b = 0; b < nb; ++b) y[b * ldy + j] = l[j][b];
}

template <typename I, int TS>
using TileFn = void (*)(const float*, const I*, int64_t, const float*, float*, int64_t, int);
template <typename I, int TS, int NH>
constexpr TileFn<I, TS> kTiles[6] = {codes_tile<I, TS, NH, 1>, codes_tile<I, TS, NH, 2>, codes_tile<I, TS, NH, 3>,
                                     codes_tile<I, TS, NH, 4>, codes_tile<I, TS, NH, 5>, codes_tile<I, TS, NH, 6>};

// Per-thread buffer of the split format's table indices (6 rows), reused across calls.
uint16_t* index_buffer(int64_t n) {
  thread_local std::vector<uint16_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// Rows [r0, r1) of y for every row of x (xt: avx2_pack_panels of x), 6 rows a tile. Packed: the
// signed 256-entry table, indexed by the code. Split: a 512-entry table (magnitudes, then their
// negations), indexed by code + 256 for a negative sign, the tile's indices built first (16 a step).
template <bool SPLIT>
void code_gemm_s(const Args& a, const float* xt, int64_t r0, int64_t r1) {
  constexpr int TS = SPLIT ? 512 : 256;
  alignas(32) float tabs[kMaxTables][256];
  alignas(32) float tl[6][TS];
  auto build = [&](float lo, float hi, float* t) { avx2_table_aligned(lo, hi, !SPLIT, a.mulaw, t); };
  shared_tables(a, tabs, build);
  uint16_t* ib = SPLIT ? index_buffer(6 * a.in) : nullptr;
  const int64_t in16 = a.in & ~int64_t(15);
  for (int64_t t0 = r0; t0 < r1; t0 += 6) {
    const int nr = static_cast<int>(std::min<int64_t>(6, r1 - t0));
    for (int j = 0; j < nr; ++j) {
      std::memcpy(tl[j], row_tab(a, tabs, t0 + j, build), 256 * sizeof(float));
      if (SPLIT)
        for (int i = 0; i < 256; i += 8)
          _mm256_store_ps(tl[j] + 256 + i, _mm256_xor_ps(_mm256_load_ps(tl[j] + i), _mm256_set1_ps(-0.0f)));
    }
    const uint8_t* c = a.codes + t0 * a.in;
    if (SPLIT) {
      const int8_t* s = a.sign + t0 * a.in;
      for (int j = 0; j < nr; ++j) {
        const uint8_t* cj = c + j * a.in;
        const int8_t* sj = s + j * a.in;
        uint16_t* ij = ib + j * a.in;
        for (int64_t k = 0; k < in16; k += 16) {
          const __m256i cv = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cj + k)));
          const __m256i sv = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sj + k)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ij + k),
                              _mm256_or_si256(cv, _mm256_slli_epi16(_mm256_srli_epi16(sv, 7), 8)));
        }
        for (int64_t k = in16; k < a.in; ++k) ij[k] = static_cast<uint16_t>(cj[k] | (sj[k] < 0 ? 256 : 0));
      }
    }
    for (int64_t b0 = 0; b0 < a.B; b0 += kPanel) {
      const int nb = static_cast<int>(std::min<int64_t>(kPanel, a.B - b0));
      const float* panel = xt + b0 * a.in;
      float* y = a.y + b0 * a.out + t0;
      if (SPLIT) (nb > 8 ? kTiles<uint16_t, TS, 2> : kTiles<uint16_t, TS, 1>)[nr - 1](tl[0], ib, a.in, panel, y, a.out, nb);
      else (nb > 8 ? kTiles<uint8_t, TS, 2> : kTiles<uint8_t, TS, 1>)[nr - 1](tl[0], c, a.in, panel, y, a.out, nb);
    }
  }
}

void avx2_code_gemm(const Args& a, const float* xt, int64_t r0, int64_t r1) {
  return a.sign ? code_gemm_s<true>(a, xt, r0, r1) : code_gemm_s<false>(a, xt, r0, r1);
}

// The rounding-deviation score, 8 columns a step, as avx512_deviation (the block is zero-padded
// to 8 columns by dev_block, so there is no tail).
void avx2_deviation(const DevArgs& a, int64_t r0, int64_t r1) {
  alignas(32) float wb[kDevBlock], gb[kDevBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const float* inv = a.inv + r * a.C;
    double* dev = a.dev + r * a.C;
    double asum = 0.0;
    for (int64_t i = 0; i < a.C; ++i) dev[i] = 0.0;
    for (int64_t k0 = 0; k0 < a.cols; k0 += kDevBlock) {
      const int64_t n = std::min(kDevBlock, a.cols - k0);
      const int64_t n8 = (n + 7) / 8 * 8;
      asum += dev_block(a, r, k0, n, n8, wb, gb);
      for (int64_t i0 = 0; i0 < a.C; i0 += kDevGroup) {
        const int64_t g = std::min(kDevGroup, a.C - i0);
        __m256 acc[kDevGroup], iv[kDevGroup];
        for (int64_t j = 0; j < kDevGroup; ++j) {
          acc[j] = _mm256_setzero_ps();
          iv[j] = _mm256_set1_ps(j < g ? inv[i0 + j] : 0.0f);
        }
        for (int64_t k = 0; k < n8; k += 8) {
          const __m256 w = _mm256_load_ps(wb + k), gv = _mm256_load_ps(gb + k);
          for (int64_t j = 0; j < kDevGroup; ++j) {
            const __m256 t = _mm256_mul_ps(gv, iv[j]);
            const __m256 d = _mm256_sub_ps(t, _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(w, _mm256_mul_ps(d, d)));
          }
        }
        for (int64_t j = 0; j < g; ++j) {
          alignas(32) float l[8];
          _mm256_store_ps(l, acc[j]);
          dev[i0 + j] += ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        }
      }
    }
    for (int64_t i = 0; i < a.C; ++i) dev[i] -= asum / 12.0;
  }
}

// The final codes and errors, 8 columns a step, as avx512_range_codes.
void avx2_range_codes(const CodeArgs& a, int64_t r0, int64_t r1) {
  const __m256 zero = _mm256_setzero_ps(), kf = _mm256_set1_ps(static_cast<float>(a.K));
  const __m256i one = _mm256_set1_epi32(1), ki = _mm256_set1_epi32(static_cast<int32_t>(a.K));
  const int64_t n8 = a.cols / 8 * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const float* mag = a.mag + r * a.cols;
    const float* gap = a.gap + r * a.cols;
    for (int64_t s = 0; s < a.S; ++s) {
      const float* t = a.tables + (s * a.R + r) * 256;
      const __m256 delta = _mm256_set1_ps(a.delta[r * a.S + s]), half = _mm256_set1_ps(a.half[r * a.S + s]);
      uint8_t* codes = s == a.write ? a.codes + r * a.cols : nullptr;
      __m256d e0 = _mm256_setzero_pd(), e1 = _mm256_setzero_pd();
      for (int64_t k = 0; k < n8; k += 8) {
        const __m256 m = _mm256_loadu_ps(mag + k);
        __m256 j = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(gap + k), delta), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        j = _mm256_min_ps(_mm256_max_ps(j, zero), kf);
        const __m256i in = _mm256_castps_si256(_mm256_cmp_ps(j, kf, _CMP_LT_OQ));
        const __m256i flush = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(m, half, _CMP_GE_OQ)), ki);
        const __m256i c = _mm256_blendv_epi8(flush, _mm256_add_epi32(_mm256_cvttps_epi32(j), one), in);
        const __m256 d = _mm256_sub_ps(m, _mm256_i32gather_ps(t, c, 4));
        const __m256d dl = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), dh = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
        e0 = _mm256_add_pd(e0, _mm256_mul_pd(dl, dl));
        e1 = _mm256_add_pd(e1, _mm256_mul_pd(dh, dh));
        if (codes) {
          alignas(32) int32_t l[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(l), c);
          for (int i = 0; i < 8; ++i) codes[k + i] = static_cast<uint8_t>(l[i]);
        }
      }
      alignas(32) double l[4];
      _mm256_store_pd(l, _mm256_add_pd(e0, e1));
      a.err[r * a.S + s] = (l[0] + l[1]) + (l[2] + l[3]);
      range_codes_tail(a, r, s, n8, a.cols);
    }
  }
}

}  // namespace

const IsaKernels kAvx2Kernels = {"avx2", 1, avx2_table, avx2_kpad, avx2_xprep, avx2_gemv, avx2_decode, nullptr,
                                 avx2_pack_panels, avx2_code_gemm, avx2_deviation, avx2_range_codes, kAvx2GemvGroup, kAvx2MaxGemvBatch};

}  // namespace qins
