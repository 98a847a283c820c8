// CUDA kernels of QsdMatMul.
//
// Y = X . deq(Q) + (X . deq(L)) . deq(R) + X . S + bias is computed as
//   1. T = X . deq(L)                      (when rank > 0; T in a workspace)
//   2. Y = X . deq(Q) + T . deq(R) + bias  (one kernel, both products summed)
//   3. Y += X . S                          (CSR rows, atomic accumulation)
// Every product reads the packed codes once per group of up to 8 rows of X,
// in the same float32 arithmetic as the CPU kernel:
//   - Word kernel (2/4/8-bit codes whose blocks hold a whole number of 32-bit
//     words, i.e. block * bits % 32 == 0, as MatMulNBits' layouts do). A warp
//     owns 4 output columns; its lanes read consecutive 32-bit words of each
//     column (coalesced, several words per lane in flight), turn their codes
//     into floats with byte permutes and multiply them with rows of X read
//     through the L1 cache. The depth is split across blocks when the columns
//     alone do not fill the GPU; the partial sums are then added by a second
//     kernel, in a fixed order, so results do not change from run to run.
//   - Generic kernels for any other block size: one warp per column for up to
//     16 rows, a shared-memory tiled GEMM beyond.
#include "qsd_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

namespace qsd {
namespace {

constexpr int kSkinnyMaxRows = 16;
constexpr int kSkinnyWarps = 4;

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;

constexpr int kWordWarps = 8;                          // warps per block
constexpr int kWordCols = 4;                           // output columns per warp
constexpr int kWordBlockCols = kWordWarps * kWordCols;
constexpr int kWordMaxRows = 8;                        // rows of X per block
constexpr int kWordVec = 2;                            // words per lane per step
constexpr int kWordMaxSplit = 64;

struct DevQuant {
  const uint8_t* codes;
  const __half* scales;
  const uint8_t* zp;
  const float* a;      // left operand, rows x depth
  long long lda;
  int bits;
  long long block;
  long long depth;
  long long cols;
  long long kb;
  long long blk_bytes;
  long long col_bytes;
  long long zp_stride;
  int word_shift;      // log2(32-bit words per block); -1: not a whole power of two
};

struct DevOperands {
  DevQuant op[2];
  int count;
};

DevQuant MakeDev(const QuantMatrix& q, const float* a, long long lda) {
  DevQuant d;
  d.codes = q.codes;
  d.scales = reinterpret_cast<const __half*>(q.scales);
  d.zp = q.zp;
  d.a = a;
  d.lda = lda;
  d.bits = q.bits;
  d.block = q.block;
  d.depth = q.depth;
  d.cols = q.cols;
  d.kb = q.kb;
  d.blk_bytes = q.blk_bytes;
  d.col_bytes = q.col_bytes;
  d.zp_stride = q.zp_stride;
  d.word_shift = -1;
  const long long bits = q.block * q.bits;
  if (bits > 0 && bits % 32 == 0 && q.blk_bytes * 8 == bits) {
    const long long words = bits / 32;
    if ((words & (words - 1)) == 0) {
      int sh = 0;
      while ((1LL << sh) < words) ++sh;
      d.word_shift = sh;
    }
  }
  return d;
}

__device__ __forceinline__ int DevZeroPoint(const DevQuant& B, long long n, long long blk) {
  if (B.zp == nullptr) return 1 << (B.bits - 1);
  const long long bit = blk * B.bits;
  const unsigned byte = B.zp[n * B.zp_stride + (bit >> 3)];
  return static_cast<int>((byte >> (bit & 7)) & ((1u << B.bits) - 1u));
}

// Dequantized element (k, n) of B.
__device__ __forceinline__ float DevWeight(const DevQuant& B, long long k, long long n) {
  const long long blk = k / B.block;
  const long long e = k - blk * B.block;
  const long long bit = e * B.bits;
  const unsigned byte = B.codes[n * B.col_bytes + blk * B.blk_bytes + (bit >> 3)];
  const int code = static_cast<int>((byte >> (bit & 7)) & ((1u << B.bits) - 1u));
  const float scale = __half2float(B.scales[n * B.kb + blk]);
  return static_cast<float>(code - DevZeroPoint(B, n, blk)) * scale;
}

// One warp per output column n; out[m, n] for m < rows.
__global__ void SkinnyKernel(DevOperands ops, long long rows, long long cols,
                             const float* __restrict__ bias, float* __restrict__ out,
                             long long ldo) {
  const int lane = threadIdx.x & 31;
  const long long n = static_cast<long long>(blockIdx.x) * kSkinnyWarps + (threadIdx.x >> 5);
  if (n >= cols) return;
  float acc[kSkinnyMaxRows];
#pragma unroll
  for (int m = 0; m < kSkinnyMaxRows; ++m) acc[m] = 0.0f;

  for (int o = 0; o < ops.count; ++o) {
    const DevQuant& B = ops.op[o];
    const int per = 8 / B.bits;
    const unsigned mask = (1u << B.bits) - 1u;
    const uint8_t* col = B.codes + n * B.col_bytes;
    for (long long byte = lane; byte < B.col_bytes; byte += 32) {
      const long long blk = byte / B.blk_bytes;
      const long long k0 = blk * B.block + (byte - blk * B.blk_bytes) * per;
      if (k0 >= B.depth) continue;
      const float scale = __half2float(B.scales[n * B.kb + blk]);
      const int zp = DevZeroPoint(B, n, blk);
      const unsigned packed = __ldg(col + byte);
      for (int e = 0; e < per; ++e) {
        const long long k = k0 + e;
        if (k >= B.depth) break;
        const int code = static_cast<int>((packed >> (e * B.bits)) & mask);
        const float w = static_cast<float>(code - zp) * scale;
        const float* a = B.a + k;
#pragma unroll
        for (int m = 0; m < kSkinnyMaxRows; ++m) {
          if (m < rows) acc[m] += w * __ldg(a + m * B.lda);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kSkinnyMaxRows; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    acc[m] = v;
  }
  if (lane == 0) {
    const float b = bias != nullptr ? bias[n] : 0.0f;
    for (int m = 0; m < rows && m < kSkinnyMaxRows; ++m) out[m * ldo + n] = acc[m] + b;
  }
}

// Tiled GEMM: block (kTileM x kTileN) of out; each thread owns 4 x 4 outputs
// at rows ty + 16 i and columns tx + 16 j.
__global__ void __launch_bounds__(kTileThreads)
TiledKernel(DevOperands ops, long long rows, long long cols, const float* __restrict__ bias,
            float* __restrict__ out, long long ldo) {
  __shared__ float As[kTileM][kTileK + 1];
  __shared__ float Bs[kTileK][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid & 15;
  const int ty = tid >> 4;
  const long long m0 = static_cast<long long>(blockIdx.x) * kTileM;
  const long long n0 = static_cast<long long>(blockIdx.y) * kTileN;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int o = 0; o < ops.count; ++o) {
    const DevQuant& B = ops.op[o];
    for (long long k0 = 0; k0 < B.depth; k0 += kTileK) {
      for (int idx = tid; idx < kTileM * kTileK; idx += kTileThreads) {
        const int r = idx / kTileK;
        const int c = idx % kTileK;
        const long long m = m0 + r;
        const long long k = k0 + c;
        As[r][c] = (m < rows && k < B.depth) ? B.a[m * B.lda + k] : 0.0f;
      }
      for (int idx = tid; idx < kTileN * kTileK; idx += kTileThreads) {
        const int c = idx / kTileK;
        const int r = idx % kTileK;
        const long long n = n0 + c;
        const long long k = k0 + r;
        Bs[r][c] = (n < cols && k < B.depth) ? DevWeight(B, k, n) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kTileK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long long m = m0 + ty + 16 * i;
    if (m >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const long long n = n0 + tx + 16 * j;
      if (n < cols) out[m * ldo + n] = acc[i][j] + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

__global__ void FillKernel(long long rows, long long cols, const float* __restrict__ bias,
                           float* __restrict__ out) {
  const long long total = rows * cols;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    out[i] = bias != nullptr ? bias[i % cols] : 0.0f;
  }
}

// out[m, :] += x[m, k] * S[k, :] for every (m, k).
__global__ void SparseKernel(long long rows, long long K, long long N, long long nnz,
                             const float* __restrict__ x, const int32_t* __restrict__ rowptr,
                             const int32_t* __restrict__ colidx, const __half* __restrict__ vals,
                             float* __restrict__ out) {
  const long long total = rows * K;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long m = i / K;
    const long long k = i - m * K;
    const float xv = x[i];
    const long long begin = max(0LL, min(nnz, static_cast<long long>(rowptr[k])));
    const long long end = max(begin, min(nnz, static_cast<long long>(rowptr[k + 1])));
    for (long long j = begin; j < end; ++j) {
      const int c = colidx[j];
      if (c >= 0 && c < N) atomicAdd(out + m * N + c, xv * __half2float(vals[j]));
    }
  }
}

// ---------------------------------------------------------------------------
// Word kernel
// ---------------------------------------------------------------------------

// Reads A[row0 + m, k0 : k0 + N] into v (zeros past depth).
template <int N>
__device__ __forceinline__ void LoadRow(const DevQuant& B, int row, int k0, bool vec, float* v) {
  const float* a = B.a + static_cast<long long>(row) * B.lda + k0;
  if (vec && k0 + N <= B.depth) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(a) + q);
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = k0 + i < B.depth ? __ldg(a + i) : 0.0f;
  }
}

// Adds this warp's share of A[row0 : row0 + nrows] . deq(B) to acc: columns
// col0 + c (c < kWordCols) and the words [w0, w1) of each column, kWordVec
// words per lane at a time (lane, lane + 32, ...: each a coalesced warp load).
// One row: each word's codes are summed against X first and scaled once.
// More rows: the codes are scaled first ((c - z) * s is exact in float32, an
// 8-bit integer times a float16), so each row costs one FMA per code.
template <int MR, int BITS>
__device__ __forceinline__ void WordProduct(const DevQuant& B, int row0, int nrows, int col0,
                                            int cols, int split, int nsplit,
                                            float (&acc)[kWordCols][MR]) {
  constexpr int kCodes = 32 / BITS;  // codes per 32-bit word
  constexpr unsigned kMask = BITS == 8 ? 0xFFFFFFFFu : (BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u);
  constexpr int kStep = 32 * kWordVec;
  const int lane = threadIdx.x & 31;
  const int col_words = static_cast<int>(B.col_bytes >> 2);
  const int steps = (col_words + kStep - 1) / kStep;
  const int w0 = static_cast<int>(static_cast<long long>(steps) * split / nsplit) * kStep;
  const int w1 = min(col_words, static_cast<int>(static_cast<long long>(steps) * (split + 1) / nsplit) * kStep);
  const int shift = B.word_shift;
  const bool vec = (B.lda & 3) == 0 && (reinterpret_cast<uintptr_t>(B.a) & 15u) == 0;

  // Columns past the output read the last column, with scale 0.
  const int last = cols - 1 - col0;
  const uint32_t* cw = reinterpret_cast<const uint32_t*>(B.codes) + static_cast<long long>(col0) * col_words;
  const __half* cs = B.scales + static_cast<long long>(col0) * B.kb;
  const uint8_t* cz = B.zp != nullptr ? B.zp + static_cast<long long>(col0) * B.zp_stride : nullptr;
  const int kb = static_cast<int>(B.kb);
  const int zs = static_cast<int>(B.zp_stride);
  const float zdefault = static_cast<float>(1 << (BITS - 1));

  for (int base = w0; base < w1; base += kStep) {
    // All loads of the step first, so that they are in flight together.
    uint32_t raw[kWordVec][kWordCols];
    float sc[kWordVec][kWordCols];
    float off[kWordVec][kWordCols];
#pragma unroll
    for (int v = 0; v < kWordVec; ++v) {
      const int word = min(base + v * 32 + lane, w1 - 1);
      const int blk = word >> shift;
#pragma unroll
      for (int c = 0; c < kWordCols; ++c) {
        const int cc = min(c, last);
        raw[v][c] = __ldg(cw + cc * col_words + word);
        sc[v][c] = c <= last ? __half2float(cs[cc * kb + blk]) : 0.0f;
        float z = zdefault;
        if (cz != nullptr) {
          const int bit = blk * BITS;
          z = static_cast<float>((__ldg(cz + cc * zs + (bit >> 3)) >> (bit & 7)) & ((1u << BITS) - 1u));
        }
        // 0x4B0000cc is the float 2^23 + cc: subtracting 2^23 + z leaves cc - z exactly.
        off[v][c] = 8388608.0f + z;
      }
    }
#pragma unroll
    for (int v = 0; v < kWordVec; ++v) {
      const int word = base + v * 32 + lane;
      if (word >= w1) break;
      const int k0 = word * kCodes;
      if constexpr (MR == 1) {
        float xv[kCodes];
        LoadRow<kCodes>(B, row0, k0, vec, xv);
#pragma unroll
        for (int c = 0; c < kWordCols; ++c) {
          float p = 0.0f;
#pragma unroll
          for (int j = 0; j < 8 / BITS; ++j) {
            const uint32_t part = (raw[v][c] >> (BITS * j)) & kMask;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float q = __uint_as_float(__byte_perm(part, 0x4B000000u, 0x7440u | i)) - off[v][c];
              p = fmaf(q, xv[i * (8 / BITS) + j], p);
            }
          }
          acc[c][0] = fmaf(sc[v][c], p, acc[c][0]);
        }
      } else {
      float w[kWordCols][kCodes];
#pragma unroll
      for (int c = 0; c < kWordCols; ++c) {
#pragma unroll
        for (int j = 0; j < 8 / BITS; ++j) {
          const uint32_t part = (raw[v][c] >> (BITS * j)) & kMask;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            w[c][i * (8 / BITS) + j] =
                (__uint_as_float(__byte_perm(part, 0x4B000000u, 0x7440u | i)) - off[v][c]) * sc[v][c];
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m >= nrows) break;
        float xv[kCodes];
        LoadRow<kCodes>(B, row0 + m, k0, vec, xv);
#pragma unroll
        for (int i = 0; i < kCodes; ++i)
#pragma unroll
          for (int c = 0; c < kWordCols; ++c) acc[c][m] = fmaf(w[c][i], xv[i], acc[c][m]);
      }
      }
    }
  }
}

// Resident blocks per multiprocessor the register allocation is bounded for.
constexpr int WordMinBlocks(int rows) { return rows == 1 ? 4 : 2; }

// A[rows of blockIdx.z] . deq(B) for the columns of blockIdx.x and the depth
// share blockIdx.y of nsplit, written to dst + blockIdx.y * split_stride
// (+ bias[n] when bias is given).
template <int MR, int BITS>
__global__ void __launch_bounds__(kWordWarps * 32, WordMinBlocks(MR))
WordKernel(DevQuant B, int rows, int cols, int nsplit, const float* __restrict__ bias,
           float* __restrict__ dst, long long split_stride) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row0 = blockIdx.z * MR;
  const int nrows = min(MR, rows - row0);
  const int col0 = blockIdx.x * kWordBlockCols + warp * kWordCols;
  const int split = blockIdx.y;
  if (col0 >= cols) return;  // no barrier below: whole warps may leave
  float acc[kWordCols][MR];
#pragma unroll
  for (int c = 0; c < kWordCols; ++c)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[c][m] = 0.0f;

  WordProduct<MR, BITS>(B, row0, nrows, col0, cols, split, nsplit, acc);

  float* out = dst + static_cast<long long>(split) * split_stride;
#pragma unroll
  for (int c = 0; c < kWordCols; ++c) {
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      float v = acc[c][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[c][m] = v;
    }
  }
  // Lane (c * MR + m) mod 32 writes acc[c][m].
#pragma unroll
  for (int c = 0; c < kWordCols; ++c) {
    const int n = col0 + c;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (lane == ((c * MR + m) & 31) && m < nrows && n < cols) {
        out[static_cast<long long>(row0 + m) * cols + n] =
            acc[c][m] + (bias != nullptr ? bias[n] : 0.0f);
      }
    }
  }
}

// out[i] = sum over s < nsplit of part[s * total + i] (+ bias), in order of s.
__global__ void SplitSumKernel(long long total, int cols, int nsplit, const float* __restrict__ part,
                               const float* __restrict__ bias, float* __restrict__ out) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < nsplit; ++s) v += part[s * total + i];
    out[i] = v + (bias != nullptr ? bias[i % cols] : 0.0f);
  }
}

