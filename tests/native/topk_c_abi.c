/* The top-k kernel through the plain C ABI against a naive selection: the
   same set (ties to the lower index), indices ascending. .ci/aarch64 builds
   the portable kernels for aarch64 and runs this under qemu-user. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include "pykernels.h"
static uint64_t s = 88172645463325252ull;
static float rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return (float)((int64_t)(s % 2000001) - 1000000) / 1000.0f; }
int main(void) {
  int failures = 0;
  for (int trial = 0; trial < 6; ++trial) {
    int64_t n = trial == 0 ? 1 : 100000 + 7777 * trial, k = n / 50 + 1;
    float* x = malloc(n * sizeof(float)); float* v = malloc(k * sizeof(float)); int64_t* idx = malloc(k * sizeof(int64_t));
    for (int64_t i = 0; i < n; ++i) x[i] = (trial == 3) ? (float)(i % 7) : rnd();  /* trial 3: many ties */
    if (pk_topk_sparsify_f32(x, n, k, 0, v, idx) != 0) { printf("error: %s\n", pk_last_error()); return 1; }
    /* naive: the k-th largest |x| and the number strictly above it */
    float* a = malloc(n * sizeof(float)); for (int64_t i = 0; i < n; ++i) a[i] = fabsf(x[i]);
    int cmp(const void* p, const void* q) { float d = *(const float*)q - *(const float*)p; return (d > 0) - (d < 0); }
    qsort(a, n, sizeof(float), cmp);
    float kth = a[k - 1]; int64_t above = 0; for (int64_t i = 0; i < n; ++i) above += fabsf(x[i]) > kth;
    int64_t ties = k - above, j = 0;
    for (int64_t i = 0; i < n && j < k; ++i) {
      float m = fabsf(x[i]);
      if (m > kth || (m == kth && ties-- > 0)) { if (idx[j] != i || v[j] != x[i]) { failures++; break; } ++j; }
    }
    printf("n=%ld k=%ld %s\n", (long)n, (long)k, j == k ? "ok" : "MISMATCH");
    if (j != k) failures++;
    free(x); free(v); free(idx); free(a);
  }
  printf("version %s, %s\n", pk_version(), failures ? "FAILED" : "all ok");
  return failures != 0;
}
