// Int8-activation product of QsdMatMul (see qsd_cpu_int8.h).
//
// Layout. With bk4 = ceil(block / 4) groups of 4 depth values per block (the
// block padded to bp = 4 * bk4), a row of activations becomes kb * bp bytes
// holding q + 128 (unsigned). The output is produced in tiles of kTN = 16
// columns; the codes of a tile are decoded once into w = code - zp (int8, in
// [-15, 15]) laid out as [block][group][column][4 values], so that the 64
// bytes of one group hold 4 consecutive depth values of all 16 columns. A
// multiply-accumulate of unsigned bytes with signed bytes into 32-bit lanes
// (vpdpbusd, or vpmaddubsw + vpmaddwd) then adds the products of one group
// to one lane per column, with the 4 activation bytes broadcast to all lanes.
// The offset of 128 is removed exactly by starting each block's integer sum
// at -128 * sum(w) of the column. Pairs of products stay within int16 in
// vpmaddubsw: 2 * 255 * 15 < 32767.
//
// The tile (at most 16 * depth bytes plus scales) stays in L1/L2 while all
// rows are multiplied with it; tiles (and, when they are few, row chunks) are
// the parallel work items. Constant weights are decoded once, when the kernel
// is created (DecodeInt8Weights); otherwise every call decodes each tile.
//
// Kernels: the baseline (scalar), AVX2 (vpmaddubsw + vpmaddwd, 4 rows x 16
// columns per step) and AVX-512 VNNI (vpdpbusd, 8 rows x 16 columns, or 6
// rows x 32 columns over two decoded tiles), picked at run time;
// QSDONNX_CPU_ISA=base|avx2 caps the choice as for the float kernels.
#include "qsd_cpu_int8.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace qsd {
namespace {

constexpr int kTN = kInt8TileCols;  // columns per tile
using Tile = Int8Tile;

int ZeroPointOf(const QuantMatrix& B, int64_t col, int64_t blk) {
  if (B.zp == nullptr) return 1 << (B.bits - 1);
  const int64_t bit = blk * B.bits;
  const uint8_t byte = B.zp[col * B.zp_stride + bit / 8];
  return (byte >> (bit % 8)) & ((1 << B.bits) - 1);
}

// Decodes the codes, block scales and column sums of the tile, one value at a
// time. Columns nr..kTN-1 are zero.
void DecodeTileScalar(const QuantMatrix& B, int64_t n0, int nr, int64_t bk4, Tile* tile) {
  const int per = 8 / B.bits;
  const unsigned mask = (1u << B.bits) - 1u;
  const int64_t bp = bk4 * 4;
  for (int64_t b = 0; b < B.kb; ++b) {
    const int64_t count = std::min(B.block, B.depth - b * B.block);
    for (int j = 0; j < kTN; ++j) {
      int32_t sum = 0;
      float scale = 0.0f;
      int8_t* dst = tile->w.data() + b * bk4 * kTN * 4 + j * 4;
      if (j < nr) {
        const int64_t n = n0 + j;
        const int zp = ZeroPointOf(B, n, b);
        scale = HalfToFloat(B.scales[n * B.kb + b]);
        const uint8_t* p = B.codes + n * B.col_bytes + b * B.blk_bytes;
        for (int64_t t = 0; t < bp; ++t) {
          int v = 0;
          if (t < count) {
            v = static_cast<int>((static_cast<unsigned>(p[t / per]) >> ((t % per) * B.bits)) &
                                 mask) - zp;
          }
          sum += v;
          dst[(t / 4) * kTN * 4 + t % 4] = static_cast<int8_t>(v);
        }
      } else {
        for (int64_t t = 0; t < bp; ++t) dst[(t / 4) * kTN * 4 + t % 4] = 0;
      }
      tile->csum[b * kTN + j] = -128 * sum;
      tile->scale[b * kTN + j] = scale;
    }
  }
}

// Baseline: the same arithmetic, one lane at a time.
namespace isa_base {
#include "qsd_cpu_int8_quant.inc"

void DecodeTile(const QuantMatrix& B, int64_t n0, int nr, int64_t bk4, Tile* tile) {
  DecodeTileScalar(B, n0, nr, bk4, tile);
}

void TileRows(const uint8_t* a8, int64_t lda8, const float* asc, int64_t kb, int64_t bk4,
              int64_t rows, const Tile& tile, float* out, int64_t ldo, int nr) {
  for (int64_t m = 0; m < rows; ++m) {
    float acc[kTN] = {};
    for (int64_t b = 0; b < kb; ++b) {
      int32_t iacc[kTN];
      for (int j = 0; j < kTN; ++j) iacc[j] = tile.csum[b * kTN + j];
      const int8_t* wb = tile.w.data() + b * bk4 * kTN * 4;
      const uint8_t* ab = a8 + m * lda8 + b * bk4 * 4;
      for (int64_t g = 0; g < bk4; ++g) {
        for (int j = 0; j < kTN; ++j) {
          const int8_t* w = wb + (g * kTN + j) * 4;
          iacc[j] += ab[g * 4] * w[0] + ab[g * 4 + 1] * w[1] + ab[g * 4 + 2] * w[2] +
                     ab[g * 4 + 3] * w[3];
        }
      }
      const float sa = asc[m * kb + b];
      for (int j = 0; j < kTN; ++j) {
        acc[j] += static_cast<float>(iacc[j]) * (tile.scale[b * kTN + j] * sa);
      }
    }
    for (int j = 0; j < nr; ++j) out[m * ldo + j] += acc[j];
  }
}
}  // namespace isa_base

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define QSD_INT8_ISA_COPIES 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
namespace portable {
#include "qsd_cpu_int8_quant.inc"
}  // namespace portable

// The rounding of _mm256_round_ps to nearest is ties to even, as rint.
void QuantizeRows(const float* a, int64_t lda, int64_t m0, int64_t m1, int64_t depth,
                  int64_t block, int64_t kb, int64_t bp, uint8_t* dst, float* scales) {
  if (block % 8 != 0 || depth % block != 0) {
    portable::QuantizeRows(a, lda, m0, m1, depth, block, kb, bp, dst, scales);
    return;
  }
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127);
  const __m256i hi = _mm256_set1_epi32(127);
  const __m256i offset = _mm256_set1_epi32(128);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a + m * lda;
    uint8_t* q = dst + m * kb * bp;
    for (int64_t b = 0; b < kb; ++b) {
      const float* xb = x + b * block;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t t = 0; t < block; t += 8) {
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + t)));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      const float amax = _mm_cvtss_f32(h);
      uint8_t* qb = q + b * bp;
      if (amax > 0.0f) {
        const __m256 inv = _mm256_set1_ps(127.0f / amax);
        for (int64_t t = 0; t < block; t += 8) {
          const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + t), inv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          __m256i v = _mm256_cvtps_epi32(r);
          v = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(v, lo), hi), offset);
          // 8 values in [1, 255] to 8 bytes.
          const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v),
                                             _mm256_extracti128_si256(v, 1));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(qb + t), _mm_packus_epi16(w, w));
        }
        scales[m * kb + b] = amax / 127.0f;
      } else {
        std::memset(qb, 128, static_cast<size_t>(block));
        scales[m * kb + b] = 0.0f;
      }
      if (bp > block) std::memset(qb + block, 128, static_cast<size_t>(bp - block));
    }
  }
}

