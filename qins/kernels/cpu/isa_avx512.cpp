// AVX-512 (F, BW, VBMI) kernels: the fp32 magnitude table is split into 4 byte planes held in
// zmm registers and looked up with vpermi2b (64 codes per instruction); the sign goes into
// bit 31 with one vpternlogd; unpacks rebuild the floats. The unpacks leave the 64 weights of a
// chunk in a fixed permutation, so x is permuted the same way once per call (xprep) instead of
// un-permuting every chunk. Compiled with -mavx512f -mavx512bw -mavx512vbmi -ffp-contract=off.
#include "qins_kernels.h"

#include <immintrin.h>

#include <algorithm>

namespace qins {
namespace {


// qins_exp of NV vectors at once (the reference sequence, each op correctly rounded), issued stage
// by stage across the NV vectors: their dependency chains are ~25 ops deep, so one vector at a time
// leaves the scheduler waiting on latency (measured: 8 vectors 41 ns one by one, 26 ns interleaved).
// a = floor(n / 2) and b = n - a in integers: n is integral, so floor(n * 0.5) == n >> 1.
template <int NV>
inline void qins_exp_n(const __m512* t, __m512* out, bool exact_scale) {
  __m512 n[NV], f[NV], p[NV];
#define QINS_EACH for (int v = 0; v < NV; ++v)
  QINS_EACH n[v] = _mm512_roundscale_ps(_mm512_mul_ps(t[v], _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  QINS_EACH f[v] = _mm512_sub_ps(_mm512_sub_ps(t[v], _mm512_mul_ps(n[v], _mm512_set1_ps(kLn2Hi))),
                                 _mm512_mul_ps(n[v], _mm512_set1_ps(kLn2Lo)));
  QINS_EACH p[v] = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(kP0), f[v]), _mm512_set1_ps(kP1));
  QINS_EACH p[v] = _mm512_add_ps(_mm512_mul_ps(p[v], f[v]), _mm512_set1_ps(kP2));
  QINS_EACH p[v] = _mm512_add_ps(_mm512_mul_ps(p[v], f[v]), _mm512_set1_ps(kP3));
  QINS_EACH p[v] = _mm512_add_ps(_mm512_mul_ps(p[v], f[v]), _mm512_set1_ps(kP4));
  QINS_EACH p[v] = _mm512_add_ps(_mm512_mul_ps(p[v], f[v]), _mm512_set1_ps(kP5));
  QINS_EACH p[v] = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p[v], f[v]), f[v]), f[v]), _mm512_set1_ps(1.0f));
  if (exact_scale) {
    // Every n in [-124, 126] (exp_scale_exact): y * 2**n is a normal float, so the reference's two
    // exact power-of-two products equal one vscalefps (one op for eleven).
    QINS_EACH out[v] = _mm512_scalef_ps(p[v], n[v]);
    return;
  }
  QINS_EACH {
    // n clamped to [-252, 254] (NaN: -252) so that both halves are normal exponents, as pow2_bits
    // clamps each half to [-126, 127]: the same factors as the scalar path for any n.
    const __m512 nc = _mm512_min_ps(_mm512_max_ps(n[v], _mm512_set1_ps(-252.0f)), _mm512_set1_ps(254.0f));
    const __m512i ni = _mm512_cvttps_epi32(nc), bias = _mm512_set1_epi32(127);
    const __m512i a = _mm512_srai_epi32(ni, 1), b = _mm512_sub_epi32(ni, a);
    out[v] = _mm512_mul_ps(_mm512_mul_ps(p[v], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(a, bias), 23))),
                           _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(b, bias), 23)));
  }
#undef QINS_EACH
}

// Unsigned table entries 16*v0 .. 16*(v0+NV)-1 (entry 0 = 0, entry i = level i - 1) into T[0..NV).
// exact: exp_scale_exact(hi, delta, levels) of the row (qins_exp_n's one-op scaling).
template <int NV>
inline void table16_n(int v0, __m512 vhi, __m512 delta, __m512 vz, bool exact, __m512* T) {
  __m512 t[NV];
  for (int v = 0; v < NV; ++v) t[v] = _mm512_sub_ps(vhi, _mm512_mul_ps(_mm512_load_ps(kLevelIndex + 16 * (v0 + v)), delta));
  qins_exp_n<NV>(t, T, exact);
  for (int v = 0; v < NV; ++v) T[v] = _mm512_sub_ps(T[v], vz);
  if (v0 == 0) T[0] = _mm512_mask_mov_ps(T[0], 1, _mm512_setzero_ps());
}

