// CPU implementation of QsdMatMul.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "qsd_common.h"

namespace qsd {

// Runs fn(i) for every i in [0, n), possibly concurrently.
class ParallelRunner {
 public:
  virtual ~ParallelRunner() = default;
  virtual void For(size_t n, const std::function<void(size_t)>& fn) const = 0;
};

struct Int8Weights;  // qsd_cpu_int8.h

// Weights decoded once when the kernel is created (constant inputs).
struct CpuPrepacked {
  std::shared_ptr<const Int8Weights> q, l, r;  // int8 product tiles, or empty
};

// Computes p.y from the bound operands. All pointers refer to host memory.
void ComputeCpu(const Problem& p, const ParallelRunner& par, const CpuPrepacked* pre = nullptr);

// With attrs.act_int8, decodes the constant quantized inputs that take the
// int8 product. Inputs that are not constant (or malformed) are left out and
// decoded at every call instead.
void PrepackCpu(const OrtApi& api, const OrtKernelInfo* info, const Attributes& attrs,
                CpuPrepacked* out);

}  // namespace qsd
