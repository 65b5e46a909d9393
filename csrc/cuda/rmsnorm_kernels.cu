// RMSNorm forward and backward, one thread block per row (forward) or per run of rows (backward).
//
// Rows are read with 16-byte vector loads when the row width and the pointers allow it (8 x
// fp16/bf16 or 4 x fp32 per load), element by element otherwise. Statistics are fp32. The
// normalised value is rounded to the activation type before the weight multiplies it (the
// Hugging Face Llama convention, matching megalm.kernels.rmsnorm's reference).
//
// Backward: a grid of about 4 blocks per SM; each block (at most 256 threads) walks a contiguous
// run of rows, making two passes per row (the row dot product, then dx; the second pass mostly
// hits L1/L2), and accumulates its weight-gradient share in registers (each thread owns fixed
// columns), stored once to its own row of dweight_partial. Rows up to 256 x 8 x VEC wide
// (16384 for fp16/bf16, 8192 for fp32) are supported by the backward kernel.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rmsnorm_kernels.h"

namespace megalm {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round through T and back: the value the reference sees after `.to(x.dtype)`.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // `shared` may still be read from the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, typename W, int VEC>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                                        float* __restrict__ rstd, int cols, float eps) {
  __shared__ float shared[32];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * cols;
  const T* xr = x + offset;
  T* yr = y + offset;
  float squares = 0.0f;
  for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
    const Pack<T, VEC> xs = load<T, VEC>(xr + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = to_float(xs.v[k]);
      squares += v * v;
    }
  }
  const float r = rsqrtf(block_sum(squares, shared) / cols + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int c = threadIdx.x * VEC; c < cols; c += blockDim.x * VEC) {
    const Pack<T, VEC> xs = load<T, VEC>(xr + c);
    const Pack<W, VEC> ws = load<W, VEC>(weight + c);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out.v[k] = from_float<T>(round_to<T>(to_float(xs.v[k]) * r) * round_to<T>(to_float(ws.v[k])));
    }
    store<T, VEC>(yr + c, out);
  }
}

template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kBackwardThreads) rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         const W* __restrict__ weight, const float* __restrict__ rstd,
                                         T* __restrict__ dx, float* __restrict__ dweight_partial, int64_t rows,
                                         int cols, int64_t rows_per_block) {
  __shared__ float shared[32];
  float acc[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[i][k] = 0.0f;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  for (int64_t row = first; row < last; ++row) {
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    T* dxr = dx + row * cols;
    const float r = rstd[row];
    float dot = 0.0f;  // sum over the row of (dy * w) * n
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = (i * blockDim.x + threadIdx.x) * VEC;
      if (c < cols) {
        const Pack<T, VEC> xs = load<T, VEC>(xr + c);
        const Pack<T, VEC> gs = load<T, VEC>(dyr + c);
        const Pack<W, VEC> ws = load<W, VEC>(weight + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dot += to_float(gs.v[k]) * round_to<T>(to_float(ws.v[k])) * to_float(xs.v[k]) * r;
        }
      }
    }
    dot = block_sum(dot, shared) / cols;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = (i * blockDim.x + threadIdx.x) * VEC;
      if (c < cols) {
        const Pack<T, VEC> xs = load<T, VEC>(xr + c);
        const Pack<T, VEC> gs = load<T, VEC>(dyr + c);
        const Pack<W, VEC> ws = load<W, VEC>(weight + c);
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float n = to_float(xs.v[k]) * r;
          const float g = to_float(gs.v[k]);
          out.v[k] = from_float<T>(r * (g * round_to<T>(to_float(ws.v[k])) - n * dot));
          acc[i][k] += g * round_to<T>(n);
        }
        store<T, VEC>(dxr + c, out);
      }
    }
  }
  float* partial = dweight_partial + static_cast<int64_t>(blockIdx.x) * cols;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VEC;
    if (c < cols) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) partial[c + k] = acc[i][k];
    }
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Elements per 16-byte load, or 1 when the row width or a pointer does not allow vector loads.
// (An fp32 weight next to 16-bit activations is read VEC elements = 32 bytes at a time.)
int vector_width(DType dtype, DType weight_dtype, int cols, const void* a, const void* b, const void* c,
                 const void* w) {
  const int vec = 16 / element_size(dtype);
  const bool ok = cols % vec == 0 && aligned(a, 16) && aligned(b, 16) && aligned(c, 16) &&
                  aligned(w, vec * element_size(weight_dtype));
  return ok ? vec : 1;
}

int threads_for(int vectors_per_row) {
  // about four vectors per thread, a whole number of warps, at most 1024 threads
  int threads = ((vectors_per_row + 3) / 4 + 31) / 32 * 32;
  return threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
}