// Byte planes: P[H * p + h] holds byte p of table entries 64h .. 64h+63 (H = 2 packed, 4 split),
// from the 4H float vectors T (T[v] = entries 16v .. 16v+15).
template <int H>
inline void planes_from_table(const __m512* T, __m512i* P) {
  // byte q of float e -> position 16 q + e
  alignas(64) static const uint8_t kIdx[64] = {
      0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60,
      1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61,
      2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62,
      3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int h = 0; h < H; ++h) {
    __m512i v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm512_permutexvar_epi8(idx, _mm512_castps_si512(T[4 * h + i]));
    const __m512i t0 = _mm512_shuffle_i32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t1 = _mm512_shuffle_i32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i t2 = _mm512_shuffle_i32x4(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t3 = _mm512_shuffle_i32x4(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2));
    P[0 * H + h] = _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0));
    P[1 * H + h] = _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1));
    P[2 * H + h] = _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0));
    P[3 * H + h] = _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

template <int H>
inline float table_delta_scalar(float lo, float hi, int mulaw) {
  return (hi - lo) / table_steps(H == 2 ? 127 : 255, mulaw);
}

template <int H>
inline void make_planes(float lo, float hi, int mulaw, __m512i* P) {
  const float d = table_delta_scalar<H>(lo, hi, mulaw);
  const __m512 delta = _mm512_set1_ps(d), vhi = _mm512_set1_ps(hi), vz = _mm512_set1_ps(table_offset(lo, mulaw));
  __m512 T[4 * H];
  table16_n<4 * H>(0, vhi, delta, vz, exp_scale_exact(hi, d, H == 2 ? 127 : 255), T);
  planes_from_table<H>(T, P);
}

// Byte p of the magnitude of the 64 codes c.
template <int H>
inline __m512i lookup(const __m512i* P, int p, __m512i c) {
  if (H == 2) return _mm512_permutex2var_epi8(P[p * H], c, P[p * H + 1]);
  const __m512i lo = _mm512_permutex2var_epi8(P[p * H], c, P[p * H + 1]);
  const __m512i hi = _mm512_permutex2var_epi8(P[p * H + 2], c, P[p * H + 3]);
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), lo, hi);
}

