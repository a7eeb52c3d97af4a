// Splitting a call's images over XLA's CPU thread pool, shared by conv_cpu.cc and conv_onednn.cc.

#ifndef COMPAX_KERNELS_IMAGE_RANGES_H_
#define COMPAX_KERNELS_IMAGE_RANGES_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace compax {

namespace ffi = xla::ffi;

// Runs fn(member, chunk, b0, b1) over `chunks` fixed ranges of the batch of each of `members`
// members, on the calling thread and on XLA's intra-op thread pool. Whoever is free takes the next
// (member, range), and the caller waits only for pieces already being run elsewhere, so a busy
// pool cannot deadlock it. The ranges depend on the batch alone: partial sums per range make
// results independent of the scheduling.
template <typename Fn>
void ForImageRanges(ffi::ThreadPool& pool, int64_t members, int64_t batch, int64_t chunks, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  const int64_t pieces = members * chunks;
  auto state = std::make_shared<State>();
  auto work = [state, batch, chunks, pieces, fn] {
    for (int64_t k; (k = state->next.fetch_add(1)) < pieces; state->done.fetch_add(1)) {
      const int64_t member = k / chunks, chunk = k % chunks;
      fn(member, chunk, batch * chunk / chunks, batch * (chunk + 1) / chunks);
    }
  };
  for (int64_t t = 1; t < std::min<int64_t>(pieces, pool.num_threads()); ++t)
    pool.Schedule(decltype(work)(work));  // a copy: Schedule takes ownership of an rvalue
  work();
  while (state->done.load() < pieces) std::this_thread::yield();
}

// Ranges of the batch: one per thread of the pool (at least one, at most one per image).
inline int64_t Chunks(ffi::ThreadPool& pool, int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, pool.num_threads()));
}

}  // namespace compax

#endif  // COMPAX_KERNELS_IMAGE_RANGES_H_
