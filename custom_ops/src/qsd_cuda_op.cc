// Registration of QsdMatMul for the CUDAExecutionProvider.
#include <string>

#include "qsd_common.h"
#include "qsd_cuda.h"
#include "qsd_op_base.h"

namespace qsd {
namespace {

OrtStatus* ComputeOnCuda(const KernelState& state, OrtKernelContext* ctx) {
  const OrtApi& api = *state.api;
  Problem p;
  OrtStatus* st = BindProblem(api, ctx, state.attrs, &p);
  if (st != nullptr) return st;
  void* stream = nullptr;
  st = api.KernelContext_GetGPUComputeStream(ctx, &stream);
  if (st != nullptr) return st;
  const std::string err = LaunchCuda(p, stream);
  if (!err.empty()) return api.CreateStatus(ORT_EP_FAIL, err.c_str());
  return nullptr;
}

}  // namespace

const QsdOp& CudaOp() {
  static const QsdOp op("CUDAExecutionProvider", &ComputeOnCuda);
  return op;
}

}  // namespace qsd