unsigned GridFor(long long total, int threads) {
  const long long blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(std::max<long long>(1, std::min<long long>(blocks, 65535LL * 16)));
}

std::string CheckLaunch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return std::string("QsdMatMul CUDA: ") + what + " failed: " + cudaGetErrorString(err);
  }
  return std::string();
}

// Stream-ordered device buffers of one call, released in Release().
class Workspace {
 public:
  explicit Workspace(cudaStream_t stream) : stream_(stream) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  std::string Alloc(size_t bytes, float** out) {
    *out = nullptr;
    if (count_ == kMax) return "QsdMatMul CUDA: too many workspace buffers";
    void* ptr = nullptr;
    cudaError_t e = cudaErrorNotSupported;
    cudaMemPool_t pool = pooled_ ? Pool() : nullptr;
    if (pool != nullptr) e = cudaMallocFromPoolAsync(&ptr, bytes, pool, stream_);
    if (e == cudaErrorNotSupported) {
      // Devices without stream-ordered allocation: plain allocation, released
      // after the stream has drained.
      cudaGetLastError();
      pooled_ = false;
      e = cudaMalloc(&ptr, bytes);
    }
    if (e != cudaSuccess) {
      return std::string("QsdMatMul CUDA: workspace allocation failed: ") + cudaGetErrorString(e);
    }
    ptrs_[count_] = ptr;
    pooled_at_[count_++] = pooled_;
    *out = static_cast<float*>(ptr);
    return std::string();
  }