// 64 signed weights, in the xprep order: W[q] lane l element e = column 16 l + 4 q + e.
// sbits: byte whose bit 7 is the sign (the packed code itself, or the split sign byte).
template <int H>
inline void decode64(const __m512i* P, __m512i c, __m512i sbits, __m512* W) {
  const __m512i b0 = lookup<H>(P, 0, c), b1 = lookup<H>(P, 1, c), b2 = lookup<H>(P, 2, c);
  // b3 | (sbits & 0x80): the magnitudes are positive, so OR sets the sign bit.
  const __m512i b3 = _mm512_ternarylogic_epi32(lookup<H>(P, 3, c), sbits, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  const __m512i lo01 = _mm512_unpacklo_epi8(b0, b1), hi01 = _mm512_unpackhi_epi8(b0, b1);
  const __m512i lo23 = _mm512_unpacklo_epi8(b2, b3), hi23 = _mm512_unpackhi_epi8(b2, b3);
  W[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
  W[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
  W[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
  W[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
}

inline __mmask64 tail_mask(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }

// Loads the 64 codes (and sign bytes) at column k; past the row's end they read as 0.
template <bool SPLIT>
inline void load_codes(const uint8_t* c, const int8_t* s, int64_t k, int64_t in, __m512i& vc, __m512i& vs) {
  if (k + 64 <= in) {
    vc = _mm512_loadu_si512(c + k);
    vs = SPLIT ? _mm512_loadu_si512(s + k) : vc;
  } else {
    const __mmask64 m = tail_mask(in - k);
    vc = _mm512_maskz_loadu_epi8(m, c + k);
    vs = SPLIT ? _mm512_maskz_loadu_epi8(m, s + k) : vc;
  }
}

void avx512_table(float lo, float hi, int packed, int mulaw, float* t) {
  const int K = packed ? 127 : 255;
  const float d = (hi - lo) / table_steps(K, mulaw);
  const __m512 delta = _mm512_set1_ps(d), vhi = _mm512_set1_ps(hi), vz = _mm512_set1_ps(table_offset(lo, mulaw));
  const bool exact = exp_scale_exact(hi, d, K);
  __m512 T[16];
  if (packed) table16_n<8>(0, vhi, delta, vz, exact, T); else table16_n<16>(0, vhi, delta, vz, exact, T);
  for (int v = 0; v < (packed ? 8 : 16); ++v) _mm512_storeu_ps(t + 16 * v, T[v]);
  if (packed)
    for (int v = 0; v < 8; ++v)
      _mm512_storeu_si512(t + 128 + 16 * v, _mm512_xor_si512(_mm512_loadu_si512(t + 16 * v), _mm512_set1_epi32(INT32_MIN)));
}

int64_t avx512_kpad(int64_t in) { return (in + 63) & ~int64_t(63); }

void avx512_xprep(const float* x, int64_t B, int64_t in, int64_t kpad, float* xp) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * in;
    float* o = xp + b * kpad;
    for (int64_t k0 = 0; k0 < kpad; k0 += 64)
      for (int q = 0; q < 4; ++q)
        for (int l = 0; l < 4; ++l)
          for (int e = 0; e < 4; ++e) {
            const int64_t k = k0 + 16 * l + 4 * q + e;
            o[k0 + 16 * q + 4 * l + e] = k < in ? xr[k] : 0.0f;
          }
  }
}

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// y[b, r] (+)= sum over columns [k0, k1) for rows [r0, r1), B rows of x. A: accumulators per b.
template <int H, bool SPLIT, int B>
void gemv_block(const Args& a, const __m512i* planes, int64_t nr, int64_t r0, int64_t k0, int64_t k1, bool first) {
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t r = r0 + i;
    __m512i P[4 * H];
    const int64_t t = a.per_row ? i : (a.row_table ? a.row_table[r] : 0);  // this row's planes
    for (int j = 0; j < 4 * H; ++j) P[j] = _mm512_load_si512(planes + t * 4 * H + j);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = SPLIT ? a.sign + r * a.in : nullptr;
    __m512 acc[B][A];
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < A; ++j) acc[b][j] = _mm512_setzero_ps();
    const int64_t pf = a.prefetch;
    for (int64_t k = k0; k < k1; k += 64) {
      if (pf) {
        _mm_prefetch(reinterpret_cast<const char*>(c + k + pf), _MM_HINT_T0);
        if (SPLIT) _mm_prefetch(reinterpret_cast<const char*>(s + k + pf), _MM_HINT_T0);
      }
      __m512i vc, vs;
      load_codes<SPLIT>(c, s, k, a.in, vc, vs);
      __m512 W[4];
      decode64<H>(P, vc, vs, W);
      for (int b = 0; b < B; ++b) {
        const float* x = a.xp + b * a.kpad + k;
        for (int q = 0; q < 4; ++q) acc[b][q % A] = _mm512_fmadd_ps(W[q], _mm512_loadu_ps(x + 16 * q), acc[b][q % A]);
      }
    }
    for (int b = 0; b < B; ++b) {
      __m512 t = acc[b][0];
      for (int j = 1; j < A; ++j) t = _mm512_add_ps(t, acc[b][j]);
      float v = hsum(t);
      float* y = a.y + b * a.out + r;
      *y = first ? v : *y + v;
    }
  }
}

// Per-row tables without column blocking: the next row's table vectors are computed a piece at a
// time inside the current row's loop, so their FP work overlaps the lookups and the memory stream.
template <int H, bool SPLIT, int B>
void gemv_pipelined(const Args& a, int64_t r0, int64_t r1) {
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);
  constexpr int NV = 4 * H;
  __m512i P[NV];
  alignas(64) __m512 T[NV];
  make_planes<H>(a.log_min[r0], a.log_max[r0], a.mulaw, P);
  const int64_t nchunks = a.kpad / 64;
  const int64_t step = std::max<int64_t>(1, nchunks / NV);
  const int64_t pf = a.prefetch;
  for (int64_t r = r0; r < r1; ++r) {
    const bool next = r + 1 < r1;
    const float hn = next ? a.log_max[r + 1] : 0.0f;
    const float dn = next ? table_delta_scalar<H>(a.log_min[r + 1], hn, a.mulaw) : 0.0f;
    const bool exact = exp_scale_exact(hn, dn, NV * 16 - 1);
    const __m512 vhi = _mm512_set1_ps(hn), delta = _mm512_set1_ps(dn);
    const __m512 vz = _mm512_set1_ps(next ? table_offset(a.log_min[r + 1], a.mulaw) : 0.0f);
    int piece = next ? 0 : NV;
    int64_t countdown = 0;
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = SPLIT ? a.sign + r * a.in : nullptr;
    __m512 acc[B][A];
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < A; ++j) acc[b][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < a.kpad; k += 64) {
      if (piece < NV && countdown-- == 0) {
        table16_n<1>(piece, vhi, delta, vz, exact, T + piece);
        ++piece;
        countdown = step - 1;
      }
      if (pf) {
        _mm_prefetch(reinterpret_cast<const char*>(c + k + pf), _MM_HINT_T0);
        if (SPLIT) _mm_prefetch(reinterpret_cast<const char*>(s + k + pf), _MM_HINT_T0);
      }
      __m512i vc, vs;
      load_codes<SPLIT>(c, s, k, a.in, vc, vs);
      __m512 W[4];
      decode64<H>(P, vc, vs, W);
      for (int b = 0; b < B; ++b) {
        const float* x = a.xp + b * a.kpad + k;
        for (int q = 0; q < 4; ++q) acc[b][q % A] = _mm512_fmadd_ps(W[q], _mm512_loadu_ps(x + 16 * q), acc[b][q % A]);
      }
    }
    for (; piece < NV; ++piece) table16_n<1>(piece, vhi, delta, vz, exact, T + piece);
    for (int b = 0; b < B; ++b) {
      __m512 t = acc[b][0];
      for (int j = 1; j < A; ++j) t = _mm512_add_ps(t, acc[b][j]);
      a.y[b * a.out + r] = hsum(t);
    }
    if (next) planes_from_table<H>(T, P);
  }
}