template <typename T, typename W, int VEC>
cudaError_t forward_typed(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int cols, float eps,
                          cudaStream_t stream) {
  const int threads = threads_for(cols / VEC);
  rms_norm_forward_kernel<T, W, VEC><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<T*>(y), rstd, cols, eps);
  return cudaGetLastError();
}

template <typename T, typename W, int VEC, int ITERS>
cudaError_t backward_launch(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                            float* partial, int64_t rows, int cols, int blocks, int threads, cudaStream_t stream) {
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  rms_norm_backward_kernel<T, W, VEC, ITERS><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const W*>(weight), rstd, static_cast<T*>(dx),
      partial, rows, cols, rows_per_block);
  return cudaGetLastError();
}

// Each thread keeps ITERS x VEC weight-gradient sums in registers; ITERS is the smallest power of
// two that covers the row with at most kBackwardThreads threads.
template <typename T, typename W, int VEC>
cudaError_t backward_typed(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                           float* partial, int64_t rows, int cols, int blocks, cudaStream_t stream) {
  const int vectors = cols / VEC;
  int threads = (vectors + 31) / 32 * 32;
  threads = threads > kBackwardThreads ? kBackwardThreads : threads;
  const int iters = (vectors + threads - 1) / threads;
  if (iters <= 1) return backward_launch<T, W, VEC, 1>(dy, x, weight, rstd, dx, partial, rows, cols, blocks, threads, stream);
  if (iters <= 2) return backward_launch<T, W, VEC, 2>(dy, x, weight, rstd, dx, partial, rows, cols, blocks, threads, stream);
  if (iters <= 4) return backward_launch<T, W, VEC, 4>(dy, x, weight, rstd, dx, partial, rows, cols, blocks, threads, stream);
  if (iters <= kMaxIters) {
    return backward_launch<T, W, VEC, kMaxIters>(dy, x, weight, rstd, dx, partial, rows, cols, blocks, threads, stream);
  }
  return cudaErrorInvalidValue;
}

// Calls F<T, W, VEC>::run(args...) for the runtime dtypes and vector width.
template <template <typename, typename, int> class F, typename... Args>
cudaError_t dispatch(DType dtype, DType weight_dtype, int vec, Args... args) {
  const bool fp32_weight = weight_dtype == DType::kFloat32;
  if (weight_dtype != dtype && !fp32_weight) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return vec == 4 ? F<float, float, 4>::run(args...) : F<float, float, 1>::run(args...);
    case DType::kFloat16:
      if (fp32_weight) return vec == 8 ? F<__half, float, 8>::run(args...) : F<__half, float, 1>::run(args...);
      return vec == 8 ? F<__half, __half, 8>::run(args...) : F<__half, __half, 1>::run(args...);
    case DType::kBFloat16:
      if (fp32_weight) {
        return vec == 8 ? F<__nv_bfloat16, float, 8>::run(args...) : F<__nv_bfloat16, float, 1>::run(args...);
      }
      return vec == 8 ? F<__nv_bfloat16, __nv_bfloat16, 8>::run(args...)
                      : F<__nv_bfloat16, __nv_bfloat16, 1>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename W, int VEC>
struct Forward {
  static cudaError_t run(const void* x, const void* w, void* y, float* rstd, int64_t rows, int cols, float eps,
                         cudaStream_t stream) {
    return forward_typed<T, W, VEC>(x, w, y, rstd, rows, cols, eps, stream);
  }
};

template <typename T, typename W, int VEC>
struct Backward {
  static cudaError_t run(const void* dy, const void* x, const void* w, const float* rstd, void* dx, float* partial,
                         int64_t rows, int cols, int blocks, cudaStream_t stream) {
    return backward_typed<T, W, VEC>(dy, x, w, rstd, dx, partial, rows, cols, blocks, stream);
  }
};

}  // namespace

cudaError_t rms_norm_forward(DType dtype, DType weight_dtype, const void* x, const void* weight, void* y, float* rstd,
                             int64_t rows, int cols, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int vec = vector_width(dtype, weight_dtype, cols, x, y, x, weight);
  return dispatch<Forward>(dtype, weight_dtype, vec, x, weight, y, rstd, rows, cols, eps, stream);
}

cudaError_t rms_norm_backward(DType dtype, DType weight_dtype, const void* dy, const void* x, const void* weight,
                              const float* rstd, void* dx, float* dweight_partial, int64_t rows, int cols, int blocks,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int vec = vector_width(dtype, weight_dtype, cols, dy, x, dx, weight);
  return dispatch<Backward>(dtype, weight_dtype, vec, dy, x, weight, rstd, dx, dweight_partial, rows, cols, blocks,
                            stream);
}

int rms_norm_max_cols(DType dtype, int cols) {
  const int vec = 16 / element_size(dtype);
  return kBackwardThreads * kMaxIters * (cols % vec == 0 ? vec : 1);
}

}  // namespace megalm
