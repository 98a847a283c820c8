// Library entry point: registers qsdonnx::QsdMatMul (CPU, and CUDA when built
// with QSD_WITH_CUDA) with an ONNX Runtime session.
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "qsd_common.h"
#include "qsd_cpu.h"
#include "qsd_op_base.h"

namespace qsd {
namespace {

const char* ORT_API_CALL GetName(const OrtCustomOp*) { return kOpName; }

const char* ORT_API_CALL GetProvider(const OrtCustomOp* op) {
  return static_cast<const QsdOp*>(op)->provider_;
}

size_t ORT_API_CALL GetInputTypeCount(const OrtCustomOp*) { return kNumInputs; }

ONNXTensorElementDataType ORT_API_CALL GetInputTypeFn(const OrtCustomOp*, size_t index) {
  return InputType(index);
}

size_t ORT_API_CALL GetOutputTypeCount(const OrtCustomOp*) { return 1; }

ONNXTensorElementDataType ORT_API_CALL GetOutputType(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL GetInputCharacteristic(const OrtCustomOp*,
                                                                         size_t index) {
  return index == kX ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL GetOutputCharacteristic(const OrtCustomOp*,
                                                                          size_t) {
  return INPUT_OUTPUT_REQUIRED;
}

OrtMemType ORT_API_CALL GetInputMemoryType(const OrtCustomOp*, size_t) {
  return OrtMemTypeDefault;
}

int ORT_API_CALL GetVariadicMinArity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL GetVariadicHomogeneity(const OrtCustomOp*) { return 1; }

OrtStatusPtr ORT_API_CALL CreateKernelV2(const OrtCustomOp* op, const OrtApi* api,
                                         const OrtKernelInfo* info, void** kernel) {
  try {
    std::unique_ptr<KernelState> state(new KernelState());
    state->api = api;
    state->compute = static_cast<const QsdOp*>(op)->compute_;
    OrtStatus* st = ReadAttributes(*api, info, &state->attrs);
    if (st != nullptr) return st;
    if (static_cast<const QsdOp*>(op)->provider_ == nullptr) {
      PrepackCpu(*api, info, state->attrs, &state->cpu);
    }
    *kernel = state.release();
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

void ORT_API_CALL KernelDestroy(void* kernel) { delete static_cast<KernelState*>(kernel); }

int ORT_API_CALL GetStartVersion(const OrtCustomOp*) { return kOpVersion; }
int ORT_API_CALL GetEndVersion(const OrtCustomOp*) { return kOpVersion; }

class OrtParallel : public ParallelRunner {
 public:
  OrtParallel(const OrtApi& api, const OrtKernelContext* ctx) : api_(api), ctx_(ctx) {}

  void For(size_t n, const std::function<void(size_t)>& fn) const override {
    if (n == 0) return;
    if (n == 1) {
      fn(0);
      return;
    }
    OrtStatus* st = api_.KernelContext_ParallelFor(ctx_, &Trampoline, n, 0,
                                                   const_cast<std::function<void(size_t)>*>(&fn));
    if (st != nullptr) {
      // No thread pool available: run the items on the calling thread.
      api_.ReleaseStatus(st);
      for (size_t i = 0; i < n; ++i) fn(i);
    }
  }

 private:
  static void Trampoline(void* data, size_t i) {
    (*static_cast<const std::function<void(size_t)>*>(data))(i);
  }
  const OrtApi& api_;
  const OrtKernelContext* ctx_;
};

OrtStatus* ComputeOnCpu(const KernelState& state, OrtKernelContext* ctx) {
  const OrtApi& api = *state.api;
  Problem p;
  OrtStatus* st = BindProblem(api, ctx, state.attrs, &p);
  if (st != nullptr) return st;
  st = CheckSparseHost(api, p.s);
  if (st != nullptr) return st;
  OrtParallel par(api, ctx);
  ComputeCpu(p, par, &state.cpu);
  return nullptr;
}

OrtStatusPtr ORT_API_CALL KernelComputeV2(void* kernel, OrtKernelContext* ctx) {
  const KernelState& state = *static_cast<const KernelState*>(kernel);
  try {
    return state.compute(state, ctx);
  } catch (const std::exception& e) {
    return state.api->CreateStatus(ORT_FAIL, (std::string("QsdMatMul: ") + e.what()).c_str());
  } catch (...) {
    return state.api->CreateStatus(ORT_FAIL, "QsdMatMul: unknown error");
  }
}

const QsdOp& CpuOp() {
  static const QsdOp op(nullptr, &ComputeOnCpu);
  return op;
}

struct DomainDeleter {
  void operator()(OrtCustomOpDomain* d) const {
    if (api != nullptr) api->ReleaseCustomOpDomain(d);
  }
  const OrtApi* api;
};

std::mutex& DomainsMutex() {
  static std::mutex m;
  return m;
}

// The domains must outlive every session that uses them; they are kept until
// the library is unloaded.
std::vector<std::unique_ptr<OrtCustomOpDomain, DomainDeleter>>& Domains() {
  static auto* domains = new std::vector<std::unique_ptr<OrtCustomOpDomain, DomainDeleter>>();
  return *domains;
}

OrtStatus* Register(const OrtApi& api, OrtSessionOptions* options) {
  OrtCustomOpDomain* raw = nullptr;
  OrtStatus* st = api.CreateCustomOpDomain(kDomain, &raw);
  if (st != nullptr) return st;
  std::unique_ptr<OrtCustomOpDomain, DomainDeleter> domain(raw, DomainDeleter{&api});
  st = api.CustomOpDomain_Add(domain.get(), &CpuOp());
  if (st != nullptr) return st;
#if defined(QSD_WITH_CUDA)
  st = api.CustomOpDomain_Add(domain.get(), &CudaOp());
  if (st != nullptr) return st;
#endif
  st = api.AddCustomOpDomain(options, domain.get());
  if (st != nullptr) return st;
  std::lock_guard<std::mutex> lock(DomainsMutex());
  Domains().push_back(std::move(domain));
  return nullptr;
}

}  // namespace

QsdOp::QsdOp(const char* provider, ComputeFn compute) : OrtCustomOp(), provider_(provider),
                                                        compute_(compute) {
  version = ORT_API_VERSION;
  CreateKernel = nullptr;
  GetName = &qsd::GetName;
  GetExecutionProviderType = &GetProvider;
  GetInputType = &GetInputTypeFn;
  GetInputTypeCount = &qsd::GetInputTypeCount;
  GetOutputType = &qsd::GetOutputType;
  GetOutputTypeCount = &qsd::GetOutputTypeCount;
  KernelCompute = nullptr;
  KernelDestroy = &qsd::KernelDestroy;
  GetInputCharacteristic = &qsd::GetInputCharacteristic;
  GetOutputCharacteristic = &qsd::GetOutputCharacteristic;
  GetInputMemoryType = &qsd::GetInputMemoryType;
  GetVariadicInputMinArity = &GetVariadicMinArity;
  GetVariadicInputHomogeneity = &GetVariadicHomogeneity;
  GetVariadicOutputMinArity = &GetVariadicMinArity;
  GetVariadicOutputHomogeneity = &GetVariadicHomogeneity;
  CreateKernelV2 = &qsd::CreateKernelV2;
  KernelComputeV2 = &qsd::KernelComputeV2;
  InferOutputShapeFn = nullptr;
  GetStartVersion = &qsd::GetStartVersion;
  GetEndVersion = &qsd::GetEndVersion;
  GetMayInplace = nullptr;
  ReleaseMayInplace = nullptr;
  GetAliasMap = nullptr;
  ReleaseAliasMap = nullptr;
}

}  // namespace qsd

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // The first version of the API table is always available and enough to
    // report the problem.
    const OrtApi* api1 = api_base->GetApi(1);
    std::string msg = std::string("qsdonnx custom ops need ONNX Runtime with C API version >= ") +
                      std::to_string(ORT_API_VERSION) + ", this runtime is " +
                      api_base->GetVersionString();
    return api1 != nullptr ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  try {
    return qsd::Register(*api, options);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
