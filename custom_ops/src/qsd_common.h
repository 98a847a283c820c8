// Shared definitions of the qsdonnx::QsdMatMul operator: attributes, the
// description of one block-quantized matrix, input binding and validation.
//
// Y = X . W_hat (+ bias),  W_hat = deq(Q) + deq(L) . deq(R) + S
//
// Every quantized matrix uses the com.microsoft.MatMulNBits packing: a matrix
// with `depth` rows (the reduction dimension) and `cols` columns is stored per
// column as ceil(depth / block) blocks of block * bits / 8 bytes, codes packed
// low bits first; one float16 scale per (column, block) and zero points packed
// the same way as the codes, one row of ceil(kb * bits / 8) bytes per column.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "onnxruntime_c_api.h"

namespace qsd {

constexpr const char* kDomain = "qsdonnx";
constexpr const char* kOpName = "QsdMatMul";
constexpr int kOpVersion = 1;

enum InputIndex : int {
  kX = 0,
  kQB = 1, kQScales = 2, kQZp = 3,
  kLB = 4, kLScales = 5, kLZp = 6,
  kRB = 7, kRScales = 8, kRZp = 9,
  kSRowPtr = 10, kSCols = 11, kSVals = 12,
  kBias = 13,
  kNumInputs = 14,
};

ONNXTensorElementDataType InputType(size_t index);

struct Attributes {
  int64_t K = 0;
  int64_t N = 0;
  int64_t q_bits = 0;
  int64_t q_block = 0;
  int64_t rank = 0;
  int64_t l_bits = 0;
  int64_t l_block = 0;
  int64_t r_bits = 0;
  int64_t r_block = 0;
  int64_t has_sparse = 0;
  int64_t has_bias = 0;
  // 1: the CPU kernel quantizes the activations to int8 for the parts with
  // codes of at most 4 bits (qsd_cpu_int8.h); the CUDA kernel computes in
  // float either way.
  int64_t act_int8 = 0;
};

// A block-quantized matrix of shape (depth, cols) used as A . B.
struct QuantMatrix {
  int bits = 0;            // 0: the matrix is absent
  int64_t block = 0;       // values per block along depth
  int64_t depth = 0;       // reduction dimension
  int64_t cols = 0;        // output dimension
  int64_t kb = 0;          // blocks per column
  int64_t blk_bytes = 0;   // bytes per block of codes
  int64_t col_bytes = 0;   // bytes of codes per column (kb * blk_bytes)
  int64_t zp_stride = 0;   // bytes of zero points per column
  const uint8_t* codes = nullptr;
  const uint16_t* scales = nullptr;  // float16 bit patterns, (cols, kb)
  const uint8_t* zp = nullptr;       // nullptr: default zero point 2^(bits-1)

  bool present() const { return bits != 0; }
};

// CSR sparse matrix of shape (K, N); row k is input feature k.
struct SparseMatrix {
  bool present = false;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t nnz = 0;
  const int32_t* rowptr = nullptr;
  const int32_t* colidx = nullptr;
  const uint16_t* vals = nullptr;    // float16 bit patterns
};

// All operands of one call, bound to the tensors of the kernel context.
struct Problem {
  int64_t M = 0;   // rows of X after flattening the leading dimensions
  int64_t K = 0;
  int64_t N = 0;
  int64_t rank = 0;
  const float* x = nullptr;
  float* y = nullptr;
  QuantMatrix q;   // (K, N)
  QuantMatrix l;   // (K, rank)
  QuantMatrix r;   // (rank, N)
  SparseMatrix s;  // (K, N)
  const float* bias = nullptr;
  bool act_int8 = false;
};

// Reads and checks the attributes. Returns nullptr or an error status.
OrtStatus* ReadAttributes(const OrtApi& api, const OrtKernelInfo* info, Attributes* out);

// Binds the inputs and the output of a call, checking every shape against the
// attributes. Allocates the output. Returns nullptr or an error status.
OrtStatus* BindProblem(const OrtApi& api, OrtKernelContext* ctx, const Attributes& attrs,
                       Problem* out);

// Describes the quantized matrix at inputs first..first+2 from the kernel
// info when its codes, scales and (if given) zero points are constant host
// tensors of the sizes the attributes require. Returns false otherwise.
bool ConstantQuant(const OrtApi& api, const OrtKernelInfo* info, int first, int64_t bits,
                   int64_t block, int64_t depth, int64_t cols, QuantMatrix* out);

// Checks the structure of a CSR matrix that lives in host memory.
OrtStatus* CheckSparseHost(const OrtApi& api, const SparseMatrix& s);

OrtStatus* MakeError(const OrtApi& api, const std::string& msg);

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      // subnormal half: normalize
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      mant &= 0x3FFu;
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  }
  float f;
  static_assert(sizeof(f) == sizeof(bits), "float must be 32 bits");
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace qsd
