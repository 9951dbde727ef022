"""Thin front end: builds the CMake project (CMakeLists.txt) into peft_kernels/_C."""
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "peft_kernels" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            import pybind11
            import torch.utils
        except ImportError as err:
            raise RuntimeError(
                f"peft_kernels builds against the torch and pybind11 already installed ({err}). "
                "Install them first (CPU-only: pip install torch==2.13.0 pybind11), then run "
                "pip install --no-build-isolation ."
            ) from err

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda_mode = os.environ.get("PEFT_KERNELS_CUDA", "AUTO").upper()
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        generator = ["-G", "Ninja"] if self._have_ninja() else []
        configure = [
            "cmake", str(ROOT), *generator,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPEFT_KERNELS_CUDA={cuda_mode}",
            f"-DPK_VERSION={read_version()}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)

    @staticmethod
    def _have_ninja() -> bool:
        try:
            subprocess.run(["ninja", "--version"], check=True, capture_output=True)
            return True
        except (OSError, subprocess.CalledProcessError):
            return False


setup(
    version=read_version(),
    ext_modules=[CMakeExtension("peft_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
