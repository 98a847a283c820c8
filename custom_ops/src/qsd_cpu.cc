// CPU kernel of QsdMatMul.
//
// Products with many rows are produced in tiles of kNR columns and up to kMC
// rows. For each tile the packed codes of the quantized matrix are decoded, a
// chunk of depth at a time, into a small row-major float panel (depth x kNR)
// that is reused by every row of the tile; a register-blocked micro-kernel
// multiplies a few rows of the activations with the panel. Products with at
// most kGemvMaxRows rows (token-by-token decoding) skip the panel: the codes of
// each column are widened in registers and multiplied with a block-permuted
// copy of the activations. Both are in qsd_cpu_isa.inc.
//
// Both kernels are compiled for AVX-512, AVX2+FMA and the baseline, picked at
// run time (QSDONNX_CPU_ISA=base|avx2 caps the choice). The low-rank term is
// computed as T = X . deq(L) first and then enters the output as a second
// operand T . deq(R) of the same product. The sparse term is added afterwards
// from the CSR rows, the bias when the output is initialized. With the
// attribute act_int8, the parts with codes of at most 4 bits use the
// int8-activation product of qsd_cpu_int8.cc instead.
#include "qsd_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "qsd_cpu_int8.h"

namespace qsd {
namespace {

constexpr int kNR = 16;         // columns per tile (panel width)
constexpr int64_t kMC = 256;    // rows per work item
constexpr int64_t kKC = 256;    // target depth of one decoded panel chunk

#if defined(__GNUC__)
#define QSD_INLINE inline __attribute__((always_inline))
#else
#define QSD_INLINE inline
#endif

// One operand pair of a tile product: A (rows x depth, row stride lda) times
// the dequantized matrix B (depth x cols).
struct Operand {
  const float* a;
  int64_t lda;
  const QuantMatrix* b;
};

inline int ZeroPoint(const QuantMatrix& B, int64_t col, int64_t blk) {
  if (B.zp == nullptr) return 1 << (B.bits - 1);
  const int64_t bit = blk * B.bits;
  const uint8_t byte = B.zp[col * B.zp_stride + bit / 8];
  return (byte >> (bit % 8)) & ((1 << B.bits) - 1);
}

template <int BITS>
QSD_INLINE void DecodeBlock(const uint8_t* p, int64_t count, float scale, int zp, float* dst) {
  constexpr int kPer = 8 / BITS;
  constexpr unsigned kMask = (1u << BITS) - 1u;
  for (int64_t e = 0; e < count; ++e) {
    const unsigned code = (static_cast<unsigned>(p[e / kPer]) >> ((e % kPer) * BITS)) & kMask;
    dst[e * kNR] = static_cast<float>(static_cast<int>(code) - zp) * scale;
  }
}

// Decodes the blocks [blk0, blk1) of columns [n0, n0 + nr) of B into the panel
// w (row k - blk0 * block, column j), zero-filling the columns nr..kNR-1.
QSD_INLINE void DecodePanelScalar(const QuantMatrix& B, int64_t n0, int nr, int64_t blk0,
                                  int64_t blk1, float* w) {
  const int64_t k0 = blk0 * B.block;
  const int64_t k1 = std::min(blk1 * B.block, B.depth);
  if (nr < kNR) {
    for (int64_t k = 0; k < k1 - k0; ++k) {
      std::memset(w + k * kNR + nr, 0, sizeof(float) * (kNR - nr));
    }
  }
  for (int j = 0; j < nr; ++j) {
    const int64_t n = n0 + j;
    const uint8_t* col = B.codes + n * B.col_bytes;
    for (int64_t b = blk0; b < blk1; ++b) {
      const int64_t kb0 = b * B.block;
      const int64_t count = std::min(B.block, B.depth - kb0);
      const float scale = HalfToFloat(B.scales[n * B.kb + b]);
      const int zp = ZeroPoint(B, n, b);
      const uint8_t* p = col + b * B.blk_bytes;
      float* dst = w + (kb0 - k0) * kNR + j;
      switch (B.bits) {
        case 2: DecodeBlock<2>(p, count, scale, zp, dst); break;
        case 4: DecodeBlock<4>(p, count, scale, zp, dst); break;
        default: DecodeBlock<8>(p, count, scale, zp, dst); break;
      }
    }
  }
}

#if defined(__GNUC__)
// A panel row of 16 floats. GCC and Clang lower the vector operations to one
// AVX-512 register, two AVX registers or four SSE registers, depending on the
// instruction set the enclosing function is compiled for.
typedef float VRow __attribute__((vector_size(64)));

QSD_INLINE VRow LoadRow(const float* p) {
  VRow v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

QSD_INLINE void StoreRow(float* p, VRow v) { std::memcpy(p, &v, sizeof(v)); }

static_assert(kNR * sizeof(float) == sizeof(VRow), "a panel row is one VRow");

template <int MR>
QSD_INLINE void MicroKernel(int64_t depth, const float* a, int64_t lda, const float* w, float* c) {
  VRow acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = VRow{};
  for (int64_t k = 0; k < depth; ++k) {
    const VRow wk = LoadRow(w + k * kNR);
    for (int i = 0; i < MR; ++i) acc[i] += a[i * lda + k] * wk;
  }
  for (int i = 0; i < MR; ++i) StoreRow(c + i * kNR, LoadRow(c + i * kNR) + acc[i]);
}
#else
template <int MR>
QSD_INLINE void MicroKernel(int64_t depth, const float* a, int64_t lda, const float* w, float* c) {
  float acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = 0.0f;
  for (int64_t k = 0; k < depth; ++k) {
    const float* wk = w + k * kNR;
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * lda + k];
      for (int j = 0; j < kNR; ++j) acc[i][j] += av * wk[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * kNR + j] += acc[i][j];
}
#endif

#if defined(__GNUC__)
typedef int32_t VIdx __attribute__((vector_size(64)));  // 16 lanes, one per panel column

// Decodes a full panel (kNR columns): the j-th lane of a vector holds column
// n0 + j, so every packed byte position yields 8 / BITS panel rows at once.
template <int BITS>
QSD_INLINE void DecodePanelFull(const QuantMatrix& B, int64_t n0, int64_t blk0, int64_t blk1,
                                float* w) {
  constexpr int kPer = 8 / BITS;
  constexpr int32_t kMask = (1 << BITS) - 1;
  const int64_t k0 = blk0 * B.block;
  const uint8_t* cols[kNR];
  for (int j = 0; j < kNR; ++j) cols[j] = B.codes + (n0 + j) * B.col_bytes;
  for (int64_t b = blk0; b < blk1; ++b) {
    VRow scale, zp;
    for (int j = 0; j < kNR; ++j) {
      scale[j] = HalfToFloat(B.scales[(n0 + j) * B.kb + b]);
      zp[j] = static_cast<float>(ZeroPoint(B, n0 + j, b));
    }
    const int64_t kb0 = b * B.block;
    const int64_t count = std::min(B.block, B.depth - kb0);
    const int64_t nbytes = (count + kPer - 1) / kPer;
    const int64_t off = b * B.blk_bytes;
    float* dst = w + (kb0 - k0) * kNR;
    for (int64_t i = 0; i < nbytes; ++i) {
      VIdx v;
      for (int j = 0; j < kNR; ++j) v[j] = cols[j][off + i];
      const int64_t kbase = i * kPer;
      for (int e = 0; e < kPer; ++e) {
        if (kbase + e >= count) break;
        const VIdx code = (v >> (e * BITS)) & kMask;
        StoreRow(dst + (kbase + e) * kNR, (__builtin_convertvector(code, VRow) - zp) * scale);
      }
    }
  }
}

QSD_INLINE void DecodePanel(const QuantMatrix& B, int64_t n0, int nr, int64_t blk0,
                            int64_t blk1, float* w) {
  if (nr == kNR) {
    switch (B.bits) {
      case 2: DecodePanelFull<2>(B, n0, blk0, blk1, w); return;
      case 4: DecodePanelFull<4>(B, n0, blk0, blk1, w); return;
      default: DecodePanelFull<8>(B, n0, blk0, blk1, w); return;
    }
  }
  DecodePanelScalar(B, n0, nr, blk0, blk1, w);
}
#else
QSD_INLINE void DecodePanel(const QuantMatrix& B, int64_t n0, int nr, int64_t blk0,
                            int64_t blk1, float* w) {
  DecodePanelScalar(B, n0, nr, blk0, blk1, w);
}
#endif

#if defined(__GNUC__)
// MicroKernel with each panel row held as two 8-float halves. Instruction sets
// whose widest register holds 8 floats (AVX2) need this form: GCC keeps a
// 16-float vector it cannot place in one register in memory and works on it
// piecewise, which made the AVX2 copy slower than the SSE baseline.
typedef float VHalfRow __attribute__((vector_size(32)));

QSD_INLINE VHalfRow LoadHalfRow(const float* p) {
  VHalfRow v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

QSD_INLINE void StoreHalfRow(float* p, VHalfRow v) { std::memcpy(p, &v, sizeof(v)); }

template <int MR>
QSD_INLINE void MicroKernelHalves(int64_t depth, const float* a, int64_t lda, const float* w,
                                  float* c) {
  VHalfRow lo[MR], hi[MR];
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = VHalfRow{};
  for (int64_t k = 0; k < depth; ++k) {
    const VHalfRow wl = LoadHalfRow(w + k * kNR);
    const VHalfRow wh = LoadHalfRow(w + k * kNR + kNR / 2);
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * lda + k];
      lo[i] += av * wl;
      hi[i] += av * wh;
    }
  }
  for (int i = 0; i < MR; ++i) {
    StoreHalfRow(c + i * kNR, LoadHalfRow(c + i * kNR) + lo[i]);
    StoreHalfRow(c + i * kNR + kNR / 2, LoadHalfRow(c + i * kNR + kNR / 2) + hi[i]);
  }
}
#else
template <int MR>
QSD_INLINE void MicroKernelHalves(int64_t depth, const float* a, int64_t lda, const float* w,
                                  float* c) {
  MicroKernel<MR>(depth, a, lda, w, c);
}
#endif

template <int MR, bool HALVES>
QSD_INLINE void MicroKernelAny(int64_t depth, const float* a, int64_t lda, const float* w,
                               float* c) {
  if constexpr (HALVES) {
    MicroKernelHalves<MR>(depth, a, lda, w, c);
  } else {
    MicroKernel<MR>(depth, a, lda, w, c);
  }
}

template <int MR, bool HALVES>
QSD_INLINE void Remainder(int64_t rows, int64_t depth, const float* a, int64_t lda,
                          const float* w, float* c) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      MicroKernelAny<MR, HALVES>(depth, a, lda, w, c);
    } else {
      Remainder<MR - 1, HALVES>(rows, depth, a, lda, w, c);
    }
  }
}

