"""Install megalm: `pip install -e . --no-build-isolation` (see README).

Builds the C++ helpers of csrc/ (pybind11: BPE training, dataset indices) where a C++ compiler is
present, and the CUDA kernels where PyTorch has CUDA and nvcc is found. Each extension is optional:
a failed build prints a warning and the package falls back to compiling on first use (C++) or to
its Triton / PyTorch paths, so `import megalm` works everywhere.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def read_requirements(name):
    with open(os.path.join(HERE, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith(("#", "-r"))]


def cpp_extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("megalm setup: pybind11 not installed; C++ helpers will be compiled on first use",
              file=sys.stderr)
        return []
    return [
        Pybind11Extension("megalm._bpe_cpp", ["csrc/bpe.cpp"], cxx_std=17, extra_compile_args=["-O3"]),
        Pybind11Extension("megalm._dataset_cpp", ["csrc/dataset_helpers.cpp"], cxx_std=17,
                          extra_compile_args=["-O3", "-ffp-contract=off"]),
    ]


def cuda_extensions():
    if os.environ.get("MEGALM_NO_CUDA_BUILD") == "1":
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return []
    if torch.version.cuda is None or CUDA_HOME is None:
        return []
    return [CUDAExtension(
        name="megalm._cuda_kernels",
        sources=["csrc/cuda/bindings.cpp", "csrc/cuda/rmsnorm_kernels.cu",
                 "csrc/cuda/moe_bindings.cpp", "csrc/cuda/moe_permute_kernels.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )]


def _base_build_ext():
    """torch's BuildExtension knows nvcc; use it when CUDA extensions are part of the build."""
    if cuda_extensions():
        from torch.utils.cpp_extension import BuildExtension
        return BuildExtension
    return build_ext


class OptionalBuildExt(_base_build_ext()):
    """Build each extension if possible; never fail the install because of one."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all
            print(f"megalm setup: skipping compiled extensions ({e})", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"megalm setup: could not build {ext.name} ({e}); falling back at run time",
                  file=sys.stderr)


setup(
    name="megalm",
    version="0.1.0",
    description="Megatron-style training of GPT models, from raw text to a Hugging Face checkpoint",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalm", "megalm.*"]),
    install_requires=read_requirements("requirements.txt"),
    extras_require={"dev": read_requirements("requirements-dev.txt"), "spark": ["pyspark>=3.5"]},
    ext_modules=cpp_extensions() + cuda_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
