"""Build of the Cython fast path and of its tc programs; everything else lives in pyproject.toml."""

import os
import shutil
import subprocess
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# One extension per fastpath module: the table, the packet helpers, the offload stage, the
# loops, the Python API.
FASTPATH_MODULES = ["table", "packet", "offload", "loops", "dataplane"]
# The kernel path (fastpath/udp_tc.py loads it): BPF bytecode, the same on every CPU of one
# byte order, built by clang beside the sources so that wheels and editable installs both find it.
BPF_SOURCE = "fastpath/udp_tc.bpf.c"
BPF_OBJECT = "fastpath/udp_tc.bpf.o"


def build_bpf() -> None:
    """Compile the tc programs when clang is here; without it the kernel path is left out and
    the daemon runs the loops alone (and says so)."""
    if os.path.exists(BPF_OBJECT) and os.path.getmtime(BPF_OBJECT) >= os.path.getmtime(BPF_SOURCE):
        return
    clang = shutil.which("clang")
    if clang is None:
        print(f"warning: clang not found: {BPF_OBJECT} is not built, the kernel path is left out")
        return
    # Debian keeps <asm/types.h> under the multiarch include directory.
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
                    f"-I/usr/include/{multiarch}", "-c", BPF_SOURCE, "-o", BPF_OBJECT],
                   check=True)


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        build_bpf()
        super().run()


class BuildExtWithBpf(build_ext):
    def run(self) -> None:
        build_bpf()
        super().run()


extensions = [
    Extension(f"fastpath.{name}", [f"fastpath/{name}.pyx"], extra_compile_args=["-O2"])
    for name in FASTPATH_MODULES
]

setup(
    cmdclass={"build_py": BuildPyWithBpf, "build_ext": BuildExtWithBpf},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
