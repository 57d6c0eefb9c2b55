// CPU top-k driver: picks the scan kernels for the active ISA and runs
//
//   fast path (n >= 2^15, k <= n/8): estimate a threshold t from a fixed
//     pseudo-random sample, chosen low enough that at least k entries pass it
//     with overwhelming probability; one streaming pass collects the entries
//     >= t (fused with the error-feedback update); the exact k-th key among
//     those candidates decides the result. One pass over memory.
//   exact fallback (small n, large k, or an unlucky sample): a histogram pass
//     on the top 11 key bits gives a threshold that provably admits >= k
//     entries, then the same collect and select. Three passes at most.
//   approx: the fast path with a smaller margin, so fewer candidates; an
//     unlucky sample still ends in the exact fallback, so the result is never
//     worse than a sampled threshold would give.
//
// Keys are the bit patterns with the sign cleared: for IEEE floats their
// unsigned order is the order of magnitudes, with NaN above inf.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "../common/checks.h"
#include "../common/half.h"
#include "../common/hash.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "topk.h"
#include "topk_isa.h"

namespace pk {
namespace topk {

void check_args(const Args& a) {
  PK_CHECK_ARG(a.dtype == DType::f32 || a.dtype == DType::f16 || a.dtype == DType::bf16,
               "x: dtype must be float32, float16 or bfloat16");
  PK_CHECK_ARG(a.n >= 0, "n must be >= 0, got ", a.n);
  PK_CHECK_ARG(a.k >= 0 && a.k <= a.n, "k must satisfy 0 <= k <= numel (", a.n, "), got ", a.k);
  PK_CHECK_ARG(a.n == 0 || a.x != nullptr, "x must not be null");
  PK_CHECK_ARG(a.k == 0 || (a.values != nullptr && a.indices != nullptr),
               "values and indices must not be null");
}

const ScanKernels* active_scan_kernels() {
  static const IsaPick<ScanKernels> pick({.portable = &scan_kernels_portable,
                                          .avx2 = PK_ISA_AVX2(&scan_kernels_avx2),
                                          .avx512 = PK_ISA_AVX512(&scan_kernels_avx512),
                                          .neon = PK_ISA_NEON(&scan_kernels_neon)});
  return pick();
}

namespace {

constexpr int64_t kSampleMinN = int64_t(1) << 15;
constexpr int64_t kSampleSize = 16384;
constexpr int64_t kSampleRun = 16;            // contiguous keys per sampled place
constexpr int64_t kGrain = int64_t(1) << 16;  // elements per thread, at least
constexpr int kHistBits = 11;
constexpr int kFirstDigitBits = 16;
// Candidate buffers up to this many entries stay allocated per calling thread;
// larger ones (large k) are freed after the call.
constexpr int64_t kKeepEntries = int64_t(1) << 23;

struct Buffers {
  std::unique_ptr<uint32_t[]> bits;
  std::unique_ptr<int64_t[]> idx;
  int64_t size = 0;
  void ensure(int64_t n) {
    if (n <= size) return;
    bits.reset(new uint32_t[size_t(n)]);
    idx.reset(new int64_t[size_t(n)]);
    size = n;
  }
};

float to_f32(const void* x, DType dt, int64_t i) {
  switch (dt) {
    case DType::f16:
      return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
    default:
      return bits_to_f32(static_cast<const uint32_t*>(x)[i]);
  }
}

class Selector {
 public:
  explicit Selector(const Args& a)
      : a_(a), kern_(active_scan_kernels()), ef_(a.residual != nullptr) {
    nt_ = threads_for(a.n, kGrain);
    src_ = a.x;
    u16_ = !ef_ && a.dtype != DType::f32;
  }

