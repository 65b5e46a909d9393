// MoE token permutation CUDA kernels on raw device pointers (see megalm/kernels/moe_permute.py for
// the math). No torch types here, so nvcc alone compiles and checks them; moe_bindings.cpp adapts
// at::Tensor.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace megalm {
namespace moe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[rows[t, j]] = x[t] (times weights[t, j] when weights is not null); a row of -1 is skipped.
// With y not null, also dweights[t, j] = <x[t], y[rows[t, j]]> (0 for a skipped row).
// x: [tokens, hidden]; out, y: [num_rows, hidden], all of `dtype`; rows int64 and weights, dweights
// fp32: [tokens, topk]. One block per token.
cudaError_t permute_scatter(DType dtype, const void* x, const int64_t* rows, const float* weights, void* out,
                            const void* y, float* dweights, int64_t tokens, int topk, int64_t hidden,
                            cudaStream_t stream);

// out[t] = sum_j (weights[t, j] *) y[rows[t, j]], summed in fp32; a row of -1 adds nothing.
cudaError_t permute_gather(DType dtype, const void* y, const int64_t* rows, const float* weights, void* out,
                           int64_t tokens, int topk, int64_t hidden, cudaStream_t stream);

}  // namespace moe
}  // namespace megalm
