#include "qsd_common.h"

#include <sstream>
#include <vector>

namespace qsd {

namespace {

#define QSD_RETURN_IF_ERROR(expr)        \
  do {                                   \
    OrtStatus* qsd_status_ = (expr);     \
    if (qsd_status_ != nullptr) {        \
      return qsd_status_;                \
    }                                    \
  } while (0)

const char* const kInputNames[kNumInputs] = {
    "X", "Q_B", "Q_scales", "Q_zp", "L_B", "L_scales", "L_zp",
    "R_B", "R_scales", "R_zp", "S_rowptr", "S_cols", "S_vals", "bias"};

// Releases a status; true when there was none.
bool Ok(const OrtApi& api, OrtStatus* st) {
  if (st == nullptr) return true;
  api.ReleaseStatus(st);
  return false;
}

struct TensorView {
  const void* data = nullptr;
  std::vector<int64_t> dims;
  int64_t count = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
};

std::string DimsToString(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) os << ", ";
    os << dims[i];
  }
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

OrtStatus* Describe(const OrtApi& api, const OrtValue* value, TensorView* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  QSD_RETURN_IF_ERROR(api.GetTensorTypeAndShape(value, &info));
  size_t ndim = 0;
  OrtStatus* st = api.GetDimensionsCount(info, &ndim);
  if (st == nullptr) {
    out->dims.assign(ndim, 0);
    if (ndim > 0) st = api.GetDimensions(info, out->dims.data(), ndim);
  }
  if (st == nullptr) st = api.GetTensorElementType(info, &out->type);
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  int64_t count = 1;
  for (int64_t d : out->dims) count *= d;
  out->count = count;
  void* data = nullptr;
  QSD_RETURN_IF_ERROR(api.GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->data = data;
  return nullptr;
}

// Fetches input `index`; `*present` tells whether the node supplies it.
OrtStatus* GetInput(const OrtApi& api, OrtKernelContext* ctx, int index, bool* present,
                    TensorView* out) {
  size_t count = 0;
  QSD_RETURN_IF_ERROR(api.KernelContext_GetInputCount(ctx, &count));
  *present = false;
  if (static_cast<size_t>(index) >= count) return nullptr;
  const OrtValue* value = nullptr;
  QSD_RETURN_IF_ERROR(api.KernelContext_GetInput(ctx, static_cast<size_t>(index), &value));
  if (value == nullptr) return nullptr;
  *present = true;
  return Describe(api, value, out);
}

OrtStatus* CheckCount(const OrtApi& api, int index, const TensorView& t, int64_t expected,
                      const std::string& expected_shape) {
  if (t.count != expected) {
    std::ostringstream os;
    os << "QsdMatMul: input " << kInputNames[index] << " has shape " << DimsToString(t.dims)
       << " but the attributes require " << expected_shape << " (" << expected << " elements)";
    return MakeError(api, os.str());
  }
  return nullptr;
}

OrtStatus* RequireInput(const OrtApi& api, OrtKernelContext* ctx, int index, TensorView* out,
                        const char* why) {
  bool present = false;
  QSD_RETURN_IF_ERROR(GetInput(api, ctx, index, &present, out));
  if (!present) {
    return MakeError(api, std::string("QsdMatMul: input ") + kInputNames[index] +
                              " is missing but " + why);
  }
  return nullptr;
}

OrtStatus* RejectInput(const OrtApi& api, OrtKernelContext* ctx, int index, const char* why) {
  bool present = false;
  TensorView t;
  QSD_RETURN_IF_ERROR(GetInput(api, ctx, index, &present, &t));
  if (present) {
    return MakeError(api, std::string("QsdMatMul: input ") + kInputNames[index] +
                              " is given but " + why);
  }
  return nullptr;
}

void SetupQuant(QuantMatrix* m, int64_t bits, int64_t block, int64_t depth, int64_t cols) {
  m->bits = static_cast<int>(bits);
  m->block = block;
  m->depth = depth;
  m->cols = cols;
  m->kb = (depth + block - 1) / block;
  m->blk_bytes = block * bits / 8;
  m->col_bytes = m->kb * m->blk_bytes;
  m->zp_stride = (m->kb * bits + 7) / 8;
}

OrtStatus* BindQuant(const OrtApi& api, OrtKernelContext* ctx, int first, const char* part,
                     int64_t bits, int64_t block, int64_t depth, int64_t cols, QuantMatrix* m) {
  SetupQuant(m, bits, block, depth, cols);
  std::string why = std::string("the ") + part + " part is enabled by the attributes";
  TensorView codes, scales, zp;
  QSD_RETURN_IF_ERROR(RequireInput(api, ctx, first, &codes, why.c_str()));
  QSD_RETURN_IF_ERROR(RequireInput(api, ctx, first + 1, &scales, why.c_str()));
  bool zp_present = false;
  QSD_RETURN_IF_ERROR(GetInput(api, ctx, first + 2, &zp_present, &zp));
  {
    std::ostringstream os;
    os << "(" << cols << ", " << m->kb << ", " << m->blk_bytes << ")";
    QSD_RETURN_IF_ERROR(CheckCount(api, first, codes, cols * m->col_bytes, os.str()));
  }
  {
    std::ostringstream os;
    os << "(" << cols * m->kb << ",)";
    QSD_RETURN_IF_ERROR(CheckCount(api, first + 1, scales, cols * m->kb, os.str()));
  }
  m->codes = static_cast<const uint8_t*>(codes.data);
  m->scales = static_cast<const uint16_t*>(scales.data);
  m->zp = nullptr;
  if (zp_present) {
    std::ostringstream os;
    os << "(" << cols << ", " << m->zp_stride << ")";
    QSD_RETURN_IF_ERROR(CheckCount(api, first + 2, zp, cols * m->zp_stride, os.str()));
    m->zp = static_cast<const uint8_t*>(zp.data);
  }
  return nullptr;
}

OrtStatus* CheckQuantAttrs(const OrtApi& api, const char* bits_name, int64_t bits,
                           const char* block_name, int64_t block) {
  if (bits != 2 && bits != 4 && bits != 8) {
    std::ostringstream os;
    os << "QsdMatMul: attribute " << bits_name << " = " << bits << " is not supported (2, 4 or 8)";
    return MakeError(api, os.str());
  }
  if (block <= 0 || (block * bits) % 8 != 0) {
    std::ostringstream os;
    os << "QsdMatMul: attribute " << block_name << " = " << block
       << " must be positive and hold a whole number of bytes at " << bits << " bits";
    return MakeError(api, os.str());
  }
  return nullptr;
}

OrtStatus* GetIntAttr(const OrtApi& api, const OrtKernelInfo* info, const char* name,
                      bool required, int64_t* out) {
  int64_t value = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &value);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    if (required) {
      return MakeError(api, std::string("QsdMatMul: required attribute ") + name + " is missing");
    }
    *out = 0;
    return nullptr;
  }
  *out = value;
  return nullptr;
}

}  // namespace

