// Int8-activation product of QsdMatMul (attribute act_int8 = 1).
//
// For a quantized matrix B with codes of at most 4 bits, every row of the
// activations A is quantized per block of B along the depth to int8 with a
// symmetric scale s = absmax / 127 (q = round-half-even(a * (127 / absmax)),
// all zero when absmax = 0). Each block contributes
//   s_a * s_w * sum_k q[k] * (code[k] - zp)
// where the integer dot product is exact in int32; the blocks accumulate in
// float.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "qsd_common.h"
#include "qsd_cpu.h"

namespace qsd {

// The codes of B decoded for the int8 product, in tiles of kInt8TileCols
// columns: w = code - zp as int8 laid out [block][group of 4][column][4],
// csum = -128 * sum of w per (block, column), scale per (block, column);
// columns past B.cols are zero.
constexpr int kInt8TileCols = 16;

struct Int8Tile {
  std::vector<int8_t> w;
  std::vector<int32_t> csum;
  std::vector<float> scale;
};

struct Int8Weights {
  int64_t depth = 0;
  int64_t cols = 0;
  std::vector<Int8Tile> tiles;
};

// Decodes every tile of B once (for constant weights, kept by the kernel).
std::shared_ptr<const Int8Weights> DecodeInt8Weights(const QuantMatrix& B,
                                                     const ParallelRunner& par);

// Whether B is handled by the int8-activation product (codes of 2 or 4 bits).
inline bool Int8Eligible(const QuantMatrix& B) { return B.present() && B.bits <= 4; }

// out (rows x B.cols, row stride ldo) += quant(A) . deq(B), A has `rows` rows
// of B.depth values with row stride lda. `pre`, when given, holds the tiles
// of B decoded by DecodeInt8Weights; otherwise each tile is decoded here.
void Int8Accumulate(const float* a, int64_t lda, int64_t rows, const QuantMatrix& B, float* out,
                    int64_t ldo, const ParallelRunner& par, const Int8Weights* pre = nullptr);

}  // namespace qsd
