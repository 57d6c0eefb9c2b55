// The threads behind parallel.h.
//
// The extension links no OpenMP runtime. A parallel call runs on the one
// torch already loaded (libgomp, or libomp/libiomp5, which export the same
// GOMP_parallel entry point), found among the loaded objects at first use:
// its worker threads are warm from torch's own ops, and a second pool next
// to them loses the cores they spin on (measured 1.08-1.6x slower, equal
// once their spinning was switched off). Where no runtime is loaded, and in
// a forked child (the runtime's threads did not survive the fork, and
// calling into it hangs), a small pool of our own runs the call instead.
// PYKERNELS_THREADING=pool|openmp|serial overrides the choice (tests).
#include "parallel.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pk {

namespace {

// 0: not set by set_max_threads (use the environment / the CPU count).
std::atomic<int> g_threads{0};

int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);  // "4,2" (nested lists) reads as 4
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? int(hw) : 1;
}

// ---- an OpenMP runtime already in the process --------------------------------

struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  std::string path;
};

bool is_openmp_runtime(const char* path) {
  const char* base = std::strrchr(path, '/');
  base = base ? base + 1 : path;
  return std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp5", 8) == 0 ||
         std::strncmp(base, "libomp.", 7) == 0 || std::strncmp(base, "libomp-", 7) == 0;
}

int find_loaded(struct dl_phdr_info* info, size_t, void* out) {
  if (info->dlpi_name && info->dlpi_name[0] && is_openmp_runtime(info->dlpi_name)) {
    *static_cast<std::string*>(out) = info->dlpi_name;
    return 1;
  }
  return 0;
}

// The runtime's entry points, or an empty struct when none is loaded.
OpenMP load_openmp() {
  OpenMP rt;
  std::string path;
  dl_iterate_phdr(find_loaded, &path);
  if (path.empty()) return rt;
  // RTLD_NOLOAD: a handle on the copy already in the process, never a new one.
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!h) return rt;
  rt.parallel =
      reinterpret_cast<decltype(rt.parallel)>(dlsym(h, "GOMP_parallel"));  // GCC >= 4.9 ABI
  rt.thread_num = reinterpret_cast<int (*)()>(dlsym(h, "omp_get_thread_num"));
  rt.num_threads = reinterpret_cast<int (*)()>(dlsym(h, "omp_get_num_threads"));
  if (!rt.parallel || !rt.thread_num || !rt.num_threads) return OpenMP();
  rt.path = path;
  return rt;
}

struct Region {
  void (*fn)(void*, int);
  void* ctx;
  int nt;
  const OpenMP* rt;
};

// Every t in [0, nt) runs once, whatever team size the runtime grants.
void region_body(void* p) {
  const Region* r = static_cast<const Region*>(p);
  const int team = r->rt->num_threads();
  for (int t = r->rt->thread_num(); t < r->nt; t += team) r->fn(r->ctx, t);
}

// ---- our own pool --------------------------------------------------------------

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// Workers spin this long for the next call before they sleep.
constexpr auto kSpin = std::chrono::microseconds(50);

// One call at a time runs on the pool (run_mu_). The call is published like
// a seqlock: the generation is odd while fn/ctx/nt are written and even once
// they are, and a worker re-reads the generation after taking its copy, so
// it never mixes two calls. The caller waits for every participant, so a
// participant's copy stays valid until it is done.
class Pool {
 public:
  // Runs the call on the pool, or returns false when it is busy.
  bool try_run(int nt, void (*fn)(void*, int), void* ctx) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(nt - 1);
    const uint64_t g = generation_.load(std::memory_order_relaxed);
    generation_.store(g + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    nt_.store(nt, std::memory_order_relaxed);
    remaining_.store(nt - 1, std::memory_order_relaxed);
    generation_.store(g + 2, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    fn(ctx, 0);
    for (unsigned spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4096)
        cpu_relax();
      else
        std::this_thread::yield();
    }
    return true;
  }

  // Held across fork() so that no call is half-dispatched in the child.
  std::mutex& run_mutex() { return run_mu_; }

 private:
  // Called before a call is published: a new worker starts from the current
  // generation, so the call about to be published is the first it takes.
  void grow(int workers) {
    const uint64_t now = generation_.load(std::memory_order_relaxed);
    while (int(threads_.size()) < workers) {
      const int index = int(threads_.size()) + 1;
      threads_.emplace_back([this, index, now] { work(index, now); });
      threads_.back().detach();  // never joined: the pool lives as long as the process
    }
  }

