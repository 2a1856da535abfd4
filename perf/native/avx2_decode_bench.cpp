// What an 8-wide computed decode would give the AVX2 packed GEMV at batch 1, against the kernel's
// table lookups: a dot product per row over ROWS x COLS random packed codes (one table), four FMA
// chains, 1 thread. Not a test, and not part of the package: a measurement behind docs/perf.md.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -mavx2 -mfma -I qins/kernels/cpu perf/native/avx2_decode_bench.cpp -o /tmp/adb
//   (-O3, as qins/kernels/cpu/build.py compiles the kernels: at -O2 g++ keeps pass()'s four
//   accumulators in memory, a store and a reload per 8 weights, which halved every variant's figure)
//   taskset -c 1 /tmp/adb 1024 3072      # 3 MiB of codes (L3-resident: the decode alone)
//   taskset -c 1 /tmp/adb 3072 3072      # the perf suite's square shape
//
// Variants (best of 20 passes, G weights/s):
//   lookup8        the kernel's all-scalar path (isa_avx2.cpp lookup8: 8 scalar loads, vmovd/vpinsrd)
//   permute-floor  vpmovzxbd + one vpermps: the cheapest 8-wide decode there is (8 levels; not a decode
//                  of this format, a lower bound on any that uses a register permute)
//   octave-exp     level = L[c & 7] with the octave (c >> 3) subtracted from the exponent bits, minus
//                  the offset z, sign from bit 7: geometric levels whose ratio per 8 codes is exactly 2
//   factored       level = H[(c-1) >> 3] * L[(c-1) & 7] - z (H of 16 entries: two vpermps and a blend),
//                  sign from bit 7: a 127-level table that this computation reproduces bit for bit,
//                  with the range free (what the mulaw tables would have to become)
#include "isa_avx2.cpp"  // lookup8 and hsum8 as the kernel has them

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

using qins::hsum8;
using qins::lookup8;

struct Tabs {
  __m256 L, H0, H1, Z;
  const float* t;  // the 256-entry signed table (lookup8)
};

enum Variant { kLookup, kFloor, kOctave, kFactored };

template <Variant V>
inline __m256 decode8(const uint8_t* p, const Tabs& T) {
  if (V == kLookup) {
    uint64_t u;
    std::memcpy(&u, p, 8);
    return lookup8(T.t, u);
  }
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  if (V == kFloor) return _mm256_permutevar8x32_ps(T.L, c);
  // bit 7 of the code to bit 31, alone (the shift also moves bits 0..6 into the exponent)
  const __m256 sign = _mm256_and_ps(_mm256_castsi256_ps(_mm256_slli_epi32(c, 24)), _mm256_set1_ps(-0.0f));
  if (V == kOctave) {
    const __m256 l = _mm256_permutevar8x32_ps(T.L, c);
    const __m256i e = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x78)), 20);
    const __m256 w = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_sub_epi32(_mm256_castps_si256(l), e)), T.Z);
    return _mm256_xor_ps(w, sign);
  }
  const __m256i i = _mm256_add_epi32(c, _mm256_set1_epi32(-1));  // code 0 -> index 127 -> H*L - z = 0
  const __m256 l = _mm256_permutevar8x32_ps(T.L, i);
  const __m256i h = _mm256_srli_epi32(i, 3);
  const __m256 hv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(T.H0, h), _mm256_permutevar8x32_ps(T.H1, h),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(i, 25)));
  return _mm256_xor_ps(_mm256_sub_ps(_mm256_mul_ps(hv, l), T.Z), sign);
}

template <Variant V>
double pass(const uint8_t* C, const Tabs& T, const float* x, float* y, int R, int N) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < R; ++r) {
    const uint8_t* c = C + static_cast<size_t>(r) * N;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int k = 0; k < N; k += 32)
      for (int q = 0; q < 4; ++q)
        acc[q] = _mm256_fmadd_ps(decode8<V>(c + k + 8 * q, T), _mm256_loadu_ps(x + k + 8 * q), acc[q]);
    y[r] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int R = argc > 1 ? std::atoi(argv[1]) : 1024, N = argc > 2 ? std::atoi(argv[2]) : 3072;
  if (R < 1 || N < 32 || N % 32) {
    std::fprintf(stderr, "usage: %s ROWS COLS (COLS a multiple of 32)\n", argv[0]);
    return 2;
  }
  std::vector<uint8_t> C(static_cast<size_t>(R) * N);
  std::mt19937 g(1);
  for (auto& c : C) c = static_cast<uint8_t>(g() & 255);
  // the factored table: L[j] = e^(-j d), H[i] = e^(-8 i d), z = H[15] * L[7]; table[k] = H*L - z
  alignas(32) float L[8], H[16], t[256];
  const float d = 0.06f;
  for (int j = 0; j < 8; ++j) L[j] = std::exp(-j * d);
  for (int i = 0; i < 16; ++i) H[i] = std::exp(-8 * i * d);
  const float z = H[15] * L[7];
  t[0] = 0.0f;
  for (int k = 1; k < 128; ++k) t[k] = H[(k - 1) >> 3] * L[(k - 1) & 7] - z;
  for (int k = 0; k < 128; ++k) t[128 + k] = -t[k];
  const Tabs T{_mm256_load_ps(L), _mm256_load_ps(H), _mm256_load_ps(H + 8), _mm256_set1_ps(z), t};
  std::vector<float> x(N), y0(R), y3(R);
  for (auto& v : x) v = static_cast<float>(g() % 1000) / 1000.0f - 0.5f;
  double best[4] = {1e30, 1e30, 1e30, 1e30};
  for (int rep = 0; rep < 20; ++rep) {  // the variants interleaved, best of 20
    best[0] = std::min(best[0], pass<kLookup>(C.data(), T, x.data(), y0.data(), R, N));
    best[1] = std::min(best[1], pass<kFloor>(C.data(), T, x.data(), y3.data(), R, N));
    best[2] = std::min(best[2], pass<kOctave>(C.data(), T, x.data(), y3.data(), R, N));
    best[3] = std::min(best[3], pass<kFactored>(C.data(), T, x.data(), y3.data(), R, N));
  }
  // the factored decode must give the table's bits: same sums, same order
  for (int r = 0; r < R; ++r)
    if (std::memcmp(&y0[r], &y3[r], 4) != 0) {
      std::fprintf(stderr, "row %d: factored %g != lookup %g\n", r, y3[r], y0[r]);
      return 1;
    }
  const char* names[4] = {"lookup8", "permute-floor", "octave-exp", "factored"};
  const double w = static_cast<double>(R) * N;
  std::printf("%d x %d codes, best of 20 passes:\n", R, N);
  for (int v = 0; v < 4; ++v) std::printf("  %-14s %8.3f ms  %5.2f G weights/s\n", names[v], best[v] * 1e3, w / best[v] / 1e9);
  return 0;
}
