// CPU only: one at::parallel_for over a list of work items of uneven sizes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lorambo {

// Below this many elements in total the op runs on the calling thread (a parallel region costs
// a few microseconds, about what 64k elements of a dot product take on one core).
constexpr int64_t kSerialBelow = 1 << 16;

// Run fn(item_index) for every item, splitting items into contiguous groups of about equal
// total weight, one group per thread.
template <typename Weight, typename Fn>
void parallel_items(int64_t count, Weight weight, Fn fn) {
  if (count == 0) return;
  std::vector<int64_t> cum(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) cum[i + 1] = cum[i] + std::max<int64_t>(weight(i), 1);
  const int64_t total = cum[count];
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / kSerialBelow));
  if (parts <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::vector<int64_t> bounds(parts + 1, count);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    bounds[p] = std::lower_bound(cum.begin(), cum.end(), total * p / parts) - cum.begin();
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t i = bounds[p]; i < bounds[p + 1]; ++i) fn(i);
  });
}

}  // namespace lorambo
