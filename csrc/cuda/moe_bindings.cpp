// Torch bindings of the MoE permutation kernels (moe_permute_kernels.cu), registered as the torch
// operators torch.ops.megalm_moe.permute_scatter / permute_gather. They live in the same extension
// as bindings.cpp (megalm._cuda_kernels) but need no entry in its PYBIND11_MODULE: loading the
// library registers them. setup.py adds two sources to the CUDAExtension:
//   sources=[..., "csrc/cuda/moe_bindings.cpp", "csrc/cuda/moe_permute_kernels.cu"]

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "moe_permute_kernels.h"

namespace {

megalm::moe::DType moe_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return megalm::moe::DType::kFloat32;
    case at::kHalf: return megalm::moe::DType::kFloat16;
    case at::kBFloat16: return megalm::moe::DType::kBFloat16;
    default: TORCH_CHECK(false, "megalm CUDA MoE permute: unsupported dtype ", t.scalar_type());
  }
  return megalm::moe::DType::kFloat32;
}

void check_rows(const at::Tensor& data, const at::Tensor& rows, const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(data.is_cuda() && rows.is_cuda(), "megalm CUDA MoE permute: tensors must be on a CUDA device");
  TORCH_CHECK(data.dim() == 2 && data.is_contiguous(), "megalm CUDA MoE permute: expected a contiguous 2-D tensor");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.scalar_type() == at::kLong,
              "megalm CUDA MoE permute: rows must be a contiguous int64 [tokens, topk] tensor");
  if (weights.has_value()) {
    TORCH_CHECK(weights->sizes() == rows.sizes() && weights->is_contiguous() &&
                    weights->scalar_type() == at::kFloat,
                "megalm CUDA MoE permute: weights must be a contiguous float32 tensor shaped like rows");
  }
}

void check(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "megalm CUDA MoE ", what, ": ", cudaGetErrorString(error));
}

std::vector<at::Tensor> permute_scatter(const at::Tensor& x, const at::Tensor& rows,
                                        const std::optional<at::Tensor>& weights, int64_t num_rows, bool zero_fill,
                                        const std::optional<at::Tensor>& y) {
  check_rows(x, rows, weights);
  TORCH_CHECK(rows.size(0) == x.size(0), "megalm CUDA MoE permute: rows must have one line per token");
  if (y.has_value()) {
    TORCH_CHECK(y->is_contiguous() && y->scalar_type() == x.scalar_type() && y->size(0) == num_rows &&
                    y->size(1) == x.size(1),
                "megalm CUDA MoE permute: y must be a contiguous [num_rows, hidden] tensor of x's dtype");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = zero_fill ? at::zeros({num_rows, x.size(1)}, x.options()) : at::empty({num_rows, x.size(1)}, x.options());
  auto dweights = y.has_value() ? at::empty(rows.sizes(), x.options().dtype(at::kFloat))
                                : at::empty({0}, x.options().dtype(at::kFloat));
  check(megalm::moe::permute_scatter(moe_dtype(x), x.data_ptr(), rows.data_ptr<int64_t>(),
                                     weights.has_value() ? weights->data_ptr<float>() : nullptr, out.data_ptr(),
                                     y.has_value() ? y->data_ptr() : nullptr,
                                     y.has_value() ? dweights.data_ptr<float>() : nullptr, x.size(0),
                                     static_cast<int>(rows.size(1)), x.size(1),
                                     c10::cuda::getCurrentCUDAStream().stream()),
        "scatter");
  return {out, dweights};
}

at::Tensor permute_gather(const at::Tensor& y, const at::Tensor& rows, const std::optional<at::Tensor>& weights) {
  check_rows(y, rows, weights);
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({rows.size(0), y.size(1)}, y.options());
  check(megalm::moe::permute_gather(moe_dtype(y), y.data_ptr(), rows.data_ptr<int64_t>(),
                                    weights.has_value() ? weights->data_ptr<float>() : nullptr, out.data_ptr(),
                                    rows.size(0), static_cast<int>(rows.size(1)), y.size(1),
                                    c10::cuda::getCurrentCUDAStream().stream()),
        "gather");
  return out;
}

}  // namespace

TORCH_LIBRARY(megalm_moe, m) {
  m.def("permute_scatter(Tensor x, Tensor rows, Tensor? weights, int num_rows, bool zero_fill, Tensor? y) -> Tensor[]");
  m.def("permute_gather(Tensor y, Tensor rows, Tensor? weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(megalm_moe, CUDA, m) {
  m.impl("permute_scatter", &permute_scatter);
  m.impl("permute_gather", &permute_gather);
}
