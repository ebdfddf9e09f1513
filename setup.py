"""Build of the Cython fast path; everything else lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# One extension per fastpath module: the table, the packet helpers, the offload stage, the
# loops, the Python API.
FASTPATH_MODULES = ["table", "packet", "offload", "loops", "dataplane"]

extensions = [
    Extension(f"fastpath.{name}", [f"fastpath/{name}.pyx"], extra_compile_args=["-O2"])
    for name in FASTPATH_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
