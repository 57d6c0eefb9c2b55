// CUDA top-k: radix select with deterministic, index-ordered compaction.
//
//   1. (error feedback) r = float(x) + r, after which r is the data.
//   2. Histogram of the top 11 key bits over all n; the host picks the bin
//      holding the k-th key, so t = bin floor admits a known count C >= k.
//   3. Count + scan + write: the C candidates (key >= t) in index order.
//   4. Histograms of the remaining key bits over the candidates only give the
//      exact k-th key T and how many keys exceed it.
//   5. Count + scan + write over the candidates: keys > T, and the first
//      k - greater keys == T by index, in index order.
// Three reads of x; the small host round trips size the next launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "topk.h"

namespace pk {
namespace topk {
namespace {

#define PK_CUDA_CHECK(expr)                                                                      \
  do {                                                                                           \
    const cudaError_t err_ = (expr);                                                             \
    if (err_ != cudaSuccess)                                                                     \
      throw std::runtime_error(std::string("CUDA error in top-k: ") + cudaGetErrorString(err_) + \
                               " (" #expr ")");                                                  \
  } while (0)

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int kTile = kThreads * kItems;
constexpr int kHistBits = 11;
constexpr int kMaxBlocks = 4096;

template <class T>
struct Workspace {  // stream-ordered device buffer
  T* ptr = nullptr;
  cudaStream_t stream;
  Workspace(size_t n, cudaStream_t s) : stream(s) {
    if (n) PK_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&ptr), n * sizeof(T), s));
  }
  ~Workspace() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <DType DT>
__global__ void ef_prepare_kernel(const void* __restrict__ x, float* __restrict__ r, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v;
    if (DT == DType::f16)
      v = __half2float(__ushort_as_half(static_cast<const unsigned short*>(x)[i]));
    else if (DT == DType::bf16)
      v = __bfloat162float(__ushort_as_bfloat16(static_cast<const unsigned short*>(x)[i]));
    else
      v = static_cast<const float*>(x)[i];
    r[i] += v;
  }
}

// hist[(key >> shift) & (2^d - 1)] over entries whose key >> (shift + d) == prefix.
template <class K>
__global__ void hist_kernel(const K* __restrict__ src, int64_t n, uint32_t mask, int shift, int d,
                            uint32_t prefix, unsigned long long* __restrict__ hist) {
  __shared__ unsigned int local[1 << kHistBits];
  const int bins = 1 << d;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) local[i] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t key = uint32_t(src[i]) & mask;
    if ((uint64_t(key) >> (shift + d)) == prefix)
      atomicAdd(&local[(key >> shift) & (bins - 1)], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x)
    if (local[i]) atomicAdd(&hist[i], (unsigned long long)local[i]);
}

template <class K>
__global__ void count_kernel(const K* __restrict__ src, int64_t n, uint32_t mask, uint32_t t,
                             int64_t chunk, long long* __restrict__ counts) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t b = blockIdx.x * chunk, e = imin(n, b + chunk);
  long long c = 0;
  for (int64_t i = b + threadIdx.x; i < e; i += kThreads) c += (uint32_t(src[i]) & mask) >= t;
  const long long total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// Writes (bits, index) of the entries with key >= t, in index order, starting
// at offsets[block].
template <class K>
__global__ void collect_kernel(const K* __restrict__ src, int64_t n, uint32_t mask, uint32_t t,
                               int64_t chunk, const long long* __restrict__ offsets,
                               uint32_t* __restrict__ ob, int64_t* __restrict__ oi) {
  using Load = cub::BlockLoad<K, kThreads, kItems, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Scan::TempStorage scan;
  } tmp;
  const int64_t b = blockIdx.x * chunk, e = imin(n, b + chunk);
  long long out = offsets[blockIdx.x];
  for (int64_t base = b; base < e; base += kTile) {
    const int valid = int(imin(kTile, e - base));
    K items[kItems];
    Load(tmp.load).Load(src + base, items, valid, K(0));
    __syncthreads();
    int flags = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int pos = threadIdx.x * kItems + j;
      flags += (pos < valid && (uint32_t(items[j]) & mask) >= t);
    }
    int rank, total;
    Scan(tmp.scan).ExclusiveSum(flags, rank, total);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int pos = threadIdx.x * kItems + j;
      if (pos < valid && (uint32_t(items[j]) & mask) >= t) {
        ob[out + rank] = uint32_t(items[j]);
        oi[out + rank] = base + pos;
        ++rank;
      }
    }
    out += total;
  }
}

