// The AMX-INT8 multiply-add peak of this machine, for RESULTS.md's "% of
// peak" figures: each thread runs TDPBUSD on four accumulator tiles with
// their A and B tiles reloaded from L1 every step (as a GEMM kernel does),
// so the figure is the tile unit's rate, not memory's.
//   g++ -O2 -mamx-tile -mamx-int8 -pthread benchmarks/amx_peak.cpp -o /tmp/amx_peak
//   /tmp/amx_peak 2     # threads
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static void run(long iters, double* seconds) {
  alignas(64) static thread_local uint8_t a[32 * 1024];
  alignas(64) static thread_local int8_t b[16 * 256 * 2];
  alignas(64) static thread_local int32_t c[16 * 16];
  std::memset(a, 1, sizeof a);
  std::memset(b, 1, sizeof b);
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    const int o = int(i & 15) * 64;
    _tile_loadd(4, a + o, 1024);
    _tile_loadd(6, b + o, 256);
    _tile_dpbusd(0, 4, 6);
    _tile_loadd(7, b + 64 + o, 256);
    _tile_dpbusd(1, 4, 7);
    _tile_loadd(5, a + 16 * 1024 + o, 1024);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
}

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::puts("the OS refused AMX tile permission");
    return 1;
  }
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const long iters = 4000000;
  std::vector<double> secs(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(run, iters, &secs[t]);
  for (auto& th : pool) th.join();
  double worst = 0;
  for (double s : secs) worst = s > worst ? s : worst;
  const double macs = double(threads) * iters * 4 * 16 * 16 * 64;
  std::printf("%d threads: %.0f GMAC/s (int8 multiply-adds, TDPBUSD)\n", threads, macs / worst / 1e9);
  return 0;
}