// Columns n0..n0+15 of 4-bit codes in whole blocks of 32 values: every 16
// packed bytes of a column unpack to 32 codes (8 groups); the groups of 4
// columns at a time are transposed into place with 32-bit unpacks.
void DecodeTile4(const QuantMatrix& B, int64_t n0, int64_t bk4, Tile* tile) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const int64_t chunks = B.blk_bytes / 16;
  for (int64_t b = 0; b < B.kb; ++b) {
    int8_t* wblk = tile->w.data() + b * bk4 * kTN * 4;
    for (int jq = 0; jq < kTN; jq += 4) {
      const uint8_t* src[4];
      __m128i zp[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + jq + i;
        src[i] = B.codes + n * B.col_bytes + b * B.blk_bytes;
        zp[i] = _mm_set1_epi8(static_cast<char>(ZeroPointOf(B, n, b)));
      }
      __m128i sums[4];
      for (int i = 0; i < 4; ++i) sums[i] = _mm_setzero_si128();
      for (int64_t c = 0; c < chunks; ++c) {
        __m128i lo[4], hi[4];
        for (int i = 0; i < 4; ++i) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[i] + c * 16));
          const __m128i l = _mm_and_si128(v, low);
          const __m128i h = _mm_and_si128(_mm_srli_epi16(v, 4), low);
          sums[i] = _mm_add_epi64(sums[i], _mm_sad_epu8(_mm_add_epi8(l, h), _mm_setzero_si128()));
          lo[i] = _mm_sub_epi8(_mm_unpacklo_epi8(l, h), zp[i]);  // groups 0..3
          hi[i] = _mm_sub_epi8(_mm_unpackhi_epi8(l, h), zp[i]);  // groups 4..7
        }
        for (int half = 0; half < 2; ++half) {
          const __m128i* r = half == 0 ? lo : hi;
          const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]);
          const __m128i t1 = _mm_unpacklo_epi32(r[2], r[3]);
          const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]);
          const __m128i t3 = _mm_unpackhi_epi32(r[2], r[3]);
          const __m128i g[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1),
                                _mm_unpacklo_epi64(t2, t3), _mm_unpackhi_epi64(t2, t3)};
          const int64_t g0 = c * 8 + half * 4;
          for (int e = 0; e < 4; ++e) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(wblk + ((g0 + e) * kTN + jq) * 4), g[e]);
          }
        }
      }
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + jq + i;
        const int32_t code_sum = static_cast<int32_t>(_mm_cvtsi128_si64(sums[i]) +
                                                      _mm_extract_epi64(sums[i], 1));
        const int32_t w_sum = code_sum - ZeroPointOf(B, n, b) * static_cast<int32_t>(B.block);
        tile->csum[b * kTN + jq + i] = -128 * w_sum;
        tile->scale[b * kTN + jq + i] = HalfToFloat(B.scales[n * B.kb + b]);
      }
    }
  }
}

