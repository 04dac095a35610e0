"""Build lorambo, lorambo_kernels (from kernels/) and the optional compiled extension lorambo._C.

Switches (environment):
  LORAMBO_SKIP_EXT=1           build without the extension (pure Python wheel; refused together
                               with LORAMBO_BUILD_CUDA=1)
  LORAMBO_BUILD_CUDA=0|1|auto  CUDA sources: never / always / when torch has CUDA and nvcc exists
  MAX_JOBS                     parallel compile jobs (read by torch.utils.cpp_extension)

The extension is optional at run time: a build without a compiler, without torch in the build
environment or without CUDA still produces a working package (a py3-none-any wheel when the
compile failed), and says why it skipped.
LORAMBO_BUILD_CUDA=1 is the exception: CUDA was asked for explicitly, so a torch without CUDA,
a missing nvcc or a failed compile stops the build instead of silently dropping the extension.

Sources: csrc/**/*.cpp always, csrc/**/*.cu with CUDA; headers in csrc/include. The CPU kernels
use at::parallel_for, which is OpenMP inside torch's headers: -fopenmp makes it parallel (and
links the libgomp.so.1 that torch itself loads).
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

CSRC = "csrc"
HERE = os.path.dirname(os.path.abspath(__file__))


def _sources_module():
    """lorambo/ext/sources.py, loaded by path: importing lorambo would need torch and more."""
    spec = importlib.util.spec_from_file_location(
        "_lorambo_sources", os.path.join(HERE, "lorambo", "ext", "sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources_header(digest):
    """The folder of a generated header defining LORAMBO_SOURCES_HASH (csrc/ops.cpp exposes it as
    lorambo._C.sources_hash). Rewritten only when the hash changes: ninja then recompiles ops.cpp
    alone, where a -D flag would change every file's command line and recompile them all."""
    folder = os.path.join(HERE, "build", "generated")
    header = os.path.join(folder, "lorambo_sources_hash.h")
    text = f'#pragma once\n#define LORAMBO_SOURCES_HASH "{digest}"\n'
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(header) or open(header).read() != text:
        with open(header, "w") as out:
            out.write(text)
    return folder


def _log(msg):
    print(f"lorambo setup: {msg}", file=sys.stderr)