template <int H, bool SPLIT, int B>
void gemv_t(const Args& a, int64_t r0, int64_t r1) {
  // Measured: the pipelined table helps the split format (0.2 ns/row of FP work hidden behind
  // 8 lookups per chunk) and costs the packed one (4 lookups leave little to hide it behind).
  if (a.per_row && a.col_block >= a.kpad && (a.pipeline == 2 || (a.pipeline == 1 && SPLIT)))
    return gemv_pipelined<H, SPLIT, B>(a, r0, r1);
  alignas(64) __m512i planes[std::max(kMaxRowChunk, kMaxTables) * 4 * H];
  if (!a.per_row)
    for (int64_t g = 0; g < a.ntables; ++g) make_planes<H>(a.log_min[g], a.log_max[g], a.mulaw, planes + g * 4 * H);
  const int64_t nblk = (a.kpad + a.col_block - 1) / a.col_block;
  const int64_t kb = ((a.kpad / 64 + nblk - 1) / nblk) * 64;
  const int64_t chunk = std::min(std::max<int64_t>(a.row_chunk, 1), kMaxRowChunk);
  for (int64_t rc = r0; rc < r1; rc += chunk) {
    const int64_t nr = std::min(chunk, r1 - rc);
    if (a.per_row)
      for (int64_t i = 0; i < nr; ++i) make_planes<H>(a.log_min[rc + i], a.log_max[rc + i], a.mulaw, planes + i * 4 * H);
    for (int64_t k0 = 0; k0 < a.kpad; k0 += kb)
      gemv_block<H, SPLIT, B>(a, planes, nr, rc, k0, std::min(a.kpad, k0 + kb), k0 == 0);
  }
}

template <int H, bool SPLIT>
void gemv_hs(const Args& a, int64_t r0, int64_t r1) {
  switch (a.B) {
    case 1: return gemv_t<H, SPLIT, 1>(a, r0, r1);
    case 2: return gemv_t<H, SPLIT, 2>(a, r0, r1);
    case 3: return gemv_t<H, SPLIT, 3>(a, r0, r1);
    case 4: return gemv_t<H, SPLIT, 4>(a, r0, r1);
    case 5: return gemv_t<H, SPLIT, 5>(a, r0, r1);
    case 6: return gemv_t<H, SPLIT, 6>(a, r0, r1);
    case 7: return gemv_t<H, SPLIT, 7>(a, r0, r1);
    default: return gemv_t<H, SPLIT, 8>(a, r0, r1);
  }
}