  std::string Release() {
    cudaError_t first = cudaSuccess;
    bool synced = false;
    for (int i = 0; i < count_; ++i) {
      cudaError_t e;
      if (pooled_at_[i]) {
        e = cudaFreeAsync(ptrs_[i], stream_);
      } else {
        e = synced ? cudaSuccess : cudaStreamSynchronize(stream_);
        synced = true;
        const cudaError_t f = cudaFree(ptrs_[i]);
        if (e == cudaSuccess) e = f;
      }
      if (first == cudaSuccess) first = e;
    }
    count_ = 0;
    if (first != cudaSuccess) {
      return std::string("QsdMatMul CUDA: workspace release failed: ") + cudaGetErrorString(first);
    }
    return std::string();
  }

 private:
  // The library's own stream-ordered pool on the current device. It keeps
  // freed memory (release threshold: unlimited), so the small buffers of each
  // call are not mapped anew after every synchronization. nullptr when the
  // device has no memory pools.
  static cudaMemPool_t Pool() {
    constexpr int kDevices = 64;
    static cudaMemPool_t pools[kDevices] = {};
    static bool tried[kDevices] = {};
    static std::mutex mu;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
      cudaGetLastError();
      return nullptr;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!tried[dev]) {
      tried[dev] = true;
      int supported = 0;
      cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, dev);
      cudaMemPoolProps props = {};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = dev;
      cudaMemPool_t pool = nullptr;
      if (supported && cudaMemPoolCreate(&pool, &props) == cudaSuccess) {
        uint64_t keep = ~0ull;
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        pools[dev] = pool;
      }
      cudaGetLastError();
    }
    return pools[dev];
  }

  static constexpr int kMax = 4;
  cudaStream_t stream_;
  void* ptrs_[kMax] = {};
  bool pooled_at_[kMax] = {};
  bool pooled_ = true;
  int count_ = 0;
};

int MultiprocessorCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    cudaGetLastError();
    return 108;
  }
  return sms;
}

bool WordLayout(const DevQuant& q) {
  if (q.bits != 2 && q.bits != 4 && q.bits != 8) return false;
  if (q.word_shift < 0) return false;
  if (q.col_bytes / 4 > (1LL << 30) || q.depth > (1LL << 30)) return false;
  return (reinterpret_cast<uintptr_t>(q.codes) & 3u) == 0;
}

template <int MR, int BITS>
long long WordResidentBlocks() {
  static const long long resident = [] {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, WordKernel<MR, BITS>,
                                                      kWordWarps * 32, 0) != cudaSuccess ||
        per_sm <= 0) {
      cudaGetLastError();
      per_sm = 1;
    }
    return static_cast<long long>(per_sm) * MultiprocessorCount();
  }();
  return resident;
}

template <int MR>
long long WordResident(int bits) {
  return bits == 4 ? WordResidentBlocks<MR, 4>()
                   : (bits == 2 ? WordResidentBlocks<MR, 2>() : WordResidentBlocks<MR, 8>());
}

template <int MR>
void LaunchWordKernel(const DevQuant& B, dim3 grid, int rows, int cols, int nsplit,
                      const float* bias, float* dst, long long stride, cudaStream_t stream) {
  if (B.bits == 4) {
    WordKernel<MR, 4><<<grid, kWordWarps * 32, 0, stream>>>(B, rows, cols, nsplit, bias, dst, stride);
  } else if (B.bits == 2) {
    WordKernel<MR, 2><<<grid, kWordWarps * 32, 0, stream>>>(B, rows, cols, nsplit, bias, dst, stride);
  } else {
    WordKernel<MR, 8><<<grid, kWordWarps * 32, 0, stream>>>(B, rows, cols, nsplit, bias, dst, stride);
  }
}

