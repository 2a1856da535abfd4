// What bounds the AVX-512 packed GEMV at batch 1: the table lookups and the float assembly, per
// chunk of 64 codes, with the codes L2-resident (128 rows x 3072) or streamed (3072 x 3072, L3).
// Not a test, and not part of the package: a measurement behind docs/perf.md.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -mavx512f -mavx512bw -mavx512vbmi -mfma \
//       -I qins/kernels/cpu -DROWS=128 perf/native/lookup_bench.cpp -o /tmp/lookup_bench && /tmp/lookup_bench
//
// Variants (best of 7 passes over ROWS x 3072 codes, one table):
//   full-vpermi2b  decode64<2> as the kernel runs it (4 two-table vpermi2b, ternlog, 8 unpacks) + 4 FMAs
//   decode-only    the same without the FMAs and x loads
//   lookups-i2b    the 4 vpermi2b lookups only
//   lookups-pairs  the 4 lookups as two one-table vpermb each, merged on code bit 6
//   full-pairs     full-vpermi2b with the lookups of lookups-pairs
#include "isa_avx512.cpp"

#include <chrono>
#include <cstdio>
#include <vector>

#ifndef ROWS
#define ROWS 128
#endif

using namespace qins;

int main() {
  constexpr int64_t kIn = 3072, kRows = 3072;
  std::vector<uint8_t> codes(static_cast<size_t>(ROWS) * kIn);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  alignas(64) static float x[kIn];
  for (int i = 0; i < kIn; ++i) x[i] = 0.001f * i;
  __m512i P[8];
  make_planes<2>(-8.f, -1.f, 0, P);
  const char* names[] = {"full-vpermi2b", "decode-only", "lookups-i2b", "lookups-pairs", "full-pairs"};
  auto pairs = [&](int p, __m512i vc, __mmask64 m6) {
    return _mm512_mask_permutexvar_epi8(_mm512_permutexvar_epi8(vc, P[2 * p]), m6, vc, P[2 * p + 1]);
  };
  for (int variant = 0; variant < 5; ++variant) {
    double best = 1e30;
    float sink = 0.f;
    for (int rep = 0; rep < 7; ++rep) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      __m512i ai = _mm512_setzero_si512();
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* c = codes.data() + (r % ROWS) * kIn;
        for (int64_t k = 0; k < kIn; k += 64) {
          const __m512i vc = _mm512_loadu_si512(c + k);
          __m512 W[4];
          if (variant == 0 || variant == 1) {
            decode64<2>(P, vc, vc, W);
          } else if (variant == 4) {
            const __mmask64 m6 = _mm512_test_epi8_mask(vc, _mm512_set1_epi8(0x40));
            __m512i b[4];
            for (int p = 0; p < 4; ++p) b[p] = pairs(p, vc, m6);
            b[3] = _mm512_ternarylogic_epi32(b[3], vc, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
            const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
            const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
            W[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
            W[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
            W[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
            W[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
          } else if (variant == 2) {
            for (int p = 0; p < 4; ++p) ai = _mm512_xor_si512(ai, lookup<2>(P, p, vc));
            continue;
          } else {
            const __mmask64 m6 = _mm512_test_epi8_mask(vc, _mm512_set1_epi8(0x40));
            for (int p = 0; p < 4; ++p) ai = _mm512_xor_si512(ai, pairs(p, vc, m6));
            continue;
          }
          if (variant == 1) {
            for (int q = 0; q < 4; ++q) ai = _mm512_xor_si512(ai, _mm512_castps_si512(W[q]));
          } else {
            for (int q = 0; q < 4; ++q) acc[q] = _mm512_fmadd_ps(W[q], _mm512_loadu_ps(x + k + 16 * q), acc[q]);
          }
        }
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
      sink += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) +
              static_cast<float>(_mm512_reduce_add_epi32(ai));
    }
    std::printf("%-14s %.3f ms  %.2f ns per 64 codes  (checksum %g)\n", names[variant], best * 1e3,
                best * 1e9 / (kRows * kIn / 64), sink);
  }
}