void avx512_gemv(const Args& a, int64_t r0, int64_t r1) {
  if (a.sign) return gemv_hs<4, true>(a, r0, r1);
  return gemv_hs<2, false>(a, r0, r1);
}

template <int H, bool SPLIT>
void decode_t(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w) {
  alignas(64) __m512i planes[kMaxTables * 4 * H];
  if (!a.per_row)
    for (int64_t g = 0; g < a.ntables; ++g) make_planes<H>(a.log_min[g], a.log_max[g], a.mulaw, planes + g * 4 * H);
  for (int64_t r = r0; r < r1; ++r) {
    if (a.per_row) make_planes<H>(a.log_min[r], a.log_max[r], a.mulaw, planes);
    // the row's planes into locals, as gemv_block does: registers, not a load per chunk
    const __m512i* src = planes + (a.row_table ? a.row_table[r] : 0) * 4 * H;
    __m512i P[4 * H];
    for (int j = 0; j < 4 * H; ++j) P[j] = _mm512_load_si512(src + j);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = SPLIT ? a.sign + r * a.in : nullptr;
    float* wr = w + (r - r0) * (k1 - k0) - k0;
    for (int64_t k = k0; k < k1; k += 64) {
      __m512i vc, vs;
      load_codes<SPLIT>(c, s, k, a.in, vc, vs);
      __m512 W[4];
      decode64<H>(P, vc, vs, W);
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(wr + k + 16 * q, W[q]);
    }
  }
}

void avx512_decode(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w) {
  if (a.sign) return decode_t<4, true>(a, r0, r1, k0, k1, w);
  return decode_t<2, false>(a, r0, r1, k0, k1, w);
}


// Small GEMM on a decoded block: y[b * ldy + r] (+)= sum_k x[b * ldx + k] * w[r * kb + k], for
// kb a multiple of 16. NB x NR dot products at a time (4 x 4: 16 accumulators, 8 loads per 16
// FMAs). Used instead of at::mm inside the parallel region (no BLAS threading runtime nested in it).
template <int NB, int NR>
void micro(const float* x, int64_t ldx, const float* w, int64_t kb, float* y, int64_t ldy, bool accumulate) {
  __m512 acc[NB][NR];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kb; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * kb + k);
    for (int i = 0; i < NB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < NR; ++j) {
      const float v = _mm512_reduce_add_ps(acc[i][j]);
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + v : v;
    }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);
template <int NB>
constexpr MicroFn micro_row[4] = {micro<NB, 1>, micro<NB, 2>, micro<NB, 3>, micro<NB, 4>};

void avx512_gemm(const float* x, int64_t ldx, int64_t B, const float* w, int64_t R, int64_t kb, float* y,
                 int64_t ldy, bool accumulate) {
  static const MicroFn* const table[4] = {micro_row<1>, micro_row<2>, micro_row<3>, micro_row<4>};
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, R - r0));
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
      const int nb = static_cast<int>(std::min<int64_t>(4, B - b0));
      table[nb - 1][nr - 1](x + b0 * ldx, ldx, w + r0 * kb, kb, y + b0 * ldy + r0, ldy, accumulate);
    }
  }
}