// c (rows x kNR) += a (rows x depth) . w (depth x kNR), MR rows at a time.
template <int MR, bool HALVES = false>
QSD_INLINE void PanelProductImpl(int64_t rows, int64_t depth, const float* a, int64_t lda,
                                 const float* w, float* c) {
  int64_t m = 0;
  for (; m + MR <= rows; m += MR)
    MicroKernelAny<MR, HALVES>(depth, a + m * lda, lda, w, c + m * kNR);
  Remainder<MR - 1, HALVES>(rows - m, depth, a + m * lda, lda, w, c + m * kNR);
}

constexpr int kGemvMaxRows = 4;    // products with at most this many rows use the GEMV path
constexpr int64_t kGemvCols = 64;  // columns per GEMV work item

#if defined(__GNUC__)
typedef float VHalf __attribute__((vector_size(32)));
typedef float VQuarter __attribute__((vector_size(16)));
typedef int32_t VLanes16 __attribute__((vector_size(64)));
typedef int32_t VLanes8 __attribute__((vector_size(32)));
typedef uint8_t VBytes16 __attribute__((vector_size(16)));
typedef uint8_t VBytes8 __attribute__((vector_size(8)));

QSD_INLINE VHalf LoadHalf(const float* p) {
  VHalf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#if defined(__has_builtin) && !defined(QSD_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define QSD_HAS_SHUFFLEVECTOR 1
#endif
#endif

#if defined(QSD_HAS_SHUFFLEVECTOR)
QSD_INLINE float SumHalf(VHalf v) {
  const VQuarter q = __builtin_shufflevector(v, v, 0, 1, 2, 3) +
                     __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

QSD_INLINE float SumRow(VRow v) {
  return SumHalf(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
#else
QSD_INLINE float SumHalf(VHalf v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

QSD_INLINE float SumRow(VRow v) {
  VHalf lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return SumHalf(lo + hi);
}
#endif

#if defined(QSD_HAS_SHUFFLEVECTOR)
// Transposes 16 rows of 16 floats in place: four rounds, each exchanging one
// bit of the row index with the same bit of the lane index.
#define QSD_IDX(...) __VA_ARGS__
#define QSD_TRANSPOSE_ROUND(D, LO, HI)                              \
  for (int i = 0; i < kNR; ++i) {                                  \
    if (i & (D)) continue;                                         \
    const VRow x = r[i];                                           \
    const VRow y = r[i + (D)];                                     \
    r[i] = __builtin_shufflevector(x, y, LO);                      \
    r[i + (D)] = __builtin_shufflevector(x, y, HI);                \
  }

QSD_INLINE void Transpose16(VRow* r) {
  QSD_TRANSPOSE_ROUND(8, QSD_IDX(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                      QSD_IDX(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  QSD_TRANSPOSE_ROUND(4, QSD_IDX(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                      QSD_IDX(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  QSD_TRANSPOSE_ROUND(2, QSD_IDX(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                      QSD_IDX(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  QSD_TRANSPOSE_ROUND(1, QSD_IDX(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                      QSD_IDX(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#endif

// The GEMV kernel and the panel decoding are compiled once per instruction
// set (qsd_cpu_isa.inc); each copy gets byte widening (one packed byte per
// 32-bit lane) suited to its instruction set and its own micro-kernel height.
namespace isa_base {
constexpr int kIsaMR = 4;
constexpr bool kIsaHalves = false;
QSD_INLINE VLanes16 Widen16(const uint8_t* p) {
  VBytes16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return __builtin_convertvector(raw, VLanes16);
}
QSD_INLINE VLanes8 Widen8(const uint8_t* p) {
  VBytes8 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return __builtin_convertvector(raw, VLanes8);
}
#include "qsd_cpu_isa.inc"
}  // namespace isa_base

#if defined(__x86_64__) && !defined(__clang__)
#define QSD_ISA_COPIES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
constexpr int kIsaMR = 6;  // 16 registers: 6 rows x 2 registers of accumulators
constexpr bool kIsaHalves = true;  // 8 floats per register
QSD_INLINE VLanes8 Widen8(const uint8_t* p) {
  return reinterpret_cast<VLanes8>(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
QSD_INLINE VLanes16 Widen16(const uint8_t* p) {
  const VLanes8 lo = Widen8(p);
  const VLanes8 hi = Widen8(p + 8);
#if defined(QSD_HAS_SHUFFLEVECTOR)
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  VLanes16 v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#endif
}
#include "qsd_cpu_isa.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12 reports its own _mm512_undefined_epi32 in the widening intrinsic.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace isa_avx512 {
constexpr int kIsaMR = 12;  // 32 registers: 12 rows x 1 register of accumulators
constexpr bool kIsaHalves = false;
QSD_INLINE VLanes8 Widen8(const uint8_t* p) {
  return reinterpret_cast<VLanes8>(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
QSD_INLINE VLanes16 Widen16(const uint8_t* p) {
  return reinterpret_cast<VLanes16>(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#include "qsd_cpu_isa.inc"
}  // namespace isa_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#else
namespace isa_base {
void ChunkProduct(const QuantMatrix& B, int64_t n0, int nr, int64_t blk0, int64_t blk1,
                  int64_t rows, const float* a, int64_t lda, float* w, float* c) {
  DecodePanel(B, n0, nr, blk0, blk1, w);
  const int64_t depth = std::min(blk1 * B.block, B.depth) - blk0 * B.block;
  PanelProductImpl<4>(rows, depth, a, lda, w, c);
}

void GemvColumns(const QuantMatrix& B, int64_t n0, int64_t n1, int rows, const float* ap,
                 int64_t ldp, const float* asum, float* out, int64_t ldo) {
  const int per = 8 / B.bits;
  const int mask = (1 << B.bits) - 1;
  for (int64_t n = n0; n < n1; ++n) {
    for (int m = 0; m < rows; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < B.kb; ++b) {
        const float scale = HalfToFloat(B.scales[n * B.kb + b]);
        const float zs = static_cast<float>(ZeroPoint(B, n, b)) * scale;
        const uint8_t* p = B.codes + n * B.col_bytes + b * B.blk_bytes;
        const float* a = ap + m * ldp + b * B.block;
        acc -= zs * asum[m * B.kb + b];
        for (int64_t i = 0; i < B.blk_bytes; ++i)
          for (int e = 0; e < per; ++e)
            acc += static_cast<float>((p[i] >> (e * B.bits)) & mask) * scale *
                   a[e * B.blk_bytes + i];
      }
      out[m * ldo + n] += acc;
    }
  }
}
}  // namespace isa_base
#endif

using ChunkProductFn = void (*)(const QuantMatrix&, int64_t, int, int64_t, int64_t, int64_t,
                                const float*, int64_t, float*, float*);
using GemvColumnsFn = void (*)(const QuantMatrix&, int64_t, int64_t, int, const float*, int64_t,
                               const float*, float*, int64_t);

struct Kernels {
  ChunkProductFn chunk;
  GemvColumnsFn gemv;
};

#if defined(__GNUC__) && defined(__x86_64__)
Kernels SelectKernels() {
  __builtin_cpu_init();
  const char* forced = std::getenv("QSDONNX_CPU_ISA");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  const Kernels base{&isa_base::ChunkProduct, &isa_base::GemvColumns};
#if defined(QSD_ISA_COPIES)
  const Kernels k2{&isa_avx2::ChunkProduct, &isa_avx2::GemvColumns};
  const Kernels k512{&isa_avx512::ChunkProduct, &isa_avx512::GemvColumns};
#else
  const Kernels k2 = base;
  const Kernels k512 = base;
#endif
  if (forced != nullptr) {
    if (std::strcmp(forced, "base") == 0) return base;
    if (std::strcmp(forced, "avx2") == 0 && avx2) return k2;
  }
  if (avx512) return k512;
  if (avx2) return k2;
  return base;
}
#else
Kernels SelectKernels() { return Kernels{&isa_base::ChunkProduct, &isa_base::GemvColumns}; }
#endif

const Kernels& ActiveKernels() {
  static const Kernels k = SelectKernels();
  return k;
}

void ChunkProduct(const QuantMatrix& B, int64_t n0, int nr, int64_t blk0, int64_t blk1,
                  int64_t rows, const float* a, int64_t lda, float* w, float* c) {
  ActiveKernels().chunk(B, n0, nr, blk0, blk1, rows, a, lda, w, c);
}

struct Scratch {
  std::vector<float> panel;
  std::vector<float> tile;
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

// Computes rows [m0, m1) and columns [n0, n0 + nr) of
//   out = sum_ops A . deq(B) (+ bias)
void ComputeTile(const Operand* ops, int nops, int64_t m0, int64_t m1, int64_t n0, int nr,
                 const float* bias, float* out, int64_t ldo) {
  Scratch& s = ThreadScratch();
  const int64_t rows = m1 - m0;
  s.tile.assign(static_cast<size_t>(rows * kNR), 0.0f);
  float* c = s.tile.data();
  if (bias != nullptr) {
    for (int64_t i = 0; i < rows; ++i)
      for (int j = 0; j < nr; ++j) c[i * kNR + j] = bias[n0 + j];
  }
  for (int o = 0; o < nops; ++o) {
    const QuantMatrix& B = *ops[o].b;
    const int64_t blocks_per_chunk = std::max<int64_t>(1, kKC / B.block);
    const size_t need = static_cast<size_t>(blocks_per_chunk * B.block * kNR);
    if (s.panel.size() < need) s.panel.resize(need);
    for (int64_t blk0 = 0; blk0 < B.kb; blk0 += blocks_per_chunk) {
      const int64_t blk1 = std::min(B.kb, blk0 + blocks_per_chunk);
      const int64_t k0 = blk0 * B.block;
      ChunkProduct(B, n0, nr, blk0, blk1, rows, ops[o].a + m0 * ops[o].lda + k0, ops[o].lda,
                   s.panel.data(), c);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(out + (m0 + i) * ldo + n0, c + i * kNR, sizeof(float) * nr);
  }
}

// Rows of A rearranged per block of B so that, for every packed byte position
// i and every value e within a byte, A[m, block start + i * per + e] sits at
// e * blk_bytes + i; the depth is zero-padded to whole blocks. Also returns
// the sum of A over every block.
void PermuteRows(const Operand& op, int64_t rows, std::vector<float>* perm,
                 std::vector<float>* sums) {
  const QuantMatrix& B = *op.b;
  const int per = 8 / B.bits;
  const int64_t ldp = B.kb * B.block;
  perm->assign(static_cast<size_t>(rows * ldp), 0.0f);
  sums->assign(static_cast<size_t>(rows * B.kb), 0.0f);
  for (int64_t m = 0; m < rows; ++m) {
    const float* a = op.a + m * op.lda;
    float* dst = perm->data() + m * ldp;
    for (int64_t b = 0; b < B.kb; ++b) {
      const int64_t k0 = b * B.block;
      const int64_t count = std::min(B.block, B.depth - k0);
      float sum = 0.0f;
      for (int64_t t = 0; t < count; ++t) {
        const float v = a[k0 + t];
        dst[k0 + (t % per) * B.blk_bytes + t / per] = v;
        sum += v;
      }
      (*sums)[m * B.kb + b] = sum;
    }
  }
}

// out (M x cols) = sum_ops A . deq(B) (+ bias) for M <= kGemvMaxRows.
void GemvProduct(const Operand* ops, int nops, int64_t M, int64_t cols, const float* bias,
                 float* out, const ParallelRunner& par) {
  std::vector<float> perm[2], sums[2];
  for (int o = 0; o < nops; ++o) PermuteRows(ops[o], M, &perm[o], &sums[o]);
  const int64_t nitems = (cols + kGemvCols - 1) / kGemvCols;
  const Kernels& kernels = ActiveKernels();
  par.For(static_cast<size_t>(nitems), [&](size_t item) {
    const int64_t n0 = static_cast<int64_t>(item) * kGemvCols;
    const int64_t n1 = std::min(cols, n0 + kGemvCols);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = n0; n < n1; ++n) out[m * cols + n] = bias != nullptr ? bias[n] : 0.0f;
    }
    for (int o = 0; o < nops; ++o) {
      const QuantMatrix& B = *ops[o].b;
      kernels.gemv(B, n0, n1, static_cast<int>(M), perm[o].data(), B.kb * B.block,
                   sums[o].data(), out, cols);
    }
  });
}

// out (M x cols) = sum_ops A . deq(B) (+ bias): GEMV for a few rows, otherwise
// tiled over rows and columns.
void TiledProduct(const Operand* ops, int nops, int64_t M, int64_t cols, const float* bias,
                  float* out, const ParallelRunner& par) {
  if (M <= 0 || cols <= 0) return;
  if (M <= kGemvMaxRows) {
    GemvProduct(ops, nops, M, cols, bias, out, par);
    return;
  }
  const int64_t ntiles = (cols + kNR - 1) / kNR;
  const int64_t nchunks = (M + kMC - 1) / kMC;
  par.For(static_cast<size_t>(ntiles * nchunks), [&](size_t item) {
    const int64_t t = static_cast<int64_t>(item) % ntiles;
    const int64_t ch = static_cast<int64_t>(item) / ntiles;
    const int64_t n0 = t * kNR;
    const int nr = static_cast<int>(std::min<int64_t>(kNR, cols - n0));
    const int64_t m0 = ch * kMC;
    const int64_t m1 = std::min(M, m0 + kMC);
    ComputeTile(ops, nops, m0, m1, n0, nr, bias, out, cols);
  });
}

void AddSparse(const Problem& p, const ParallelRunner& par) {
  const SparseMatrix& S = p.s;
  std::vector<float> vals(static_cast<size_t>(S.nnz));
  for (int64_t i = 0; i < S.nnz; ++i) vals[i] = HalfToFloat(S.vals[i]);
  constexpr int64_t kRowsPerItem = 8;
  const int64_t nitems = (p.M + kRowsPerItem - 1) / kRowsPerItem;
  par.For(static_cast<size_t>(nitems), [&](size_t item) {
    const int64_t m0 = static_cast<int64_t>(item) * kRowsPerItem;
    const int64_t m1 = std::min(p.M, m0 + kRowsPerItem);
    for (int64_t m = m0; m < m1; ++m) {
      const float* x = p.x + m * p.K;
      float* y = p.y + m * p.N;
      for (int64_t k = 0; k < p.K; ++k) {
        const float xv = x[k];
        for (int32_t i = S.rowptr[k]; i < S.rowptr[k + 1]; ++i) y[S.colidx[i]] += xv * vals[i];
      }
    }
  });
}

}  // namespace

void ComputeCpu(const Problem& p, const ParallelRunner& par, const CpuPrepacked* pre) {
  if (p.M <= 0) return;
  // With act_int8, the parts with codes of at most 4 bits take the int8
  // product and are added after the float parts (and the bias).
  const bool q8 = p.act_int8 && p.q.present() && Int8Eligible(p.q);
  const bool l8 = p.act_int8 && p.rank > 0 && Int8Eligible(p.l);
  const bool r8 = p.act_int8 && p.rank > 0 && Int8Eligible(p.r);
  std::vector<float> t;
  Operand ops[2];
  int nops = 0;
  if (p.q.present() && !q8) ops[nops++] = Operand{p.x, p.K, &p.q};
  if (p.rank > 0) {
    t.assign(static_cast<size_t>(p.M * p.rank), 0.0f);
    if (l8) {
      Int8Accumulate(p.x, p.K, p.M, p.l, t.data(), p.rank, par,
                     pre != nullptr ? pre->l.get() : nullptr);
    } else {
      const Operand lop{p.x, p.K, &p.l};
      TiledProduct(&lop, 1, p.M, p.rank, nullptr, t.data(), par);
    }
    if (!r8) ops[nops++] = Operand{t.data(), p.rank, &p.r};
  }
  if (nops > 0) {
    TiledProduct(ops, nops, p.M, p.N, p.bias, p.y, par);
  } else {
    for (int64_t m = 0; m < p.M; ++m) {
      float* y = p.y + m * p.N;
      if (p.bias != nullptr) {
        std::memcpy(y, p.bias, sizeof(float) * p.N);
      } else {
        std::memset(y, 0, sizeof(float) * p.N);
      }
    }
  }
  if (q8) {
    Int8Accumulate(p.x, p.K, p.M, p.q, p.y, p.N, par, pre != nullptr ? pre->q.get() : nullptr);
  }
  if (r8) {
    Int8Accumulate(t.data(), p.rank, p.M, p.r, p.y, p.N, par,
                   pre != nullptr ? pre->r.get() : nullptr);
  }
  if (p.s.present && p.s.nnz > 0) AddSparse(p, par);
}

namespace {

class SerialRunner : public ParallelRunner {
 public:
  void For(size_t n, const std::function<void(size_t)>& fn) const override {
    for (size_t i = 0; i < n; ++i) fn(i);
  }
};

// The int8 weights of one part when its inputs are constant, else empty.
std::shared_ptr<const Int8Weights> PrepackPart(const OrtApi& api, const OrtKernelInfo* info,
                                               int first, int64_t bits, int64_t block,
                                               int64_t depth, int64_t cols) {
  QuantMatrix m;
  if (bits <= 0 || !ConstantQuant(api, info, first, bits, block, depth, cols, &m) ||
      !Int8Eligible(m)) {
    return nullptr;
  }
  return DecodeInt8Weights(m, SerialRunner());
}

}  // namespace

void PrepackCpu(const OrtApi& api, const OrtKernelInfo* info, const Attributes& a,
                CpuPrepacked* out) {
  *out = CpuPrepacked();
  if (!a.act_int8) return;
  if (a.q_bits != 0) out->q = PrepackPart(api, info, kQB, a.q_bits, a.q_block, a.K, a.N);
  if (a.rank > 0) {
    out->l = PrepackPart(api, info, kLB, a.l_bits, a.l_block, a.K, a.rank);
    out->r = PrepackPart(api, info, kRB, a.r_bits, a.r_block, a.rank, a.N);
  }
}

}  // namespace qsd