__global__ void count_select_kernel(const uint32_t* __restrict__ cb, int64_t c, uint32_t mask,
                                    uint32_t kth, int64_t chunk, long long* __restrict__ gt,
                                    long long* __restrict__ eq) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t b = blockIdx.x * chunk, e = imin(c, b + chunk);
  long long g = 0, q = 0;
  for (int64_t i = b + threadIdx.x; i < e; i += kThreads) {
    const uint32_t key = cb[i] & mask;
    g += key > kth;
    q += key == kth;
  }
  const long long tg = Reduce(tmp).Sum(g);
  __syncthreads();
  const long long tq = Reduce(tmp).Sum(q);
  if (threadIdx.x == 0) {
    gt[blockIdx.x] = tg;
    eq[blockIdx.x] = tq;
  }
}

// Output slot o from an entry's bits; with error feedback (EF) the bits are
// y's and the residual keeps what rounding (or saturating) to x's dtype lost.
template <DType DT, bool EF, bool U16>
__device__ __forceinline__ void write_out(int64_t o, uint32_t bits, int64_t index, void* values,
                                          int64_t* indices, float* r) {
  indices[o] = index;
  if (!EF) {
    if (U16)
      static_cast<unsigned short*>(values)[o] = static_cast<unsigned short>(bits);
    else
      static_cast<uint32_t*>(values)[o] = bits;
    return;
  }
  const float y = __uint_as_float(bits);
  float sent = y;
  // A finite y past the 16-bit type's range is sent saturated (its largest
  // finite value, signed) and the excess stays in the residual; see topk.h.
  if (DT == DType::f16) {
    unsigned short h = __half_as_ushort(__float2half_rn(y));
    if ((h & 0x7fffu) == 0x7c00u && isfinite(y)) h = (h & 0x8000u) | 0x7bffu;
    static_cast<unsigned short*>(values)[o] = h;
    sent = __half2float(__ushort_as_half(h));
  } else if (DT == DType::bf16) {
    unsigned short h = __bfloat16_as_ushort(__float2bfloat16_rn(y));
    if ((h & 0x7fffu) == 0x7f80u && isfinite(y)) h = (h & 0x8000u) | 0x7f7fu;
    static_cast<unsigned short*>(values)[o] = h;
    sent = __bfloat162float(__ushort_as_bfloat16(h));
  } else {
    static_cast<uint32_t*>(values)[o] = bits;
  }
  r[index] = (isfinite(sent) && isfinite(y)) ? y - sent : 0.0f;
}

template <DType DT, bool EF, bool U16>
__global__ void emit_kernel(const uint32_t* __restrict__ cb, const int64_t* __restrict__ ci,
                            int64_t c, uint32_t mask, uint32_t kth, long long need, int64_t chunk,
                            const long long* __restrict__ gt_off,
                            const long long* __restrict__ eq_off, void* values, int64_t* indices,
                            float* r) {
  using Load = cub::BlockLoad<uint32_t, kThreads, kItems, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Scan::TempStorage scan;
  } tmp;
  const int64_t b = blockIdx.x * chunk, e = imin(c, b + chunk);
  long long g0 = gt_off[blockIdx.x], q0 = eq_off[blockIdx.x];
  for (int64_t base = b; base < e; base += kTile) {
    const int valid = int(imin(kTile, e - base));
    uint32_t items[kItems];
    Load(tmp.load).Load(cb + base, items, valid, 0u);
    __syncthreads();
    int ng = 0, nq = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (threadIdx.x * kItems + j < valid) {
        const uint32_t key = items[j] & mask;
        ng += key > kth;
        nq += key == kth;
      }
    }
    int rg, tg, rq, tq;
    Scan(tmp.scan).ExclusiveSum(ng, rg, tg);
    __syncthreads();
    Scan(tmp.scan).ExclusiveSum(nq, rq, tq);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int pos = threadIdx.x * kItems + j;
      if (pos >= valid) continue;
      const uint32_t key = items[j] & mask;
      const long long g = g0 + rg, q = q0 + rq;  // keys > kth / == kth before this entry
      if (key > kth) {
        write_out<DT, EF, U16>(g + (q < need ? q : need), items[j], ci[base + pos], values, indices,
                               r);
        ++rg;
      } else if (key == kth) {
        if (q < need) write_out<DT, EF, U16>(g + q, items[j], ci[base + pos], values, indices, r);
        ++rq;
      }
    }
    g0 += tg;
    q0 += tq;
  }
}

