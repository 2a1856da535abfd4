// AVX2 + FMA kernels (no VBMI): the row's signed table sits in L1, weights come from
// vgatherdps, 8 at a time. Compiled with -mavx2 -mfma -ffp-contract=off (the table code uses
// separate mul/add intrinsics; without contraction they stay separate).
#include "qins_kernels.h"

#include <immintrin.h>

#include <algorithm>

namespace qins {
namespace {

// 2**n for integral n, clamped to [-126, 127] as pow2_bits does (max/min return their second
// operand for a NaN first one: NaN -> -126, like the scalar path).
inline __m256 pow2_8(__m256 n) {
  n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(127.0f));
  __m256i i = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(i);
}

inline __m256 qins_exp8(__m256 t) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(_mm256_sub_ps(t, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(kP1));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(kP2));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(kP3));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(kP4));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(kP5));
  const __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, f), f), f), _mm256_set1_ps(1.0f));
  const __m256 a = _mm256_round_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm256_mul_ps(_mm256_mul_ps(y, pow2_8(a)), pow2_8(_mm256_sub_ps(n, a)));
}

// Signed table: packed -> [256] with entries 128.. negated; split -> [256] magnitudes.
void avx2_table(float lo, float hi, int packed, int mulaw, float* t) {
  const int K = packed ? 127 : 255;
  const int n = K + 1;  // entries 0..K
  const __m256 delta = _mm256_set1_ps((hi - lo) / table_steps(K, mulaw));
  const __m256 vz = _mm256_set1_ps(table_offset(lo, mulaw));
  const __m256 vhi = _mm256_set1_ps(hi);
  for (int i = 0; i < n; i += 8) {
    // entry i + lane holds level j = i + lane - 1
    __m256 j = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_set1_epi32(i - 1), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    _mm256_storeu_ps(t + i, _mm256_sub_ps(qins_exp8(_mm256_sub_ps(vhi, _mm256_mul_ps(j, delta))), vz));
  }
  t[0] = 0.0f;
  if (packed) {
    const __m256 neg = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 128; i += 8) _mm256_storeu_ps(t + 128 + i, _mm256_xor_ps(_mm256_loadu_ps(t + i), neg));
  }
}

int64_t avx2_kpad(int64_t in) { return in; }

void avx2_xprep(const float* x, int64_t B, int64_t in, int64_t, float* xp) { std::copy(x, x + B * in, xp); }

// 8 signed weights at column k of a row.
inline __m256 load_w8(const float* t, const uint8_t* c, const int8_t* s) {
  __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  __m256 w = _mm256_i32gather_ps(t, idx, 4);
  if (s) {
    __m256i sv = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
    w = _mm256_xor_ps(w, _mm256_castsi256_ps(_mm256_and_si256(sv, _mm256_set1_epi32(INT32_MIN))));
  }
  return w;
}

inline float w1(const float* t, const uint8_t* c, const int8_t* s, int64_t k) {
  float w = t[c[k]];
  return (s && s[k] < 0) ? -w : w;
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int B>
void gemv_b(const Args& a, int64_t r0, int64_t r1) {
  alignas(32) float t[256];
  const int packed = a.sign == nullptr;
  if (!a.per_row) avx2_table(a.log_min[0], a.log_max[0], packed, a.mulaw, t);
  const int64_t in8 = a.in & ~int64_t(7);
  for (int64_t r = r0; r < r1; ++r) {
    if (a.per_row) avx2_table(a.log_min[r], a.log_max[r], packed, a.mulaw, t);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = a.sign ? a.sign + r * a.in : nullptr;
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in8; k += 8) {
      const __m256 w = load_w8(t, c + k, s ? s + k : nullptr);
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.xp + b * a.kpad + k), acc[b]);
    }
    for (int b = 0; b < B; ++b) {
      float v = hsum8(acc[b]);
      for (int64_t k = in8; k < a.in; ++k) v += w1(t, c, s, k) * a.xp[b * a.kpad + k];
      a.y[b * a.out + r] = v;
    }
  }
}

void avx2_gemv(const Args& a, int64_t r0, int64_t r1) {
  switch (a.B) {
    case 1: return gemv_b<1>(a, r0, r1);
    case 2: return gemv_b<2>(a, r0, r1);
    case 3: return gemv_b<3>(a, r0, r1);
    case 4: return gemv_b<4>(a, r0, r1);
    case 5: return gemv_b<5>(a, r0, r1);
    case 6: return gemv_b<6>(a, r0, r1);
    case 7: return gemv_b<7>(a, r0, r1);
    default: return gemv_b<8>(a, r0, r1);
  }
}

void avx2_decode(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w) {
  alignas(32) float t[256];
  const int packed = a.sign == nullptr;
  if (!a.per_row) avx2_table(a.log_min[0], a.log_max[0], packed, a.mulaw, t);
  const int64_t k8 = k0 + ((k1 - k0) & ~int64_t(7));
  for (int64_t r = r0; r < r1; ++r) {
    if (a.per_row) avx2_table(a.log_min[r], a.log_max[r], packed, a.mulaw, t);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = a.sign ? a.sign + r * a.in : nullptr;
    float* wr = w + (r - r0) * (k1 - k0) - k0;
    for (int64_t k = k0; k < k8; k += 8) _mm256_storeu_ps(wr + k, load_w8(t, c + k, s ? s + k : nullptr));
    for (int64_t k = k8; k < k1; ++k) wr[k] = w1(t, c, s, k);
  }
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
                                 avx2_deviation, avx2_range_codes};

}  // namespace qins