void DecodeTile(const QuantMatrix& B, int64_t n0, int nr, int64_t bk4, Tile* tile) {
  if (B.bits == 4 && nr == kTN && B.block % 32 == 0) {
    DecodeTile4(B, n0, bk4, tile);
    // The sums cover the whole last block, codes past the depth included:
    // those meet activations q = 0 stored as 128, so the offset needs them.
    return;
  }
  DecodeTileScalar(B, n0, nr, bk4, tile);
}

template <int MR>
inline __attribute__((always_inline)) void TileRowsT(const uint8_t* a8, int64_t lda8,
                                                      const float* asc, int64_t kb, int64_t bk4,
                                                      const Tile& tile, float* out, int64_t ldo,
                                                      int nr) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const __m256i init0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&tile.csum[b * kTN]));
    const __m256i init1 =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&tile.csum[b * kTN + 8]));
    __m256i i0[MR], i1[MR];
    for (int r = 0; r < MR; ++r) {
      i0[r] = init0;
      i1[r] = init1;
    }
    const int8_t* wb = tile.w.data() + b * bk4 * kTN * 4;
    const uint8_t* ab = a8 + b * bk4 * 4;
    for (int64_t g = 0; g < bk4; ++g) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64 + 32));
      for (int r = 0; r < MR; ++r) {
        int32_t av;
        std::memcpy(&av, ab + r * lda8 + g * 4, sizeof(av));
        const __m256i a = _mm256_set1_epi32(av);
        i0[r] = _mm256_add_epi32(i0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones));
        i1[r] = _mm256_add_epi32(i1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w1), ones));
      }
    }
    const __m256 s0 = _mm256_loadu_ps(&tile.scale[b * kTN]);
    const __m256 s1 = _mm256_loadu_ps(&tile.scale[b * kTN + 8]);
    for (int r = 0; r < MR; ++r) {
      const __m256 sa = _mm256_set1_ps(asc[r * kb + b]);
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0[r]), _mm256_mul_ps(s0, sa), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1[r]), _mm256_mul_ps(s1, sa), acc1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * ldo;
    if (nr == kTN) {
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc0[r]));
      _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc1[r]));
    } else {
      float tmp[kTN];
      _mm256_storeu_ps(tmp, acc0[r]);
      _mm256_storeu_ps(tmp + 8, acc1[r]);
      for (int j = 0; j < nr; ++j) o[j] += tmp[j];
    }
  }
}

void TileRows(const uint8_t* a8, int64_t lda8, const float* asc, int64_t kb, int64_t bk4,
              int64_t rows, const Tile& tile, float* out, int64_t ldo, int nr) {
  constexpr int kMR = 4;
  int64_t m = 0;
  for (; m + kMR <= rows; m += kMR) {
    TileRowsT<kMR>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, tile, out + m * ldo, ldo, nr);
  }
  for (; m < rows; ++m) {
    TileRowsT<1>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, tile, out + m * ldo, ldo, nr);
  }
}
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")
// GCC 12 reports its own _mm512_undefined_ps in the conversion intrinsic.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace isa_vnni512 {

