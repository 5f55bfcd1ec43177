"""Build ember: three package roots plus the optional CUDA extension ``ember._C``.

``ember._C`` is built with CMake + pybind11 when ``nvcc`` is found. It does not link libtorch:
bindings take device pointers, sizes, strides, dtype codes and the CUDA stream as integers, so
the build does not depend on the installed torch.

Environment:
    EMBER_BUILD_CUDA   unset: build if nvcc is found; "0": never build; "1": nvcc is required.
    EMBER_CUDA_ARCHS   CMake CUDA architectures, default "80;90a".
    EMBER_BUILD_JOBS   parallel compile jobs (default: CPU count).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def cuda_build_mode():
    flag = os.environ.get("EMBER_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"EMBER_BUILD_CUDA must be unset, '0' or '1', got {flag!r}")
    return flag


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        mode = cuda_build_mode()
        nvcc = find_nvcc()
        if mode == "0":
            print("ember: EMBER_BUILD_CUDA=0, skipping ember._C")
            return
        if nvcc is None:
            if mode == "1":
                raise RuntimeError(
                    "ember: EMBER_BUILD_CUDA=1 but nvcc was not found (PATH, CUDA_HOME)")
            print("ember: nvcc not found, skipping ember._C (Triton and torch backends only)")
            return
        for ext in self.extensions:
            self.build_cmake(ext, nvcc)

    def build_cmake(self, ext, nvcc):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("EMBER_CUDA_ARCHS", "80;90a")
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DEMBER_CUDA_ARCHS={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        jobs = os.environ.get("EMBER_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", str(ROOT), *cfg], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)


setup(
    package_dir={
        "": "python",
        "ember.triton_kernels": "triton_kernels",
        "ember.neuron_kernels": "neuron_kernels",
    },
    packages=[
        "ember",
        "ember.ops",
        "ember.engine",
        "ember.models",
        "ember.triton_kernels",
        "ember.neuron_kernels",
    ],
    ext_modules=[CMakeExtension("ember._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