ONNXTensorElementDataType InputType(size_t index) {
  switch (index) {
    case kX:
    case kBias:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case kQB:
    case kQZp:
    case kLB:
    case kLZp:
    case kRB:
    case kRZp:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case kQScales:
    case kLScales:
    case kRScales:
    case kSVals:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case kSRowPtr:
    case kSCols:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    default:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
}

OrtStatus* MakeError(const OrtApi& api, const std::string& msg) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
}

OrtStatus* ReadAttributes(const OrtApi& api, const OrtKernelInfo* info, Attributes* a) {
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "K", true, &a->K));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "N", true, &a->N));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "q_bits", false, &a->q_bits));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "q_block", false, &a->q_block));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "rank", false, &a->rank));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "l_bits", false, &a->l_bits));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "l_block", false, &a->l_block));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "r_bits", false, &a->r_bits));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "r_block", false, &a->r_block));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "has_sparse", false, &a->has_sparse));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "has_bias", false, &a->has_bias));
  QSD_RETURN_IF_ERROR(GetIntAttr(api, info, "act_int8", false, &a->act_int8));
  if (a->K <= 0 || a->N <= 0) {
    std::ostringstream os;
    os << "QsdMatMul: attributes K = " << a->K << " and N = " << a->N << " must be positive";
    return MakeError(api, os.str());
  }
  if (a->q_bits != 0) {
    QSD_RETURN_IF_ERROR(CheckQuantAttrs(api, "q_bits", a->q_bits, "q_block", a->q_block));
  }
  if (a->rank < 0) return MakeError(api, "QsdMatMul: attribute rank must not be negative");
  if (a->rank > 0) {
    QSD_RETURN_IF_ERROR(CheckQuantAttrs(api, "l_bits", a->l_bits, "l_block", a->l_block));
    QSD_RETURN_IF_ERROR(CheckQuantAttrs(api, "r_bits", a->r_bits, "r_block", a->r_block));
  }
  if ((a->has_sparse != 0 && a->has_sparse != 1) || (a->has_bias != 0 && a->has_bias != 1)) {
    return MakeError(api, "QsdMatMul: attributes has_sparse and has_bias must be 0 or 1");
  }
  if (a->act_int8 != 0 && a->act_int8 != 1) {
    return MakeError(api, "QsdMatMul: attribute act_int8 must be 0 or 1");
  }
  return nullptr;
}