// BK4 > 0: the groups per block known at compile time (the group loop
// unrolls); 0: given by bk4.
template <int MR, int BK4>
inline __attribute__((always_inline)) void TileRowsT(const uint8_t* a8, int64_t lda8,
                                                      const float* asc, int64_t kb, int64_t bk4,
                                                      const Tile& tile, float* out, int64_t ldo,
                                                      int nr) {
  if (BK4 > 0) bk4 = BK4;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const __m512i init = _mm512_loadu_si512(&tile.csum[b * kTN]);
    __m512i iacc[MR];
    for (int r = 0; r < MR; ++r) iacc[r] = init;
    const int8_t* wb = tile.w.data() + b * bk4 * kTN * 4;
    const uint8_t* ab = a8 + b * bk4 * 4;
    for (int64_t g = 0; g < bk4; ++g) {
      const __m512i w = _mm512_loadu_si512(wb + g * 64);
      for (int r = 0; r < MR; ++r) {
        int32_t av;
        std::memcpy(&av, ab + r * lda8 + g * 4, sizeof(av));
        iacc[r] = _mm512_dpbusd_epi32(iacc[r], _mm512_set1_epi32(av), w);
      }
    }
    const __m512 s = _mm512_loadu_ps(&tile.scale[b * kTN]);
    for (int r = 0; r < MR; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]),
                               _mm512_mul_ps(s, _mm512_set1_ps(asc[r * kb + b])), acc[r]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>(nr == kTN ? 0xFFFFu : ((1u << nr) - 1u));
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * ldo;
    _mm512_mask_storeu_ps(o, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), acc[r]));
  }
}

template <int BK4>
void TileRowsB(const uint8_t* a8, int64_t lda8, const float* asc, int64_t kb, int64_t bk4,
               int64_t rows, const Tile& tile, float* out, int64_t ldo, int nr) {
  constexpr int kMR = 8;
  int64_t m = 0;
  for (; m + kMR <= rows; m += kMR) {
    TileRowsT<kMR, BK4>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, tile, out + m * ldo, ldo, nr);
  }
  for (; m + 4 <= rows; m += 4) {
    TileRowsT<4, BK4>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, tile, out + m * ldo, ldo, nr);
  }
  for (; m < rows; ++m) {
    TileRowsT<1, BK4>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, tile, out + m * ldo, ldo, nr);
  }
}

// Two adjacent tiles (the second one full) at once: every broadcast of 4
// activation bytes feeds two multiply-accumulates.
template <int MR, int BK4>
inline __attribute__((always_inline)) void PairRowsT(const uint8_t* a8, int64_t lda8,
                                                      const float* asc, int64_t kb, int64_t bk4,
                                                      const Tile& t0, const Tile& t1, float* out,
                                                      int64_t ldo, int nr1) {
  if (BK4 > 0) bk4 = BK4;
  __m512 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const __m512i init0 = _mm512_loadu_si512(&t0.csum[b * kTN]);
    const __m512i init1 = _mm512_loadu_si512(&t1.csum[b * kTN]);
    __m512i i0[MR], i1[MR];
    for (int r = 0; r < MR; ++r) {
      i0[r] = init0;
      i1[r] = init1;
    }
    const int8_t* wb0 = t0.w.data() + b * bk4 * kTN * 4;
    const int8_t* wb1 = t1.w.data() + b * bk4 * kTN * 4;
    const uint8_t* ab = a8 + b * bk4 * 4;
    for (int64_t g = 0; g < bk4; ++g) {
      const __m512i w0 = _mm512_loadu_si512(wb0 + g * 64);
      const __m512i w1 = _mm512_loadu_si512(wb1 + g * 64);
      for (int r = 0; r < MR; ++r) {
        int32_t av;
        std::memcpy(&av, ab + r * lda8 + g * 4, sizeof(av));
        const __m512i a = _mm512_set1_epi32(av);
        i0[r] = _mm512_dpbusd_epi32(i0[r], a, w0);
        i1[r] = _mm512_dpbusd_epi32(i1[r], a, w1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(&t0.scale[b * kTN]);
    const __m512 s1 = _mm512_loadu_ps(&t1.scale[b * kTN]);
    for (int r = 0; r < MR; ++r) {
      const __m512 sa = _mm512_set1_ps(asc[r * kb + b]);
      acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0[r]), _mm512_mul_ps(s0, sa), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1[r]), _mm512_mul_ps(s1, sa), acc1[r]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>(nr1 == kTN ? 0xFFFFu : ((1u << nr1) - 1u));
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * ldo;
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc0[r]));
    _mm512_mask_storeu_ps(o + kTN, mask,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o + kTN), acc1[r]));
  }
}