template <DType DT, bool EF, bool U16>
__global__ void emit_all_kernel(const void* __restrict__ src, int64_t n, void* values,
                                int64_t* indices, float* r) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t bits = U16 ? uint32_t(static_cast<const unsigned short*>(src)[i])
                              : static_cast<const uint32_t*>(src)[i];
    write_out<DT, EF, U16>(i, bits, i, values, indices, r);
  }
}

int grid_for(int64_t n) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + kTile - 1) / kTile, 8 * 132)));
}

// Blocks of `chunk` elements (a multiple of the tile) covering n.
void split(int64_t n, int* blocks, int64_t* chunk) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t per = (tiles + kMaxBlocks - 1) / kMaxBlocks;
  *chunk = std::max<int64_t>(1, per) * kTile;
  *blocks = int(std::max<int64_t>(1, (n + *chunk - 1) / *chunk));
}

std::vector<long long> exclusive_scan(const std::vector<long long>& v, long long* total) {
  std::vector<long long> out(v.size());
  long long acc = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = acc;
    acc += v[i];
  }
  *total = acc;
  return out;
}

template <class T>
std::vector<T> to_host(const T* d, size_t n, cudaStream_t s) {
  std::vector<T> h(n);
  PK_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost, s));
  PK_CUDA_CHECK(cudaStreamSynchronize(s));
  return h;
}

// Host side of one radix digit: histogram, then the bin holding the k-th key.
template <class K>
void digit_step(const K* keys, int64_t n, uint32_t mask, int shift, int d, uint32_t* prefix,
                int64_t* greater, int64_t k, unsigned long long* d_hist, cudaStream_t s) {
  const int bins = 1 << d;
  PK_CUDA_CHECK(cudaMemsetAsync(d_hist, 0, bins * sizeof(unsigned long long), s));
  hist_kernel<K><<<grid_for(n), kThreads, 0, s>>>(keys, n, mask, shift, d, *prefix, d_hist);
  PK_CUDA_CHECK(cudaGetLastError());
  const auto h = to_host(d_hist, size_t(bins), s);
  int bin = bins - 1;
  for (; bin > 0; --bin) {
    if (*greater + int64_t(h[bin]) >= k) break;
    *greater += int64_t(h[bin]);
  }
  *prefix = (*prefix << d) | uint32_t(bin);
}