  void run() {
    if (a_.k == 0) {
      if (ef_) ef_pass_only();
      return;
    }
    if (a_.k == a_.n) return emit_all();
    const bool fast = a_.n >= kSampleMinN && a_.k <= a_.n / 8;
    if (fast) {
      // approx trades a smaller safety margin (fewer candidates to sort out)
      // for a higher chance of needing the fallback.
      const double z = a_.approx ? 2.5 : 4.0, c = a_.approx ? 4.0 : 8.0;
      int64_t expected = 0;
      const uint32_t t = sample_threshold(z, c, &expected);
      if (t != 0) {
        const int64_t cap = 2 * expected + 4096;
        std::vector<int64_t> caps(size_t(nt_), cap);
        collect(t, caps, /*fused=*/ef_);
        if (ef_) to_residual_view();
        const int64_t stored = stored_total();
        if (!overflowed() && stored >= a_.k) return select_and_emit();
      }
    }
    if (ef_ && !fused_) ef_pass_only();
    exact_fallback();
  }

 private:
  // --- views of the data ---------------------------------------------------
  uint32_t key_mask() const { return u16_ ? 0x7fffu : 0x7fffffffu; }
  int key_bits() const { return u16_ ? 15 : 31; }
  uint32_t raw_bits(int64_t i) const {
    return u16_ ? static_cast<const uint16_t*>(src_)[i] : static_cast<const uint32_t*>(src_)[i];
  }
  // Key of entry i, also before the error-feedback pass has run.
  uint32_t key_at(int64_t i) const {
    if (ef_ && !fused_)
      return f32_to_bits(to_f32(a_.x, a_.dtype, i) + a_.residual[i]) & 0x7fffffffu;
    return raw_bits(i) & key_mask();
  }
  void to_residual_view() {
    fused_ = true;
    src_ = a_.residual;
    u16_ = false;
  }
  void range(int t, int64_t* b, int64_t* e) const { split_range(a_.n, nt_, t, 64, b, e); }

  // --- passes -----------------------------------------------------------------
  void ef_pass_only() {
    uint32_t dummy_b;
    int64_t dummy_i;
    parallel(nt_, [&](int t) {
      int64_t b, e;
      range(t, &b, &e);
      kern_->collect_ef(a_.x, a_.dtype, a_.residual, b, e, kNoCandidates, &dummy_b, &dummy_i, 0);
    });
    to_residual_view();
  }

  // Collects entries with key >= t into per-thread slices of the workspace.
  void collect(uint32_t t, const std::vector<int64_t>& caps, bool fused) {
    off_.assign(size_t(nt_) + 1, 0);
    for (int i = 0; i < nt_; ++i) off_[i + 1] = off_[i] + caps[i];
    cap_ = caps;
    found_.assign(size_t(nt_), 0);
    Buffers& buf = workspace(off_[nt_]);
    bits_ = buf.bits.get();
    idx_ = buf.idx.get();
    parallel(nt_, [&](int i) {
      int64_t b, e;
      range(i, &b, &e);
      uint32_t* ob = bits_ + off_[i];
      int64_t* oi = idx_ + off_[i];
      int64_t f;
      if (fused)
        f = kern_->collect_ef(a_.x, a_.dtype, a_.residual, b, e, t, ob, oi, cap_[i]);
      else if (u16_)
        f = kern_->collect_u16(static_cast<const uint16_t*>(src_), b, e, t, ob, oi, cap_[i]);
      else
        f = kern_->collect_u32(static_cast<const uint32_t*>(src_), b, e, t, ob, oi, cap_[i]);
      found_[i] = f;
    });
  }
  int64_t stored(int i) const { return std::min(found_[i], cap_[i]); }
  int64_t stored_total() const {
    int64_t s = 0;
    for (int i = 0; i < nt_; ++i) s += stored(i);
    return s;
  }
  bool overflowed() const {
    for (int i = 0; i < nt_; ++i)
      if (found_[i] > cap_[i]) return true;
    return false;
  }

  Buffers& workspace(int64_t n) {
    if (n <= kKeepEntries) {
      thread_local Buffers kept;
      kept.ensure(n);
      return kept;
    }
    big_.ensure(n);
    return big_;
  }

