"""Packaging for rwp-kernels.

torch is imported only when an ahead-of-time build of the C++/CUDA extension is requested, so that
pip's isolated build works on a machine where torch is not installed yet. Without it, the extension
is compiled on first use (or by ``python -m rwp_kernels.build``).

Ahead-of-time build (into the wheel / the installed package, as rwp_kernels/_C*.so):

    RWP_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .

It uses the installed torch and the same sources, flags and CUDA settings as the on-the-fly build
(rwp_kernels/_ext_config.py: RWP_KERNELS_BUILD_CUDA, RWP_KERNELS_MARCH, TORCH_CUDA_ARCH_LIST, CUDA_HOME,
MAX_JOBS). The CPU kernels target the building machine (-march=native) unless RWP_KERNELS_MARCH says
otherwise; the library is used only with the torch version it was built against.
"""
import importlib.util
import json
import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
TRAIN = ["tqdm", "scikit-learn", "matplotlib", "torchvision"]
INTEGRATIONS = ["lightning>=2.6", "accelerate>=1.0", "timm>=1.0"]  # the trainers tests/test_integration_*.py run
_VERSIONS = (ROOT / "rwp_kernels" / "_version.py").read_text()  # read, not imported: importing the package needs torch
VERSION, MIN_TORCH, MIN_TRITON = (re.search(rf'{name} = "([^"]+)"', _VERSIONS).group(1)
                                  for name in ("__version__", "MIN_TORCH", "MIN_TRITON"))


def ahead_of_time_extension():
    """(ext_modules, cmdclass) that compile the extension at install time; imports torch."""
    spec = importlib.util.spec_from_file_location("rwp_kernels_ext_config", ROOT / "rwp_kernels" / "_ext_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    cfg = config.make_config()
    os.environ["PATH"] = config.tool_path()  # ninja of a virtual environment that is not activated
    cpp_extension = config.cpp_extension(cfg.cuda_home)
    make = cpp_extension.CUDAExtension if cfg.with_cuda else cpp_extension.CppExtension
    sources = [os.path.relpath(s, ROOT) for s in cfg.sources]
    ext = make("rwp_kernels._C", sources, extra_compile_args={"cxx": cfg.cflags, "nvcc": cfg.cuda_cflags},
                extra_link_args=cfg.ldflags)

    class BuildExt(cpp_extension.BuildExtension):
        """Also records the torch version next to the library: the loader ignores a build for another torch."""

        def run(self):
            super().run()
            import torch

            stamp = Path(self.get_ext_fullpath(ext.name)).with_name(config.AOT_STAMP)
            stamp.write_text(json.dumps({"torch": torch.__version__, "with_cuda": cfg.with_cuda, "key": cfg.key}))

    return [ext], {"build_ext": BuildExt}


BUILD_EXT = os.environ.get("RWP_KERNELS_BUILD_EXT", "").strip() not in ("", "0")
ext_modules, cmdclass = ahead_of_time_extension() if BUILD_EXT else ([], {})

setup(
    name="rwp-kernels",
    version=VERSION,
    description="Fused kernels and drop-in optimizers for Random Weight Perturbation (RWP) training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["rwp_kernels", "rwp_kernels.*"]) + ["rwp_kernels.optim", "rwp_kernels._csrc"],
    package_dir={"rwp_kernels.optim": "python_api", "rwp_kernels._csrc": "csrc"},
    package_data={"rwp_kernels._csrc": ["*.h", "*.cuh", "*.cpp", "*.cu", "*/*.h", "*/*.cuh", "*/*.cpp", "*/*.cu"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[f"torch>={MIN_TORCH}", "ninja"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "numpy", "scipy", *TRAIN, *INTEGRATIONS],
        "train": TRAIN,
        "bench": ["matplotlib"],
        "triton": [f"triton>={MIN_TRITON}"],  # the Triton backend; torch >= 2.12 brings such a Triton itself
    },
    entry_points={"console_scripts": ["rwp-train = rwp_kernels.train.cli:command"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
