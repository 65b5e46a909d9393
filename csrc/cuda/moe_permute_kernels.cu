// MoE token scatter / gather kernels (declared in moe_permute_kernels.h).
//
// One block per token. The scatter writes the token's row to each of its destination rows (scaled
// by the routing weight in the backward of the combine, which also needs the dot product of the
// incoming gradient with the expert output: a block reduction per assignment). The gather sums a
// token's rows in fp32. Threads stride over the hidden dimension, so consecutive threads touch
// consecutive elements (coalesced).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_permute_kernels.h"

namespace megalm {
namespace moe {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum of `value` over the block; the result is valid in thread 0.
__device__ float block_sum(float value) {
  __shared__ float partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  }
  __syncthreads();  // partial is reused by the next call
  return value;
}

template <typename T>
__global__ void scatter_kernel(const T* __restrict__ x, const int64_t* __restrict__ rows,
                               const float* __restrict__ weights, T* __restrict__ out, const T* __restrict__ y,
                               float* __restrict__ dweights, int topk, int64_t hidden) {
  const int64_t token = blockIdx.x;
  const T* source = x + token * hidden;
  for (int j = 0; j < topk; ++j) {
    const int64_t row = rows[token * topk + j];
    const float w = weights != nullptr ? weights[token * topk + j] : 1.0f;
    float dot = 0.0f;
    if (row >= 0) {
      T* dest = out + row * hidden;
      const T* expert_out = y != nullptr ? y + row * hidden : nullptr;
      for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
        const float v = to_float(source[c]);
        dest[c] = from_float<T>(v * w);
        if (expert_out != nullptr) dot += v * to_float(expert_out[c]);
      }
    }
    if (dweights != nullptr) {  // every thread takes part in the reduction (row is block-uniform)
      dot = block_sum(dot);
      if (threadIdx.x == 0) dweights[token * topk + j] = dot;
    }
  }
}

template <typename T>
__global__ void gather_kernel(const T* __restrict__ y, const int64_t* __restrict__ rows,
                              const float* __restrict__ weights, T* __restrict__ out, int topk, int64_t hidden) {
  const int64_t token = blockIdx.x;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < topk; ++j) {
      const int64_t row = rows[token * topk + j];
      if (row < 0) continue;
      const float w = weights != nullptr ? weights[token * topk + j] : 1.0f;
      acc += w * to_float(y[row * hidden + c]);
    }
    out[token * hidden + c] = from_float<T>(acc);
  }
}

template <typename T>
cudaError_t launch_scatter(const void* x, const int64_t* rows, const float* weights, void* out, const void* y,
                           float* dweights, int64_t tokens, int topk, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  scatter_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(x), rows, weights, static_cast<T*>(out), static_cast<const T*>(y), dweights, topk,
      hidden);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gather(const void* y, const int64_t* rows, const float* weights, void* out, int64_t tokens,
                          int topk, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  gather_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(y), rows, weights, static_cast<T*>(out), topk, hidden);
  return cudaGetLastError();
}

}  // namespace

cudaError_t permute_scatter(DType dtype, const void* x, const int64_t* rows, const float* weights, void* out,
                            const void* y, float* dweights, int64_t tokens, int topk, int64_t hidden,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_scatter<float>(x, rows, weights, out, y, dweights, tokens, topk, hidden, stream);
    case DType::kFloat16: return launch_scatter<__half>(x, rows, weights, out, y, dweights, tokens, topk, hidden, stream);
    case DType::kBFloat16:
      return launch_scatter<__nv_bfloat16>(x, rows, weights, out, y, dweights, tokens, topk, hidden, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t permute_gather(DType dtype, const void* y, const int64_t* rows, const float* weights, void* out,
                           int64_t tokens, int topk, int64_t hidden, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_gather<float>(y, rows, weights, out, tokens, topk, hidden, stream);
    case DType::kFloat16: return launch_gather<__half>(y, rows, weights, out, tokens, topk, hidden, stream);
    case DType::kBFloat16: return launch_gather<__nv_bfloat16>(y, rows, weights, out, tokens, topk, hidden, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe
}  // namespace megalm
