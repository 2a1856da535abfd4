// AVX2's GEMM straight from the codes (isa_avx2.cpp avx2_code_gemm), batches above 8: x packed into
// panels, then every row of a random packed or split layer (one table), 1 thread. Not a test, and not
// part of the package: a measurement behind docs/perf.md.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -fno-math-errno -mavx2 -mfma -I qins/kernels/cpu \
//       perf/native/code_gemm_bench.cpp -o /tmp/cgb
//   taskset -c 1 /tmp/cgb 32 3072 3072 [split]     # batch, rows, columns
//
// Prints the best of 7 passes: the packing of x and the GEMM (ms, and GFLOP/s of the GEMM:
// 2 * batch * rows * columns floating-point operations).
#include "isa_avx2.cpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  using namespace qins;
  using clock = std::chrono::steady_clock;
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s BATCH ROWS COLS [split]\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atoi(argv[1]), out = std::atoi(argv[2]), in = std::atoi(argv[3]);
  const bool split = argc > 4 && std::strcmp(argv[4], "split") == 0;
  std::mt19937 g(1);
  std::vector<uint8_t> codes(static_cast<size_t>(out * in));
  std::vector<int8_t> sign(static_cast<size_t>(out * in));
  for (auto& c : codes) c = static_cast<uint8_t>(g() & 255);
  for (auto& s : sign) s = (g() & 1) ? 1 : -1;
  std::vector<float> x(static_cast<size_t>(B * in)), y(static_cast<size_t>(B * out)), xt(panel_floats(B, in));
  for (auto& v : x) v = static_cast<float>(g() % 1000) / 1000.0f - 0.5f;
  float lmin[1] = {-8.0f}, lmax[1] = {-2.0f};
  Args a{codes.data(), split ? sign.data() : nullptr, lmin, lmax, 0, in, out, in, x.data(), B, y.data(), int64_t{1} << 30};
  a.mulaw = 1;
  double pack = 1e30, gemm = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = clock::now();
    avx2_pack_panels(x.data(), B, in, xt.data());
    const auto t1 = clock::now();
    avx2_code_gemm(a, xt.data(), 0, out);
    const auto t2 = clock::now();
    pack = std::min(pack, std::chrono::duration<double>(t1 - t0).count());
    gemm = std::min(gemm, std::chrono::duration<double>(t2 - t1).count());
  }
  std::printf("batch %lld, %lld x %lld %s: pack %.3f ms, gemm %.2f ms (%.1f GFLOP/s)\n", static_cast<long long>(B),
              static_cast<long long>(out), static_cast<long long>(in), split ? "split" : "packed", pack * 1e3,
              gemm * 1e3, 2.0 * B * out * in / gemm / 1e9);
  return 0;
}