// One launch per operand. With one operand and no split it writes out
// directly; otherwise every (operand, split) writes its own slice of a
// workspace, and the slices are added in a fixed order (with the bias).
template <int MR>
std::string LaunchWord(const DevOperands& ops, long long rows, long long cols, const float* bias,
                       float* out, Workspace* ws, cudaStream_t stream) {
  const long long col_groups = (cols + kWordBlockCols - 1) / kWordBlockCols;
  const long long row_groups = (rows + MR - 1) / MR;
  long long nsplit[2] = {1, 1};
  long long slices = 0;
  for (int o = 0; o < ops.count; ++o) {
    const long long words = ops.op[o].col_bytes / 4;
    const long long steps = std::max(1LL, (words + 32 * kWordVec - 1) / (32 * kWordVec));
    // Split the depth until the grid fills the GPU four times over (fewer
    // idle multiprocessors in the last wave).
    const long long want = 4 * WordResident<MR>(ops.op[o].bits);
    nsplit[o] = std::max(1LL, std::min(want / std::max(1LL, col_groups * row_groups), steps));
    nsplit[o] = std::min<long long>(nsplit[o], kWordMaxSplit);
    slices += nsplit[o];
  }
  const long long total = rows * cols;
  float* part = out;
  if (slices > 1) {
    std::string err = ws->Alloc(static_cast<size_t>(slices * total) * sizeof(float), &part);
    if (!err.empty()) return err;
  }
  long long slice = 0;
  for (int o = 0; o < ops.count; ++o) {
    dim3 grid(static_cast<unsigned>(col_groups), static_cast<unsigned>(nsplit[o]),
              static_cast<unsigned>(row_groups));
    LaunchWordKernel<MR>(ops.op[o], grid, static_cast<int>(rows), static_cast<int>(cols),
                         static_cast<int>(nsplit[o]), slices > 1 ? nullptr : bias,
                         part + slice * total, total, stream);
    std::string err = CheckLaunch("word kernel");
    if (!err.empty()) return err;
    slice += nsplit[o];
  }
  if (slices > 1) {
    SplitSumKernel<<<GridFor(total, 256), 256, 0, stream>>>(
        total, static_cast<int>(cols), static_cast<int>(slices), part, bias, out);
    return CheckLaunch("split-sum kernel");
  }
  return std::string();
}

