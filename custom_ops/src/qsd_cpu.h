// CPU implementation of QsdMatMul.
#pragma once

#include <cstddef>
#include <functional>

#include "qsd_common.h"

namespace qsd {

// Runs fn(i) for every i in [0, n), possibly concurrently.
class ParallelRunner {
 public:
  virtual ~ParallelRunner() = default;
  virtual void For(size_t n, const std::function<void(size_t)>& fn) const = 0;
};

// Computes p.y from the bound operands. All pointers refer to host memory.
void ComputeCpu(const Problem& p, const ParallelRunner& par);

}  // namespace qsd
