"""Packaging for rwp-kernels.

torch is imported only when an ahead-of-time build of the C++/CUDA extension is requested, so that
pip's isolated build works on a machine where torch is not installed yet.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
TRAIN = ["tqdm", "scikit-learn", "matplotlib", "torchvision"]
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "rwp_kernels" / "_version.py").read_text()).group(1)

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
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        "test": ["pytest>=7", "numpy", "scipy", *TRAIN],
        "train": TRAIN,
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["rwp-train = rwp_kernels.train.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
