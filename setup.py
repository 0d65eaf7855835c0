"""Builds the Cython twin ``unionfs._fast_c``; metadata lives in pyproject.toml.

The extension is required: a missing Cython or compiler fails the build. UNIONFS_NO_EXT=1 makes a
pure-Python install on purpose, which then runs on ``unionfs._fast_py``.
"""

import os
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


if os.environ.get("UNIONFS_NO_EXT", "") not in ("", "0"):
    log("UNIONFS_NO_EXT is set: pure-Python build, unionfs._fast_c is not built")
    ext_modules = []
else:
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("unionfs setup: Cython>=3 is needed to build unionfs._fast_c "
                 "(pip install Cython, or set UNIONFS_NO_EXT=1 for a pure-Python install)")
    log("Cython build: compiling csrc/_fast_c.pyx into unionfs._fast_c")
    ext_modules = cythonize(
        [Extension("unionfs._fast_c", ["csrc/_fast_c.pyx"])],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