template <int BK4>
void PairRowsB(const uint8_t* a8, int64_t lda8, const float* asc, int64_t kb, int64_t bk4,
               int64_t rows, const Tile& t0, const Tile& t1, float* out, int64_t ldo, int nr1) {
  constexpr int kMR = 6;
  int64_t m = 0;
  for (; m + kMR <= rows; m += kMR) {
    PairRowsT<kMR, BK4>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, t0, t1, out + m * ldo, ldo,
                        nr1);
  }
  for (; m < rows; ++m) {
    PairRowsT<1, BK4>(a8 + m * lda8, lda8, asc + m * kb, kb, bk4, t0, t1, out + m * ldo, ldo,
                      nr1);
  }
}

void PairRows(const uint8_t* a8, int64_t lda8, const float* asc, int64_t kb, int64_t bk4,
              int64_t rows, const Tile& t0, const Tile& t1, float* out, int64_t ldo, int nr1) {
  if (bk4 == 8) {
    PairRowsB<8>(a8, lda8, asc, kb, bk4, rows, t0, t1, out, ldo, nr1);
  } else {
    PairRowsB<0>(a8, lda8, asc, kb, bk4, rows, t0, t1, out, ldo, nr1);
  }
}

void TileRows(const uint8_t* a8, int64_t lda8, const float* asc, int64_t kb, int64_t bk4,
              int64_t rows, const Tile& tile, float* out, int64_t ldo, int nr) {
  if (bk4 == 8) {
    TileRowsB<8>(a8, lda8, asc, kb, bk4, rows, tile, out, ldo, nr);
  } else {
    TileRowsB<0>(a8, lda8, asc, kb, bk4, rows, tile, out, ldo, nr);
  }
}
}  // namespace isa_vnni512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

using QuantizeFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, uint8_t*, float*);
using DecodeFn = void (*)(const QuantMatrix&, int64_t, int, int64_t, Tile*);
using TileRowsFn = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t,
                            const Tile&, float*, int64_t, int);
using PairRowsFn = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t,
                            const Tile&, const Tile&, float*, int64_t, int);

struct Int8Kernels {
  QuantizeFn quantize;
  DecodeFn decode;
  TileRowsFn rows;
  PairRowsFn pair;  // two adjacent tiles at once, or nullptr
};

Int8Kernels SelectInt8Kernels() {
  const Int8Kernels base{&isa_base::QuantizeRows, &isa_base::DecodeTile, &isa_base::TileRows,
                         nullptr};
#if defined(QSD_INT8_ISA_COPIES)
  __builtin_cpu_init();
  const char* forced = std::getenv("QSDONNX_CPU_ISA");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool vnni512 = avx2 && __builtin_cpu_supports("avx512f") &&
                       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512vnni");
  const Int8Kernels k2{&isa_avx2::QuantizeRows, &isa_avx2::DecodeTile, &isa_avx2::TileRows,
                       nullptr};
  const Int8Kernels k512{&isa_avx2::QuantizeRows, &isa_avx2::DecodeTile,
                         &isa_vnni512::TileRows, &isa_vnni512::PairRows};
  if (forced != nullptr) {
    if (std::strcmp(forced, "base") == 0) return base;
    if (std::strcmp(forced, "avx2") == 0 && avx2) return k2;
  }
  if (vnni512) return k512;
  if (avx2) return k2;
#endif
  return base;
}

const Int8Kernels& ActiveInt8Kernels() {
  static const Int8Kernels k = SelectInt8Kernels();
  return k;
}

Tile& ThreadTile() {
  thread_local Tile t;
  return t;
}