// out (rows x cols) = sum over ops of A . deq(B) (+ bias)
std::string Product(const DevOperands& ops, long long rows, long long cols, const float* bias,
                    float* out, Workspace* ws, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return std::string();
  if (ops.count == 0) {
    FillKernel<<<GridFor(rows * cols, 256), 256, 0, stream>>>(rows, cols, bias, out);
    return CheckLaunch("fill kernel");
  }
  // QSDONNX_CUDA_GENERIC=1 forces the generic kernels (for tests and comparisons).
  static const bool generic_only = [] {
    const char* v = std::getenv("QSDONNX_CUDA_GENERIC");
    return v != nullptr && v[0] == '1';
  }();
  bool word = !generic_only && cols < (1LL << 30) && (rows + kWordMaxRows - 1) / kWordMaxRows <= 65535 &&
              (cols + kWordBlockCols - 1) / kWordBlockCols <= (1LL << 31) - 1;
  for (int o = 0; o < ops.count; ++o) word = word && WordLayout(ops.op[o]);
  if (word) {
    if (rows <= 1) return LaunchWord<1>(ops, rows, cols, bias, out, ws, stream);
    if (rows <= 2) return LaunchWord<2>(ops, rows, cols, bias, out, ws, stream);
    if (rows <= 4) return LaunchWord<4>(ops, rows, cols, bias, out, ws, stream);
    static_assert(kWordMaxRows == 8, "dispatch below assumes groups of 8 rows");
    return LaunchWord<kWordMaxRows>(ops, rows, cols, bias, out, ws, stream);
  }
  if (rows <= kSkinnyMaxRows) {
    const long long blocks = (cols + kSkinnyWarps - 1) / kSkinnyWarps;
    SkinnyKernel<<<static_cast<unsigned>(blocks), kSkinnyWarps * 32, 0, stream>>>(
        ops, rows, cols, bias, out, cols);
    return CheckLaunch("skinny kernel");
  }
  const long long mt = (rows + kTileM - 1) / kTileM;
  const long long nt = (cols + kTileN - 1) / kTileN;
  if (nt > 65535) return "QsdMatMul CUDA: output has too many columns";
  dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt));
  TiledKernel<<<grid, kTileThreads, 0, stream>>>(ops, rows, cols, bias, out, cols);
  return CheckLaunch("tiled kernel");
}

}  // namespace

