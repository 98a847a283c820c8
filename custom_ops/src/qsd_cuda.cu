// CUDA kernels of QsdMatMul.
//
// Y = X . deq(Q) + (X . deq(L)) . deq(R) + X . S + bias is computed as
//   1. T = X . deq(L)                      (when rank > 0; T in a workspace)
//   2. Y = X . deq(Q) + T . deq(R) + bias  (one kernel, both products summed)
//   3. Y += X . S                          (CSR rows, atomic accumulation)
// Products with few rows (M <= kSkinnyMaxRows) use one warp per output
// column: the lanes walk the column's packed codes (contiguous in memory),
// dequantize in registers and keep one partial sum per row of X. Larger M
// uses a shared-memory tiled GEMM whose B tiles are dequantized on the fly.
#include "qsd_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace qsd {
namespace {

constexpr int kSkinnyMaxRows = 16;
constexpr int kSkinnyWarps = 4;

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;

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

// out (rows x cols) = sum over ops of A . deq(B) (+ bias)
std::string Product(const DevOperands& ops, long long rows, long long cols, const float* bias,
                    float* out, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return std::string();
  if (ops.count == 0) {
    FillKernel<<<GridFor(rows * cols, 256), 256, 0, stream>>>(rows, cols, bias, out);
    return CheckLaunch("fill kernel");
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
  std::string err;
  float* t = nullptr;
  bool pooled = true;
  if (p.rank > 0) {
    const size_t bytes = static_cast<size_t>(p.M) * static_cast<size_t>(p.rank) * sizeof(float);
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&t), bytes, stream);
    if (e == cudaErrorNotSupported) {
      // Devices without stream-ordered allocation: plain allocation, released
      // after the stream has drained.
      cudaGetLastError();
      pooled = false;
      e = cudaMalloc(reinterpret_cast<void**>(&t), bytes);
    }
    if (e != cudaSuccess) {
      return std::string("QsdMatMul CUDA: workspace allocation failed: ") + cudaGetErrorString(e);
    }
    DevOperands lops;
    lops.op[0] = MakeDev(p.l, p.x, p.K);
    lops.count = 1;
    err = Product(lops, p.M, p.rank, nullptr, t, stream);
  }
  if (err.empty()) {
    DevOperands ops;
    ops.count = 0;
    if (p.q.present()) ops.op[ops.count++] = MakeDev(p.q, p.x, p.K);
    if (p.rank > 0) ops.op[ops.count++] = MakeDev(p.r, t, p.rank);
    err = Product(ops, p.M, p.N, p.bias, p.y, stream);
  }
  if (err.empty() && p.s.present && p.s.nnz > 0) {
    SparseKernel<<<GridFor(p.M * p.K, 256), 256, 0, stream>>>(
        p.M, p.K, p.N, p.s.nnz, p.x, p.s.rowptr, p.s.colidx,
        reinterpret_cast<const __half*>(p.s.vals), p.y);
    err = CheckLaunch("sparse kernel");
  }
  if (t != nullptr) {
    cudaError_t e;
    if (pooled) {
      e = cudaFreeAsync(t, stream);
    } else {
      e = cudaStreamSynchronize(stream);
      const cudaError_t f = cudaFree(t);
      if (e == cudaSuccess) e = f;
    }
    if (err.empty() && e != cudaSuccess) {
      err = std::string("QsdMatMul CUDA: workspace release failed: ") + cudaGetErrorString(e);
    }
  }
  return err;
}

}  // namespace qsd
