// Work sharing on XLA's intra-op thread pool for ktjax's CPU kernels (matmul.cc, attention.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ktjax_pool {

using ktjax_simd::spin_pause;

// Items [0, items) taken in turn from an atomic counter by the calling thread and by up to threads - 1 helpers on
// a pool (XLA's intra-op pool, or any with num_threads() and Schedule(fn)). The call returns when every item is done: the calling thread takes items until none is left,
// then waits only for items already running elsewhere, never for a helper that has not woken up. (Returning a
// future that another thread completes left the rest of the step idle for 0.1-0.35 ms per call:
// benchmarks/log/2026.md, "Integer activations".)
template <typename Pool, typename F>
void run_items(Pool pool, int64_t items, int64_t threads, F item) {
  threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), std::min(items, threads)));
  if (threads == 1) {
    for (int64_t i = 0; i < items; ++i) item(i);
    return;
  }
  struct Counts {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counts = std::make_shared<Counts>();  // a helper may wake up after the call has returned
  auto work = [counts, item, items]() {
    for (int64_t i = counts->next++; i < items; i = counts->next++) {
      item(i);
      counts->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([work]() { work(); });
  work();
  while (counts->done.load(std::memory_order_acquire) < items) spin_pause();
}

}  // namespace ktjax_pool