std::string LaunchCuda(const Problem& p, void* stream_ptr) {
  if (p.M <= 0) return std::string();
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  Workspace ws(stream);
  std::string err;
  float* t = nullptr;
  if (p.rank > 0) {
    err = ws.Alloc(static_cast<size_t>(p.M) * static_cast<size_t>(p.rank) * sizeof(float), &t);
    if (err.empty()) {
      DevOperands lops;
      lops.op[0] = MakeDev(p.l, p.x, p.K);
      lops.count = 1;
      err = Product(lops, p.M, p.rank, nullptr, t, &ws, stream);
    }
  }
  if (err.empty()) {
    DevOperands ops;
    ops.count = 0;
    if (p.q.present()) ops.op[ops.count++] = MakeDev(p.q, p.x, p.K);
    if (p.rank > 0) ops.op[ops.count++] = MakeDev(p.r, t, p.rank);
    err = Product(ops, p.M, p.N, p.bias, p.y, &ws, stream);
  }
  if (err.empty() && p.s.present && p.s.nnz > 0) {
    SparseKernel<<<GridFor(p.M * p.K, 256), 256, 0, stream>>>(
        p.M, p.K, p.N, p.s.nnz, p.x, p.s.rowptr, p.s.colidx,
        reinterpret_cast<const __half*>(p.s.vals), p.y);
    err = CheckLaunch("sparse kernel");
  }
  const std::string rel = ws.Release();
  return err.empty() ? rel : err;
}

}  // namespace qsd
