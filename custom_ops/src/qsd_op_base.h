// OrtCustomOp definition shared by the CPU and the CUDA registration of
// QsdMatMul; only the execution provider and the compute function differ.
#pragma once

#include "qsd_common.h"
#include "qsd_cpu.h"

namespace qsd {

struct KernelState;

using ComputeFn = OrtStatus* (*)(const KernelState& state, OrtKernelContext* ctx);

struct KernelState {
  const OrtApi* api = nullptr;
  Attributes attrs;
  ComputeFn compute = nullptr;
  CpuPrepacked cpu;  // CPU kernel only
};

struct QsdOp : OrtCustomOp {
  QsdOp(const char* provider, ComputeFn compute);
  const char* provider_;
  ComputeFn compute_;
};

#if defined(QSD_WITH_CUDA)
// Defined in qsd_cuda_op.cc.
const QsdOp& CudaOp();
#endif

}  // namespace qsd
