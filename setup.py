"""Builds the Cython twins ``unionfs._fast_c`` and ``unionfs._session_c``; metadata lives in
pyproject.toml.

The extension is required: a missing Cython or compiler fails the build. UNIONFS_NO_EXT=1 makes a
pure-Python install on purpose, which then runs on ``unionfs._fast_py``.
"""

import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def log(msg):
    # stderr, so that it shows with `pip install -v` and in plain `setup.py` runs alike.
    print(f"unionfs setup: {msg}", file=sys.stderr)


class BuildExt(build_ext):
    def run(self):
        super().run()
        for ext in self.extensions:
            log(f"built the Cython extension {ext.name} -> {self.get_ext_fullpath(ext.name)}")


def fuse3_flags():
    """Compiler and linker flags of libfuse3 (libfuse3-dev), which the Cython session links."""
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                             capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("unionfs setup: pkg-config cannot find fuse3: install libfuse3-dev and pkg-config")
    return {"include_dirs": [a[2:] for a in out if a.startswith("-I")],
            "library_dirs": [a[2:] for a in out if a.startswith("-L")],
            "libraries": [a[2:] for a in out if a.startswith("-l")],
            "extra_compile_args": [a for a in out if a.startswith("-D")]}


if os.environ.get("UNIONFS_NO_EXT", "") not in ("", "0"):
    log("UNIONFS_NO_EXT is set: pure-Python build, unionfs._fast_c is not built")
    ext_modules = []
else:
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("unionfs setup: Cython>=3 is needed to build unionfs._fast_c "
                 "(pip install Cython, or set UNIONFS_NO_EXT=1 for a pure-Python install)")
    log("Cython build: compiling csrc/_fast_c.pyx into unionfs._fast_c, "
        "csrc/_session_c.pyx into unionfs._session_c")
    ext_modules = cythonize(
        [Extension("unionfs._fast_c", ["csrc/_fast_c.pyx"]),
         Extension("unionfs._session_c", ["csrc/_session_c.pyx"], **fuse3_flags())],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