  // Threshold whose pass count is >= k unless the sample is off by more than
  // z standard deviations; `expected` is the count it should admit. 0: none.
  uint32_t sample_threshold(double z, double c, int64_t* expected) const {
    // Whole cache lines at pseudo-random places: one memory access per 16
    // sampled keys instead of one per key.
    const int64_t m = std::min(kSampleSize, a_.n / 2) / kSampleRun * kSampleRun;
    const int64_t runs = m / kSampleRun;
    const int64_t stride = a_.n / runs;
    std::vector<uint32_t> keys(static_cast<size_t>(m));
    for (int64_t j = 0; j < runs; ++j) {
      const int64_t slack = stride - kSampleRun + 1;
      const int64_t start =
          (j * stride + int64_t(splitmix64_mix(uint64_t(j)) % uint64_t(slack))) & ~int64_t(15);
      for (int64_t q = 0; q < kSampleRun; ++q) keys[j * kSampleRun + q] = key_at(start + q);
    }
    const double e = double(a_.k) * double(m) / double(a_.n);
    const int64_t r = int64_t(e + z * std::sqrt(e) + c);
    if (r >= m) return 0;
    std::nth_element(keys.begin(), keys.begin() + r, keys.end(), std::greater<uint32_t>());
    *expected = (r + 1) * (a_.n / m + 1);
    return std::max<uint32_t>(keys[r], 1u);  // t = 0 would admit everything
  }

  // Per-thread histograms of key digit (key >> shift) & (2^d - 1) over the
  // entries whose higher bits equal `prefix`.
  std::vector<int64_t> digit_histograms(int shift, int d, uint32_t prefix) const {
    const size_t bins = size_t(1) << d;
    std::vector<int64_t> hist(size_t(nt_) * bins, 0);
    const uint32_t mask = key_mask(), digit = uint32_t(bins - 1);
    parallel(nt_, [&](int i) {
      int64_t b, e;
      range(i, &b, &e);
      int64_t* h = hist.data() + size_t(i) * bins;
      auto count = [&](const auto* p) {
        for (int64_t j = b; j < e; ++j) {
          const uint32_t key = p[j] & mask;
          if ((uint64_t(key) >> (shift + d)) == prefix) ++h[(key >> shift) & digit];
        }
      };
      if (u16_)
        count(static_cast<const uint16_t*>(src_));
      else
        count(static_cast<const uint32_t*>(src_));
    });
    return hist;
  }

  // Picks the bin of the k-th key from per-thread histograms; adds each
  // thread's count above that bin to greater[i].
  uint32_t pick_bin_threads(const std::vector<int64_t>& hist, int d, int64_t* total_greater,
                            std::vector<int64_t>* greater) const {
    const size_t bins = size_t(1) << d;
    std::vector<int64_t> sum(bins, 0);
    for (int i = 0; i < nt_; ++i)
      for (size_t b = 0; b < bins; ++b) sum[b] += hist[size_t(i) * bins + b];
    const uint32_t bin = pick_bin(sum, d, total_greater);
    for (int i = 0; i < nt_; ++i)
      for (size_t b = bin + 1; b < bins; ++b) (*greater)[i] += hist[size_t(i) * bins + b];
    return bin;
  }

  // Histogram select over all of the data. When the bin of the k-th key is
  // small, its members go through the candidate path; when it is large (many
  // ties), further digits find the exact k-th key and one more pass emits
  // straight from the data, so memory stays O(k) whatever the input.
  void exact_fallback() {
    std::vector<int64_t> greater(size_t(nt_), 0);
    int64_t total_greater = 0;
    int remaining = key_bits();
    int d = std::min(kHistBits, remaining);
    int shift = remaining - d;
    auto hist = digit_histograms(shift, d, 0);
    uint32_t prefix = pick_bin_threads(hist, d, &total_greater, &greater);
    std::vector<int64_t> caps(size_t(nt_), 0);
    int64_t cands = 0;
    for (int i = 0; i < nt_; ++i) {
      caps[i] = greater[i] + hist[size_t(i) * (size_t(1) << d) + prefix];
      cands += caps[i];
    }
    if (cands <= 2 * a_.k + (int64_t(1) << 20)) {
      collect(prefix << shift, caps, /*fused=*/false);
      return select_and_emit();
    }
    std::vector<int64_t> eq(size_t(nt_), 0);
    for (int i = 0; i < nt_; ++i) eq[i] = hist[size_t(i) * (size_t(1) << d) + prefix];
    for (remaining = shift; remaining > 0; remaining = shift) {
      d = std::min(kHistBits, remaining);
      shift = remaining - d;
      hist = digit_histograms(shift, d, prefix);
      const uint32_t bin = pick_bin_threads(hist, d, &total_greater, &greater);
      prefix = (prefix << d) | bin;
      for (int i = 0; i < nt_; ++i) eq[i] = hist[size_t(i) * (size_t(1) << d) + bin];
    }
    emit_from_data(prefix, total_greater, greater, eq);
  }