  // A new, fully published call: even and not the one seen last.
  static bool fresh(uint64_t g, uint64_t seen) { return g != seen && (g & 1) == 0; }

  void work(int index, uint64_t seen) {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      unsigned spins = 0;
      while (!fresh(generation_.load(std::memory_order_acquire), seen)) {
        cpu_relax();
        if ((++spins & 255) == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(sleep_mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock,
                     [&] { return fresh(generation_.load(std::memory_order_seq_cst), seen); });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          spins = 0;
        }
      }
      const uint64_t g = generation_.load(std::memory_order_acquire);
      auto* fn = fn_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      const int nt = nt_.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (generation_.load(std::memory_order_relaxed) != g || !fresh(g, seen)) continue;
      seen = g;
      if (index < nt) {
        fn(ctx, index);
        remaining_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex run_mu_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<void (*)(void*, int)> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> nt_{0};
};

// ---- which one runs a call -------------------------------------------------------

enum class Mode { unset, openmp, pool, serial };

struct State {
  std::atomic<Mode> mode{Mode::unset};
  std::atomic<bool> forked{false};  // a fork()ed child: its OpenMP runtime has no threads
  OpenMP openmp;
  std::atomic<Pool*> pool{nullptr};  // never destroyed: workers may wait at exit
  std::mutex mu;                     // guards choosing the mode and making the pool
};

State& state() {
  static State* s = new State();  // never destroyed, as the pool
  return *s;
}

void before_fork() {
  State& s = state();
  s.mu.lock();
  if (Pool* p = s.pool.load()) p->run_mutex().lock();
}
void after_fork_parent() {
  State& s = state();
  if (Pool* p = s.pool.load()) p->run_mutex().unlock();
  s.mu.unlock();
}
void after_fork_child() {
  // The parent's pool threads and the OpenMP runtime's threads are gone; a
  // GOMP call would wait for them forever. Leave both; a fresh pool runs
  // this process's calls.
  State& s = state();
  s.pool.store(nullptr);
  s.forked.store(true);
  if (s.mode.load() == Mode::openmp) s.mode.store(Mode::pool);
  new (&s.mu) std::mutex();
}

// At load, so that a fork before the first parallel call is seen too.
const bool g_fork_handlers = pthread_atfork(before_fork, after_fork_parent, after_fork_child) == 0;

Mode choose_mode(State& s) {
  const char* env = std::getenv("PYKERNELS_THREADING");
  const std::string want = env ? env : "auto";
  if (want == "serial") return Mode::serial;
  if (want != "pool" && !s.forked.load()) {
    s.openmp = load_openmp();
    if (s.openmp.parallel) return Mode::openmp;
  }
  return Mode::pool;
}

Mode mode() {
  State& s = state();
  Mode m = s.mode.load(std::memory_order_acquire);
  if (m != Mode::unset) return m;
  std::lock_guard<std::mutex> lock(s.mu);
  (void)g_fork_handlers;
  m = s.mode.load();
  if (m == Mode::unset) {
    m = choose_mode(s);
    s.mode.store(m, std::memory_order_release);
  }
  return m;
}

Pool* pool() {
  State& s = state();
  Pool* p = s.pool.load(std::memory_order_acquire);
  if (p) return p;
  std::lock_guard<std::mutex> lock(s.mu);
  p = s.pool.load();
  if (!p) {
    p = new Pool();
    s.pool.store(p, std::memory_order_release);
  }
  return p;
}

}  // namespace

int max_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  static const int d = default_threads();
  return d;
}

void set_max_threads(int n) { g_threads.store(std::max(1, n), std::memory_order_relaxed); }

std::string threading_name() {
  switch (mode()) {
    case Mode::openmp:
      return "openmp (" + state().openmp.path + ")";
    case Mode::pool:
      return "pool";
    default:
      return "serial";
  }
}

void run_parallel(int nt, void (*fn)(void*, int), void* ctx) {
  if (nt > 1) {
    switch (mode()) {
      case Mode::openmp: {
        Region r{fn, ctx, nt, &state().openmp};
        state().openmp.parallel(region_body, &r, unsigned(nt), 0);
        return;
      }
      case Mode::pool:
        if (pool()->try_run(nt, fn, ctx)) return;
        break;  // busy (another thread's call, or a call from a task): run here
      default:
        break;
    }
  }
  for (int t = 0; t < std::max(nt, 1); ++t) fn(ctx, t);
}

}  // namespace pk