template <DType DT, bool EF, bool U16>
void run(const Args& a, const void* src, cudaStream_t s) {
  using K = typename std::conditional<U16, unsigned short, uint32_t>::type;
  const K* keys = static_cast<const K*>(src);
  const uint32_t mask = U16 ? 0x7fffu : 0x7fffffffu;
  const int kbits = U16 ? 15 : 31;
  if (a.k == a.n) {
    emit_all_kernel<DT, EF, U16>
        <<<grid_for(a.n), kThreads, 0, s>>>(src, a.n, a.values, a.indices, a.residual);
    PK_CUDA_CHECK(cudaGetLastError());
    return;
  }
  Workspace<unsigned long long> hist(size_t(1) << kHistBits, s);
  uint32_t prefix = 0;
  int64_t greater = 0;
  const int shift1 = kbits - kHistBits;
  digit_step(keys, a.n, mask, shift1, kHistBits, &prefix, &greater, a.k, hist.ptr, s);
  const uint32_t t = prefix << shift1;

  int blocks;
  int64_t chunk;
  split(a.n, &blocks, &chunk);
  Workspace<long long> counts(size_t(blocks) * 2, s);
  count_kernel<K><<<blocks, kThreads, 0, s>>>(keys, a.n, mask, t, chunk, counts.ptr);
  PK_CUDA_CHECK(cudaGetLastError());
  long long c = 0;
  const auto offs = exclusive_scan(to_host(counts.ptr, size_t(blocks), s), &c);
  PK_CUDA_CHECK(cudaMemcpyAsync(counts.ptr, offs.data(), offs.size() * sizeof(long long),
                                cudaMemcpyHostToDevice, s));
  Workspace<uint32_t> cb(size_t(c), s);
  Workspace<int64_t> ci(size_t(c), s);
  collect_kernel<K>
      <<<blocks, kThreads, 0, s>>>(keys, a.n, mask, t, chunk, counts.ptr, cb.ptr, ci.ptr);
  PK_CUDA_CHECK(cudaGetLastError());

  for (int remaining = shift1; remaining > 0;) {
    const int d = std::min(kHistBits, remaining);
    const int shift = remaining - d;
    digit_step(cb.ptr, c, mask, shift, d, &prefix, &greater, a.k, hist.ptr, s);
    remaining = shift;
  }
  const uint32_t kth = prefix;
  const long long need = a.k - greater;

  int cblocks;
  int64_t cchunk;
  split(c, &cblocks, &cchunk);
  Workspace<long long> sel(size_t(cblocks) * 2, s);
  count_select_kernel<<<cblocks, kThreads, 0, s>>>(cb.ptr, c, mask, kth, cchunk, sel.ptr,
                                                   sel.ptr + cblocks);
  PK_CUDA_CHECK(cudaGetLastError());
  const auto h = to_host(sel.ptr, size_t(cblocks) * 2, s);
  long long tg, tq;
  auto og = exclusive_scan(std::vector<long long>(h.begin(), h.begin() + cblocks), &tg);
  const auto oq = exclusive_scan(std::vector<long long>(h.begin() + cblocks, h.end()), &tq);
  og.insert(og.end(), oq.begin(), oq.end());
  PK_CUDA_CHECK(cudaMemcpyAsync(sel.ptr, og.data(), og.size() * sizeof(long long),
                                cudaMemcpyHostToDevice, s));
  emit_kernel<DT, EF, U16><<<cblocks, kThreads, 0, s>>>(cb.ptr, ci.ptr, c, mask, kth, need, cchunk,
                                                        sel.ptr, sel.ptr + cblocks, a.values,
                                                        a.indices, a.residual);
  PK_CUDA_CHECK(cudaGetLastError());
  // The host vectors above are only read by the copies already issued.
  PK_CUDA_CHECK(cudaStreamSynchronize(s));
}

template <DType DT>
void run_dtype(const Args& a, cudaStream_t s) {
  if (a.residual) {
    ef_prepare_kernel<DT><<<grid_for(a.n), kThreads, 0, s>>>(a.x, a.residual, a.n);
    PK_CUDA_CHECK(cudaGetLastError());
    if (a.k > 0) run<DT, true, false>(a, a.residual, s);
  } else if (a.k > 0) {
    run<DT, false, DT != DType::f32>(a, a.x, s);
  }
}

}  // namespace

void sparsify_cuda(const Args& a, CUstream_st* stream) {
  check_args(a);
  if (a.n == 0) return;
  const cudaStream_t s = stream;
  switch (a.dtype) {
    case DType::f16:
      return run_dtype<DType::f16>(a, s);
    case DType::bf16:
      return run_dtype<DType::bf16>(a, s);
    default:
      return run_dtype<DType::f32>(a, s);
  }
}

}  // namespace topk
}  // namespace pk