  // Where each thread's slice starts in the output, and how many of its keys
  // equal to the k-th it takes: ties go to the lowest indices, and slices are
  // in index order.
  void emission_offsets(const std::vector<int64_t>& gt, const std::vector<int64_t>& eq,
                        int64_t need, std::vector<int64_t>* out, std::vector<int64_t>* ties) const {
    out->assign(size_t(nt_), 0);
    ties->assign(size_t(nt_), 0);
    int64_t g_before = 0, q_before = 0;
    for (int i = 0; i < nt_; ++i) {
      (*out)[i] = g_before + std::min(q_before, need);
      (*ties)[i] = std::max<int64_t>(0, std::min(eq[i], need - q_before));
      g_before += gt[i];
      q_before += eq[i];
    }
  }

  void emit_from_data(uint32_t kth, int64_t total_greater, const std::vector<int64_t>& gt,
                      const std::vector<int64_t>& eq) {
    const int64_t need = a_.k - total_greater;
    std::vector<int64_t> out, ties;
    emission_offsets(gt, eq, need, &out, &ties);
    const uint32_t mask = key_mask();
    parallel(nt_, [&](int i) {
      int64_t b, e, o = out[i], t = ties[i];
      range(i, &b, &e);
      for (int64_t j = b; j < e; ++j) {
        const uint32_t bits = raw_bits(j), key = bits & mask;
        if (key > kth || (key == kth && t-- > 0)) write(o++, bits, j);
      }
    });
  }

  // --- selection among the candidates -----------------------------------------
  template <class F>
  void for_each_candidate(F f) const {
    for (int i = 0; i < nt_; ++i)
      for (int64_t j = off_[i], e = off_[i] + stored(i); j < e; ++j) f(bits_[j], idx_[j]);
  }

  // Radix select: the k-th largest key among the candidates, and how many
  // candidates are strictly larger. After the first digit only the keys in
  // the chosen bin are kept, so later digits scan few.
  void kth_key(uint32_t* key_out, int64_t* greater_out) const {
    const uint32_t mask = key_mask();
    // A wide first digit spreads the candidates (which share their top bits)
    // over many bins: counting into few bins serialises on store forwarding.
    int remaining = key_bits();
    int d = std::min(kFirstDigitBits, remaining);
    int shift = remaining - d;
    // Reused across calls: a fresh 512 KiB table costs more in page faults
    // than the counting.
    thread_local std::vector<int64_t> hist;
    hist.assign(size_t(1) << d, 0);
    for_each_candidate([&](uint32_t bits, int64_t) { ++hist[(bits & mask) >> shift]; });
    int64_t greater = 0;
    uint32_t bin = pick_bin(hist, d, &greater);
    uint32_t prefix = bin;
    std::vector<uint32_t> keys;
    keys.reserve(size_t(hist[bin]));
    for_each_candidate([&](uint32_t bits, int64_t) {
      const uint32_t key = bits & mask;
      if ((key >> shift) == bin) keys.push_back(key);
    });
    remaining = shift;
    while (remaining > 0) {
      d = std::min(kHistBits, remaining);
      shift = remaining - d;
      hist.assign(size_t(1) << d, 0);
      const uint32_t digit_mask = (1u << d) - 1u;
      for (uint32_t key : keys) ++hist[(key >> shift) & digit_mask];
      bin = pick_bin(hist, d, &greater);
      prefix = (prefix << d) | bin;
      size_t kept = 0;
      for (uint32_t key : keys)
        if (((key >> shift) & digit_mask) == bin) keys[kept++] = key;
      keys.resize(kept);
      remaining = shift;
    }
    *key_out = prefix;
    *greater_out = greater;
  }

