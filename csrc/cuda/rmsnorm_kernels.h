// RMSNorm CUDA kernels: launch functions on raw device pointers. No torch types here, so the
// kernels compile (and are compile-checked) with nvcc alone; bindings.cpp adapts at::Tensor.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace megalm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The forward kernel uses up to kMaxThreads per row. The backward kernel holds a thread's share of
// the weight gradient in registers: at most kBackwardThreads x kMaxIters x vector width columns.
constexpr int kMaxIters = 8;
constexpr int kMaxThreads = 1024;
constexpr int kBackwardThreads = 256;

// y = (x * rsqrt(mean(x^2) + eps)).to(T) * weight.to(T); rstd[row] = rsqrt(mean(x^2) + eps) in fp32.
// x, y: [rows, cols] contiguous of type `dtype`; weight: [cols] of `dtype` or float32.
cudaError_t rms_norm_forward(DType dtype, DType weight_dtype, const void* x, const void* weight, void* y,
                             float* rstd, int64_t rows, int cols, float eps, cudaStream_t stream);

// dx = rstd * (dy*w - n * mean(dy*w*n)), n = x * rstd; per-block weight-gradient partial sums
// go to dweight_partial [blocks, cols] (fp32), each block owning one row of it (no atomics).
cudaError_t rms_norm_backward(DType dtype, DType weight_dtype, const void* dy, const void* x, const void* weight,
                              const float* rstd, void* dx, float* dweight_partial, int64_t rows, int cols,
                              int blocks, cudaStream_t stream);

// The widest row the kernels accept for this dtype and row width (0 if none).
int rms_norm_max_cols(DType dtype, int cols);

}  // namespace megalm