// The rounding-deviation score, 16 columns a step: a block's weights and clamped gaps are
// computed once into stack buffers, then each group of <= kDevGroup candidates runs over them with
// one float32 accumulator per candidate (masked loads zero the tail: a = 0 adds nothing).
void avx512_deviation(const DevArgs& a, int64_t r0, int64_t r1) {
  alignas(64) float wb[kDevBlock], gb[kDevBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const float* mag = a.mag + r * a.cols;
    const float* gap = a.gap + r * a.cols;
    const float* inv = a.inv + r * a.C;
    double* dev = a.dev + r * a.C;
    const __m512 unit = _mm512_set1_ps(a.unit[r]), floor2 = _mm512_set1_ps(a.floor2[r]), tau = _mm512_set1_ps(a.tau[r]);
    double asum = 0.0;
    for (int64_t i = 0; i < a.C; ++i) dev[i] = 0.0;
    for (int64_t k0 = 0; k0 < a.cols; k0 += kDevBlock) {
      const int64_t n = std::min(kDevBlock, a.cols - k0);
      __m512 ws = _mm512_setzero_ps();
      for (int64_t k = 0; k < n; k += 16) {
        const __mmask16 m = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, mag + k0 + k), unit);
        const __m512 w = _mm512_maskz_max_ps(m, _mm512_sub_ps(_mm512_mul_ps(v, v), floor2), _mm512_setzero_ps());
        _mm512_store_ps(wb + k, w);
        _mm512_store_ps(gb + k, _mm512_min_ps(_mm512_maskz_loadu_ps(m, gap + k0 + k), tau));
        ws = _mm512_add_ps(ws, w);
      }
      asum += _mm512_reduce_add_ps(ws);
      for (int64_t i0 = 0; i0 < a.C; i0 += kDevGroup) {
        const int64_t g = std::min(kDevGroup, a.C - i0);
        __m512 acc[kDevGroup], iv[kDevGroup];
        for (int64_t j = 0; j < kDevGroup; ++j) {
          acc[j] = _mm512_setzero_ps();
          iv[j] = _mm512_set1_ps(j < g ? inv[i0 + j] : 0.0f);
        }
        for (int64_t k = 0; k < n; k += 16) {
          const __m512 w = _mm512_load_ps(wb + k), gv = _mm512_load_ps(gb + k);
          for (int64_t j = 0; j < kDevGroup; ++j) {
            const __m512 t = _mm512_mul_ps(gv, iv[j]);
            const __m512 d = _mm512_sub_ps(t, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(w, _mm512_mul_ps(d, d)));
          }
        }
        for (int64_t j = 0; j < g; ++j) dev[i0 + j] += _mm512_reduce_add_ps(acc[j]);
      }
    }
    for (int64_t i = 0; i < a.C; ++i) dev[i] -= asum / 12.0;
  }
}

// The final codes and errors, 16 columns a step: a gather from the row's table (L1-resident),
// the float32 differences widened to double and squared there; the tail runs range_codes_tail.
void avx512_range_codes(const CodeArgs& a, int64_t r0, int64_t r1) {
  const __m512 zero = _mm512_setzero_ps(), kf = _mm512_set1_ps(static_cast<float>(a.K));
  const __m512i one = _mm512_set1_epi32(1), ki = _mm512_set1_epi32(static_cast<int32_t>(a.K));
  const int64_t n16 = a.cols / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const float* mag = a.mag + r * a.cols;
    const float* gap = a.gap + r * a.cols;
    for (int64_t s = 0; s < a.S; ++s) {
      const float* t = a.tables + (s * a.R + r) * 256;
      const __m512 delta = _mm512_set1_ps(a.delta[r * a.S + s]), half = _mm512_set1_ps(a.half[r * a.S + s]);
      uint8_t* codes = s == a.write ? a.codes + r * a.cols : nullptr;
      __m512d e0 = _mm512_setzero_pd(), e1 = _mm512_setzero_pd();
      for (int64_t k = 0; k < n16; k += 16) {
        const __m512 m = _mm512_loadu_ps(mag + k);
        __m512 j = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(gap + k), delta), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        j = _mm512_min_ps(_mm512_max_ps(j, zero), kf);
        const __mmask16 in = _mm512_cmp_ps_mask(j, kf, _CMP_LT_OQ);
        const __m512i flush = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(m, half, _CMP_GE_OQ), ki);
        const __m512i c = _mm512_mask_blend_epi32(in, flush, _mm512_add_epi32(_mm512_cvttps_epi32(j), one));
        const __m512 d = _mm512_sub_ps(m, _mm512_i32gather_ps(c, t, 4));
        const __m512d dl = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
        const __m512d dh = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
        e0 = _mm512_add_pd(e0, _mm512_mul_pd(dl, dl));
        e1 = _mm512_add_pd(e1, _mm512_mul_pd(dh, dh));
        if (codes) _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(c));
      }
      a.err[r * a.S + s] = _mm512_reduce_add_pd(_mm512_add_pd(e0, e1));
      range_codes_tail(a, r, s, n16, a.cols);
    }
  }
}

}  // namespace

const IsaKernels kAvx512Kernels = {"avx512", 0, avx512_table, avx512_kpad, avx512_xprep, avx512_gemv, avx512_decode,
                                   avx512_gemm, nullptr, nullptr, avx512_deviation, avx512_range_codes, kGemvGroup, kMaxGemvBatch};

}  // namespace qins