  // The highest bin b with greater + count(bins >= b) >= k; adds the counts
  // of the bins above b to greater.
  uint32_t pick_bin(const std::vector<int64_t>& hist, int d, int64_t* greater) const {
    int bin = (1 << d) - 1;
    for (; bin > 0; --bin) {
      if (*greater + hist[bin] >= a_.k) break;
      *greater += hist[bin];
    }
    return uint32_t(bin);
  }

  // Writes output slot o from an entry's bits (x's bits, or y's after the
  // error-feedback pass) and settles its residual.
  void write(int64_t o, uint32_t bits, int64_t index) const {
    a_.indices[o] = index;
    if (!ef_) {
      if (u16_)
        static_cast<uint16_t*>(a_.values)[o] = uint16_t(bits);
      else
        static_cast<uint32_t*>(a_.values)[o] = bits;
      return;
    }
    const float y = bits_to_f32(bits);
    float sent = y;
    // A finite y past the 16-bit type's range is sent saturated (its largest
    // finite value, signed) and the excess stays in the residual (topk.h).
    switch (a_.dtype) {
      case DType::f16: {
        uint16_t h = f32_to_f16(y);
        if ((h & 0x7fffu) == 0x7c00u && std::isfinite(y)) h = uint16_t((h & 0x8000u) | 0x7bffu);
        static_cast<uint16_t*>(a_.values)[o] = h;
        sent = f16_to_f32(h);
        break;
      }
      case DType::bf16: {
        uint16_t h = f32_to_bf16(y);
        if ((h & 0x7fffu) == 0x7f80u && std::isfinite(y)) h = uint16_t((h & 0x8000u) | 0x7f7fu);
        static_cast<uint16_t*>(a_.values)[o] = h;
        sent = bf16_to_f32(h);
        break;
      }
      default:
        static_cast<uint32_t*>(a_.values)[o] = bits;
    }
    // The remainder keeps what rounding (or saturating) to x's dtype lost; a
    // y that is itself inf or NaN leaves nothing meaningful to keep.
    a_.residual[index] = (std::isfinite(sent) && std::isfinite(y)) ? y - sent : 0.0f;
  }

  // Emits keys > kth and the first k - greater keys == kth (by index). Each
  // thread emits its own slice of candidates at an offset known from a count.
  void select_and_emit() {
    uint32_t kth;
    int64_t greater;
    kth_key(&kth, &greater);
    const uint32_t mask = key_mask();
    std::vector<int64_t> gt(size_t(nt_), 0), eq(size_t(nt_), 0);
    parallel(nt_, [&](int i) {
      int64_t g = 0, q = 0;
      for (int64_t j = off_[i], e = off_[i] + stored(i); j < e; ++j) {
        const uint32_t key = bits_[j] & mask;
        g += key > kth;
        q += key == kth;
      }
      gt[i] = g;
      eq[i] = q;
    });
    const int64_t need = a_.k - greater;
    std::vector<int64_t> out, ties;
    emission_offsets(gt, eq, need, &out, &ties);
    parallel(nt_, [&](int i) {
      int64_t o = out[i], t = ties[i];
      for (int64_t j = off_[i], e = off_[i] + stored(i); j < e; ++j) {
        const uint32_t key = bits_[j] & mask;
        if (key > kth || (key == kth && t-- > 0)) write(o++, bits_[j], idx_[j]);
      }
    });
  }

  void emit_all() {
    const int nt = nt_;
    parallel(nt, [&](int t) {
      int64_t b, e;
      range(t, &b, &e);
      for (int64_t i = b; i < e; ++i) {
        const uint32_t bits =
            ef_ ? f32_to_bits(to_f32(a_.x, a_.dtype, i) + a_.residual[i]) : raw_bits(i);
        write(i, bits, i);
      }
    });
  }

  const Args& a_;
  const ScanKernels* kern_;
  const bool ef_;
  bool fused_ = false;
  bool u16_ = false;
  const void* src_ = nullptr;
  int nt_ = 1;
  std::vector<int64_t> off_, cap_, found_;
  uint32_t* bits_ = nullptr;
  int64_t* idx_ = nullptr;
  Buffers big_;
};

}  // namespace

void sparsify_cpu(const Args& args) {
  check_args(args);
  if (args.n == 0) return;
  Selector(args).run();
}

}  // namespace topk
}  // namespace pk