namespace {

// The constant tensor at `index`: returns false if the input is absent, not
// constant or not readable. `*absent` tells an absent optional input apart.
bool ConstantTensor(const OrtApi& api, const OrtKernelInfo* info, size_t index, bool* absent,
                    TensorView* out) {
  *absent = false;
  size_t count = 0;
  if (!Ok(api, api.KernelInfo_GetInputCount(info, &count))) return false;
  if (index >= count) {
    *absent = true;
    return false;
  }
  size_t len = 0;
  if (!Ok(api, api.KernelInfo_GetInputName(info, index, nullptr, &len))) return false;
  if (len <= 1) {  // the name is empty: the optional input is not given
    *absent = true;
    return false;
  }
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (!Ok(api, api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) ||
      !is_constant || value == nullptr) {
    return false;
  }
  return Ok(api, Describe(api, value, out));
}

}  // namespace

bool ConstantQuant(const OrtApi& api, const OrtKernelInfo* info, int first, int64_t bits,
                   int64_t block, int64_t depth, int64_t cols, QuantMatrix* m) {
  SetupQuant(m, bits, block, depth, cols);
  TensorView codes, scales, zp;
  bool absent = false;
  if (!ConstantTensor(api, info, first, &absent, &codes) ||
      codes.type != InputType(first) || codes.count != cols * m->col_bytes) {
    return false;
  }
  if (!ConstantTensor(api, info, first + 1, &absent, &scales) ||
      scales.type != InputType(first + 1) || scales.count != cols * m->kb) {
    return false;
  }
  const bool have_zp = ConstantTensor(api, info, first + 2, &absent, &zp);
  if (have_zp) {
    if (zp.type != InputType(first + 2) || zp.count != cols * m->zp_stride) return false;
    m->zp = static_cast<const uint8_t*>(zp.data);
  } else if (!absent) {
    return false;
  }
  m->codes = static_cast<const uint8_t*>(codes.data);
  m->scales = static_cast<const uint16_t*>(scales.data);
  return true;
}