void ResizeTile(const QuantMatrix& B, int64_t bk4, Tile* tile) {
  tile->w.resize(static_cast<size_t>(B.kb * bk4 * kTN * 4));
  tile->csum.resize(static_cast<size_t>(B.kb * kTN));
  tile->scale.resize(static_cast<size_t>(B.kb * kTN));
}

}  // namespace

std::shared_ptr<const Int8Weights> DecodeInt8Weights(const QuantMatrix& B,
                                                     const ParallelRunner& par) {
  auto out = std::make_shared<Int8Weights>();
  out->depth = B.depth;
  out->cols = B.cols;
  const int64_t ntiles = (B.cols + kTN - 1) / kTN;
  const int64_t bk4 = (B.block + 3) / 4;
  out->tiles.resize(static_cast<size_t>(ntiles));
  const Int8Kernels& k = ActiveInt8Kernels();
  par.For(static_cast<size_t>(ntiles), [&](size_t t) {
    const int64_t n0 = static_cast<int64_t>(t) * kTN;
    const int nr = static_cast<int>(std::min<int64_t>(kTN, B.cols - n0));
    ResizeTile(B, bk4, &out->tiles[t]);
    k.decode(B, n0, nr, bk4, &out->tiles[t]);
  });
  return out;
}

void Int8Accumulate(const float* a, int64_t lda, int64_t rows, const QuantMatrix& B, float* out,
                    int64_t ldo, const ParallelRunner& par, const Int8Weights* pre) {
  if (rows <= 0 || B.cols <= 0) return;
  if (pre != nullptr && (pre->depth != B.depth || pre->cols != B.cols)) pre = nullptr;
  const Int8Kernels& k = ActiveInt8Kernels();
  const int64_t bk4 = (B.block + 3) / 4;
  const int64_t bp = bk4 * 4;
  const int64_t lda8 = B.kb * bp;
  std::vector<uint8_t> a8(static_cast<size_t>(rows * lda8));
  std::vector<float> asc(static_cast<size_t>(rows * B.kb));
  constexpr int64_t kQuantRows = 32;
  par.For(static_cast<size_t>((rows + kQuantRows - 1) / kQuantRows), [&](size_t item) {
    const int64_t m0 = static_cast<int64_t>(item) * kQuantRows;
    const int64_t m1 = std::min(rows, m0 + kQuantRows);
    k.quantize(a, lda, m0, m1, B.depth, B.block, B.kb, bp, a8.data(), asc.data());
  });
  const int64_t ntiles = (B.cols + kTN - 1) / kTN;
  // With decoded weights at hand, the items may hold two adjacent tiles.
  const int64_t span = (pre != nullptr && k.pair != nullptr) ? 2 : 1;
  const int64_t nitems = (ntiles + span - 1) / span;
  // Few items (a narrow low-rank factor): split the rows too.
  const int64_t mchunk = nitems >= 8 ? rows : 32;
  const int64_t nchunks = (rows + mchunk - 1) / mchunk;
  par.For(static_cast<size_t>(nitems * nchunks), [&](size_t item) {
    const int64_t t = static_cast<int64_t>(item) % nitems * span;
    const int64_t ch = static_cast<int64_t>(item) / nitems;
    const int64_t n0 = t * kTN;
    const int64_t m0 = ch * mchunk;
    const int64_t m1 = std::min(rows, m0 + mchunk);
    const uint8_t* am = a8.data() + m0 * lda8;
    const float* sm = asc.data() + m0 * B.kb;
    float* om = out + m0 * ldo + n0;
    if (span == 2 && t + 1 < ntiles) {
      const int nr1 = static_cast<int>(std::min<int64_t>(kTN, B.cols - n0 - kTN));
      k.pair(am, lda8, sm, B.kb, bk4, m1 - m0, pre->tiles[static_cast<size_t>(t)],
             pre->tiles[static_cast<size_t>(t + 1)], om, ldo, nr1);
      return;
    }
    const int nr = static_cast<int>(std::min<int64_t>(kTN, B.cols - n0));
    const Tile* tile = pre != nullptr ? &pre->tiles[static_cast<size_t>(t)] : nullptr;
    if (tile == nullptr) {
      Tile& scratch = ThreadTile();
      ResizeTile(B, bk4, &scratch);
      k.decode(B, n0, nr, bk4, &scratch);
      tile = &scratch;
    }
    k.rows(am, lda8, sm, B.kb, bk4, m1 - m0, *tile, om, ldo, nr);
  });
}

}  // namespace qsd