def _cuda_mode():
    mode = os.environ.get("LORAMBO_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"LORAMBO_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode


def _want_cuda(torch_cuda_available_at_build):
    mode = _cuda_mode()
    if mode == "0":
        return False
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    if mode == "1":
        if not (has_nvcc and torch_cuda_available_at_build):
            raise SystemExit("LORAMBO_BUILD_CUDA=1 needs nvcc and a torch built with CUDA "
                             f"(nvcc found: {has_nvcc}, torch CUDA: {torch_cuda_available_at_build})")
        return True
    return has_nvcc and torch_cuda_available_at_build


def toolkit_root():
    """The CUDA toolkit the ``nvcc`` on PATH belongs to, as nvcc itself reports it (the
    ``#$ TOP=`` line of a dry run), or None when there is no nvcc or it does not say.

    torch takes the folder above the ``nvcc`` on PATH as CUDA_HOME. Behind a wrapper script
    (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) that is /usr/local, which holds
    no libcudart, and the link fails with "cannot find -lcudart"."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line[len("#$ TOP="):].strip())
    return None


def _point_torch_at_the_toolkit():
    """Set CUDA_HOME to nvcc's own toolkit when neither CUDA_HOME nor CUDA_PATH is set and
    torch's guess (the folder above nvcc on PATH) differs; must run before torch.utils.cpp_extension
    is imported, which reads it once."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    root = toolkit_root()
    guess = os.path.dirname(os.path.dirname(os.path.abspath(nvcc)))
    if root is not None and os.path.realpath(guess) != root:
        _log(f"CUDA_HOME={root} (nvcc's own toolkit; the folder above {nvcc} is {guess})")
        os.environ["CUDA_HOME"] = root


def extension_build():
    """(ext_modules, cmdclass) for lorambo._C, or empty ones when it cannot or should not build."""
    skip = os.environ.get("LORAMBO_SKIP_EXT", "0").strip()
    if skip not in ("0", "1", ""):  # "true" or "yes" used to build the extension, silently
        raise SystemExit(f"LORAMBO_SKIP_EXT must be 0 or 1, got {skip!r}")
    if skip == "1":
        if _cuda_mode() == "1":  # one of the two requests would be dropped without a word
            raise SystemExit("LORAMBO_SKIP_EXT=1 (no compiled extension) contradicts LORAMBO_BUILD_CUDA=1 "
                             "(the extension with CUDA): unset one of them")
        _log("LORAMBO_SKIP_EXT=1: building without the compiled extension")
        return [], {}
    cpp = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    if not cpp:
        _log("no C++ sources in csrc/: building without the compiled extension")
        return [], {}
    try:
        import torch

        if torch.version.cuda is not None and _cuda_mode() != "0":
            _point_torch_at_the_toolkit()
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable in the build environment (use --no-build-isolation): "
             "building without the compiled extension")
        return [], {}
    include = os.path.join(HERE, CSRC, "include")
    sources = _sources_module()
    digest = sources.sources_hash(os.path.join(HERE, CSRC))
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # elsewhere: serial at::parallel_for
    # -fno-math-errno: nothing reads errno, and without it GCC keeps every sqrt scalar (a negative
    # input must set errno), which left the pool AdamW loop unvectorised (csrc/cpu/pool_adamw_cpu.cpp).
    common = {
        "include_dirs": [include, _sources_header(digest)],
        "extra_compile_args": {"cxx": ["-O3", "-g0", "-std=c++20", "-fno-math-errno", *omp]},
        "extra_link_args": omp,
    }
    strict = _cuda_mode() == "1"
    if cu and _want_cuda(torch.version.cuda is not None):
        # TORCH_CUDA_ARCH_LIST (e.g. "9.0" for one GPU) is torch's own switch; without it, wheels
        # carry sm_80 and sm_90 code.
        arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        common["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", *arch]
        ext = CUDAExtension("lorambo._C", cpp + cu, define_macros=[("LORAMBO_WITH_CUDA", "1")], **common)
        _log(f"building lorambo._C with CUDA ({len(cpp)} C++ and {len(cu)} CUDA sources)")
    else:
        ext = CppExtension("lorambo._C", cpp, **common)
        _log(f"building lorambo._C for the CPU ({len(cpp)} C++ sources"
             + (f"; {len(cu)} CUDA sources skipped: torch has no CUDA or nvcc is missing)" if cu else ")"))

    class OptionalBuildExtension(BuildExtension):
        """A failed compile (no compiler, bad toolchain) warns and yields a pure-Python build,
        unless CUDA was requested explicitly (LORAMBO_BUILD_CUDA=1)."""

        def finalize_options(self):
            super().finalize_options()
            # One object folder for every build of this checkout (editable installs would
            # otherwise compile in a fresh temporary folder each time): ninja then recompiles
            # only what changed (it tracks headers and compile flags, torch's included).
            self.build_temp = os.path.join(HERE, "build", f"ext-{sys.implementation.cache_tag}")

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any toolchain failure makes the ext optional
                if strict:
                    raise
                _log(f"compiled extension skipped, build failed: {err}")
                self._build_pure()
                return
            # the hash of the sources built, next to the module: a wheel carries no csrc/ for
            # lorambo.ext.loader to hash, so it compares the module with this record
            record = os.path.join(os.path.dirname(self.get_ext_fullpath("lorambo._C")), sources.RECORD)
            with open(record, "w") as out:
                out.write(digest + "\n")

        def _build_pure(self):
            """Without the extension the wheel is pure Python: tag it py3-none-any, as
            LORAMBO_SKIP_EXT=1 does, not for this interpreter and platform. bdist_wheel chose
            its tag from the ext_modules before the build and reads it again after."""
            self.distribution.ext_modules = []
            wheel = self.distribution.get_command_obj("bdist_wheel", create=False)
            if wheel is not None:
                wheel.root_is_pure = True

    return [ext], {"build_ext": OptionalBuildExtension}


class CleanBuildPy(build_py):
    """Copies the packages into an emptied build/lib. setuptools copies over what is there and
    the wheel takes the whole folder, so a module since deleted from the sources, or an earlier
    build's lorambo/_C*.so and _C.sources, would go into the next wheel (under LORAMBO_SKIP_EXT=1,
    a py3-none-any wheel holding a stale extension). build_ext links into build/lib after this;
    its objects stay in build/ext-* (``OptionalBuildExtension``), so nothing recompiles."""

    def run(self):
        ours = os.path.realpath(os.path.join(HERE, "build")) + os.sep
        if os.path.isdir(self.build_lib) and os.path.realpath(self.build_lib).startswith(ours):
            shutil.rmtree(self.build_lib)
        super().run()


ext_modules, cmdclass = extension_build()
cmdclass.setdefault("build_ext", build_ext)
cmdclass["build_py"] = CleanBuildPy

setup(
    packages=find_packages(include=["lorambo", "lorambo.*"])
    + ["lorambo_kernels." + p for p in find_packages(where="kernels/lorambo_kernels")]
    + ["lorambo_kernels"],
    package_dir={"lorambo_kernels": "kernels/lorambo_kernels"},
    package_data={"lorambo": ["py.typed"]},  # the PEP 561 marker, named rather than left to setuptools' defaults
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