OrtStatus* BindProblem(const OrtApi& api, OrtKernelContext* ctx, const Attributes& a,
                       Problem* p) {
  *p = Problem();
  p->K = a.K;
  p->N = a.N;
  p->rank = a.rank;
  p->act_int8 = a.act_int8 != 0;

  TensorView x;
  QSD_RETURN_IF_ERROR(RequireInput(api, ctx, kX, &x, "it is always required"));
  if (x.dims.empty() || x.dims.back() != a.K) {
    std::ostringstream os;
    os << "QsdMatMul: input X has shape " << DimsToString(x.dims)
       << " but its last dimension must be K = " << a.K;
    return MakeError(api, os.str());
  }
  p->M = x.count / a.K;
  p->x = static_cast<const float*>(x.data);

  if (a.q_bits != 0) {
    QSD_RETURN_IF_ERROR(BindQuant(api, ctx, kQB, "Q", a.q_bits, a.q_block, a.K, a.N, &p->q));
  } else {
    for (int i = kQB; i <= kQZp; ++i) QSD_RETURN_IF_ERROR(RejectInput(api, ctx, i, "q_bits = 0"));
  }
  if (a.rank > 0) {
    QSD_RETURN_IF_ERROR(
        BindQuant(api, ctx, kLB, "low-rank L", a.l_bits, a.l_block, a.K, a.rank, &p->l));
    QSD_RETURN_IF_ERROR(
        BindQuant(api, ctx, kRB, "low-rank R", a.r_bits, a.r_block, a.rank, a.N, &p->r));
  } else {
    for (int i = kLB; i <= kRZp; ++i) QSD_RETURN_IF_ERROR(RejectInput(api, ctx, i, "rank = 0"));
  }
  if (a.has_sparse) {
    TensorView rowptr, cols, vals;
    const char* why = "has_sparse = 1";
    QSD_RETURN_IF_ERROR(RequireInput(api, ctx, kSRowPtr, &rowptr, why));
    QSD_RETURN_IF_ERROR(RequireInput(api, ctx, kSCols, &cols, why));
    QSD_RETURN_IF_ERROR(RequireInput(api, ctx, kSVals, &vals, why));
    std::ostringstream os;
    os << "(" << a.K + 1 << ",)";
    QSD_RETURN_IF_ERROR(CheckCount(api, kSRowPtr, rowptr, a.K + 1, os.str()));
    if (cols.count != vals.count) {
      return MakeError(api, "QsdMatMul: inputs S_cols and S_vals must have the same length");
    }
    p->s.present = true;
    p->s.rows = a.K;
    p->s.cols = a.N;
    p->s.nnz = cols.count;
    p->s.rowptr = static_cast<const int32_t*>(rowptr.data);
    p->s.colidx = static_cast<const int32_t*>(cols.data);
    p->s.vals = static_cast<const uint16_t*>(vals.data);
  } else {
    for (int i = kSRowPtr; i <= kSVals; ++i) {
      QSD_RETURN_IF_ERROR(RejectInput(api, ctx, i, "has_sparse = 0"));
    }
  }
  if (a.has_bias) {
    TensorView bias;
    QSD_RETURN_IF_ERROR(RequireInput(api, ctx, kBias, &bias, "has_bias = 1"));
    std::ostringstream os;
    os << "(" << a.N << ",)";
    QSD_RETURN_IF_ERROR(CheckCount(api, kBias, bias, a.N, os.str()));
    p->bias = static_cast<const float*>(bias.data);
  } else {
    QSD_RETURN_IF_ERROR(RejectInput(api, ctx, kBias, "has_bias = 0"));
  }

  std::vector<int64_t> out_dims = x.dims;
  out_dims.back() = a.N;
  OrtValue* y = nullptr;
  QSD_RETURN_IF_ERROR(api.KernelContext_GetOutput(ctx, 0, out_dims.data(), out_dims.size(), &y));
  void* ydata = nullptr;
  QSD_RETURN_IF_ERROR(api.GetTensorMutableData(y, &ydata));
  p->y = static_cast<float*>(ydata);
  return nullptr;
}

OrtStatus* CheckSparseHost(const OrtApi& api, const SparseMatrix& s) {
  if (!s.present) return nullptr;
  if (s.rowptr[0] != 0 || s.rowptr[s.rows] != s.nnz) {
    std::ostringstream os;
    os << "QsdMatMul: S_rowptr must start at 0 and end at nnz = " << s.nnz << " (got "
       << s.rowptr[0] << " and " << s.rowptr[s.rows] << ")";
    return MakeError(api, os.str());
  }
  for (int64_t k = 0; k < s.rows; ++k) {
    if (s.rowptr[k + 1] < s.rowptr[k]) {
      return MakeError(api, "QsdMatMul: S_rowptr must be non-decreasing");
    }
  }
  for (int64_t i = 0; i < s.nnz; ++i) {
    if (s.colidx[i] < 0 || s.colidx[i] >= s.cols) {
      std::ostringstream os;
      os << "QsdMatMul: S_cols[" << i << "] = " << s.colidx[i] << " is outside [0, " << s.cols
         << ")";
      return MakeError(api, os.str());
    }
  }
  return nullptr;
}

}  // namespace qsd
