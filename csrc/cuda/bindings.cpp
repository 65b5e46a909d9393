// Torch bindings of the CUDA kernels in this directory (megalm._cuda_kernels).
//
// setup.py entry (built only where CUDA is available):
//   CUDAExtension(
//       name="megalm._cuda_kernels",
//       sources=["csrc/cuda/bindings.cpp", "csrc/cuda/rmsnorm_kernels.cu"],
//       extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
//   )
//
// The kernels themselves (rmsnorm_kernels.cu) include no torch header; this file turns tensors
// into pointers, checks what the kernels assume and raises a readable error otherwise.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "rmsnorm_kernels.h"

namespace {

megalm::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return megalm::DType::kFloat32;
    case at::kHalf: return megalm::DType::kFloat16;
    case at::kBFloat16: return megalm::DType::kBFloat16;
    default: TORCH_CHECK(false, "megalm CUDA RMSNorm: unsupported dtype ", t.scalar_type());
  }
  return megalm::DType::kFloat32;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "megalm CUDA RMSNorm: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "megalm CUDA RMSNorm: x must be a contiguous [rows, cols] tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "megalm CUDA RMSNorm: weight must be a contiguous [cols] tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "megalm CUDA RMSNorm: weight must have x's dtype or float32");
}

void check(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "megalm CUDA RMSNorm ", what, ": ", cudaGetErrorString(error));
}

}  // namespace

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_inputs(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check(megalm::rms_norm_forward(dtype_of(x), dtype_of(weight), x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                 rstd.data_ptr<float>(), x.size(0), static_cast<int>(x.size(1)),
                                 static_cast<float>(eps), c10::cuda::getCurrentCUDAStream().stream()),
        "forward");
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& rstd) {
  check_inputs(x, weight);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "megalm CUDA RMSNorm: dy must be contiguous with x's shape and dtype");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == x.size(0), "megalm CUDA RMSNorm: bad rstd");
  const int cols = static_cast<int>(x.size(1));
  TORCH_CHECK(cols <= megalm::rms_norm_max_cols(dtype_of(x), cols), "megalm CUDA RMSNorm backward: row width ",
              cols, " exceeds ", megalm::rms_norm_max_cols(dtype_of(x), cols));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()), "SM count");
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 4 * sms)));
  auto dx = at::empty_like(x);
  auto partial = at::empty({blocks, cols}, x.options().dtype(at::kFloat));
  check(megalm::rms_norm_backward(dtype_of(x), dtype_of(weight), dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                  rstd.data_ptr<float>(), dx.data_ptr(), partial.data_ptr<float>(), rows, cols,
                                  blocks, c10::cuda::getCurrentCUDAStream().stream()),
        "backward");
  return {dx, partial.sum(0)};
}

int64_t rms_norm_max_cols(const at::Tensor& x) {
  return megalm::rms_norm_max_cols(dtype_of(x), static_cast<int>(x.size(-1)));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalm CUDA kernels";
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm forward: (x [n, h], weight [h], eps) -> (y, rstd)");
  m.def("rms_norm_backward", &rms_norm_backward,
        "RMSNorm backward: (dy, x, weight, rstd) -> (dx, dweight fp32)");
  m.def("rms_norm_max_cols", &rms_norm_max_cols, "widest row the kernels accept for x's dtype and width");
}
