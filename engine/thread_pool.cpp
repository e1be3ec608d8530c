// The kernels' own thread pool: `agentrt::parallel_for`, in place of at::parallel_for (OpenMP).
//
// Why not OpenMP: libgomp keeps one team per thread that opens parallel regions, and once its threads
// outnumber the CPUs (the main thread's team from loading the model, plus the serving loop thread's) it
// stops spinning between regions (100 spins), so each of the few hundred regions of a step waits a
// futex wake-up. The same decode step of SmolLM2-135M on 2 cores took ~7 ms from the main thread and
// ~11-12 ms from any other thread, which is where `LocalLLM` and `agentrt serve` run it.
//
// This pool has workers of its own for whichever thread calls it. A worker spins (pause) for up to
// kSpinNs after its last task, so the regions of one step follow each other without wake-ups, then
// sleeps on a condition variable, so a pool that is not in use costs no CPU. One call at a time uses
// the workers; a call made while another holds them (another engine in another thread) runs inline.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AGENTRT_PAUSE() _mm_pause()
#else
#define AGENTRT_PAUSE() ((void)0)
#endif

namespace agentrt {
namespace {

constexpr int64_t kSpinNs = 200000;  // a worker's busy wait for the next task before it sleeps

using Clock = std::chrono::steady_clock;

struct Pool {
  std::mutex busy;  // held by the call that is using the workers
  std::mutex m;     // guards sleeping / the condition variable
  std::condition_variable cv;
  std::atomic<uint64_t> epoch{0};    // bumped for each task handed out
  std::atomic<int64_t> pending{0};   // workers still running the current task
  std::atomic<int64_t> sleeping{0};
  std::vector<std::thread> workers;  // detached: the pool is never destroyed (see `pool`)
  // the current task: worker w (1-based) runs chunk w of `chunks`
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t begin = 0, end = 0, chunk = 0, chunks = 0;
  std::exception_ptr error;
  std::mutex error_m;

  void run_chunk(int64_t c) {
    const int64_t b = begin + c * chunk, e = std::min(end, b + chunk);
    if (b >= e) return;
    try {
      (*fn)(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> g(error_m);
      if (!error) error = std::current_exception();
    }
  }

  void worker(int64_t index, uint64_t seen) {  // seen: the epoch when it was started (its first task is the next)
    for (;;) {
      const auto spin_until = Clock::now() + std::chrono::nanoseconds(kSpinNs);
      uint64_t now;
      for (int i = 0; (now = epoch.load(std::memory_order_acquire)) == seen; ++i) {
        AGENTRT_PAUSE();
        if ((i & 255) == 255 && Clock::now() > spin_until) {
          std::unique_lock<std::mutex> lk(m);
          sleeping.fetch_add(1);
          cv.wait(lk, [&] { return epoch.load() != seen; });
          sleeping.fetch_sub(1);
        }
      }
      seen = now;
      if (index < chunks) run_chunk(index);
      pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Runs fn over [b, e) in up to n chunks (n - 1 workers and this thread); the caller holds `busy`.
  void run(int64_t b, int64_t e, int64_t n, const std::function<void(int64_t, int64_t)>& f) {
    while (int64_t(workers.size()) < n - 1) {
      const int64_t index = int64_t(workers.size()) + 1;
      workers.emplace_back([this, index, now = epoch.load()] { worker(index, now); });
      workers.back().detach();
    }
    fn = &f;
    begin = b;
    end = e;
    chunks = n;
    chunk = (e - b + n - 1) / n;
    error = nullptr;
    pending.store(int64_t(workers.size()), std::memory_order_relaxed);
    epoch.fetch_add(1);  // publishes the task; seq_cst with `sleeping`, so a worker going to sleep sees it or is woken
    if (sleeping.load() > 0) {
      std::lock_guard<std::mutex> g(m);
      cv.notify_all();
    }
    run_chunk(0);
    while (pending.load(std::memory_order_acquire) > 0) AGENTRT_PAUSE();
    if (error) std::rethrow_exception(error);
  }
};

std::atomic<Pool*> g_pool{nullptr};
std::atomic<int64_t> g_threads{0};  // 0: torch's intra-op count
std::once_flag g_atfork;

Pool& pool() {
  // Never destroyed: workers may still be waiting at exit (the OS ends them). A forked child has the
  // parent's pool without its threads, so it starts a new one.
  std::call_once(g_atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
  Pool* p = g_pool.load();
  if (p == nullptr) {
    Pool* fresh = new Pool;
    if (g_pool.compare_exchange_strong(p, fresh)) p = fresh;
    else delete fresh;
  }
  return *p;
}

}  // namespace

int64_t num_threads() {
  const int64_t n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : std::max<int64_t>(1, at::get_num_threads());
}

int64_t set_num_threads(int64_t n) { return g_threads.exchange(std::max<int64_t>(0, n)); }

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  if (begin >= end) return;
  const int64_t n = std::min<int64_t>(num_threads(),
                                      (end - begin + std::max<int64_t>(1, grain) - 1) / std::max<int64_t>(1, grain));
  if (n <= 1) return f(begin, end);
  Pool& p = pool();
  std::unique_lock<std::mutex> lk(p.busy, std::try_to_lock);
  if (!lk.owns_lock()) return f(begin, end);  // the workers serve another call (or this is inside one)
  p.run(begin, end, n, f);
}

}  // namespace agentrt
