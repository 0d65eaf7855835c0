"""Builds the Cython twins ``unionfs.fs._fast_c`` and ``unionfs.fs._session_c`` and generates the gRPC code
of the containerd snapshotter from its .proto files; metadata lives in pyproject.toml.

The extension is required: a missing Cython or compiler fails the build. UNIONFS_NO_EXT=1 makes a
pure-Python install on purpose, which then runs on ``unionfs.fs._fast_py``.
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
        self.build_waiter()

    def build_waiter(self):
        """unionfs/launcher/_waiter from csrc/waiter.c: the detached supervisor's C twin of
        waiter.py (a program, not an extension: it waits in ~0.3 MB where Python takes ~3.6)."""
        out_dir = os.path.join("unionfs", "launcher")
        if not self.inplace:
            out_dir = os.path.join(self.build_lib, out_dir)
        objects = self.compiler.compile([os.path.join("csrc", "waiter.c")],
                                        output_dir=self.build_temp,
                                        extra_postargs=["-Wall", "-Wextra"])
        self.compiler.link_executable(objects, "_waiter", output_dir=out_dir)
        log(f"built the waiter csrc/waiter.c -> {os.path.join(out_dir, '_waiter')}")


def generate_protos():
    """unionfs/snapshotter/proto/*_pb2*.py from the .proto files next to them, with grpcio-tools.

    Generated here, at every build (editable ones too), into the source tree: the files then match the
    .proto files and the protobuf of the build; they are not kept in git.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("unionfs setup: grpcio-tools is needed to generate the snapshotter's gRPC code "
                 "(pip install grpcio-tools)")
    here = os.path.dirname(os.path.abspath(__file__))
    proto_dir = os.path.join("unionfs", "snapshotter", "proto")
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")   # google/protobuf/*.proto
    for name, grpc_out in (("mount.proto", False), ("snapshots.proto", True)):
        args = ["protoc", f"-I{here}", f"-I{wkt}", f"--python_out={here}"]
        if grpc_out:
            args.append(f"--grpc_python_out={here}")
        path = os.path.join(here, proto_dir, name)
        if protoc.main(args + [path]) != 0:
            sys.exit(f"unionfs setup: protoc failed on {path}")
    log(f"generated the gRPC code of {proto_dir}/*.proto")


generate_protos()

if os.environ.get("UNIONFS_NO_EXT", "") not in ("", "0"):
    log("UNIONFS_NO_EXT is set: pure-Python build, unionfs.fs._fast_c is not built")
    ext_modules = []
else:
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("unionfs setup: Cython>=3 is needed to build unionfs.fs._fast_c "
                 "(pip install Cython, or set UNIONFS_NO_EXT=1 for a pure-Python install)")
    log("Cython build: compiling csrc/_fast_c.pyx into unionfs.fs._fast_c, "
        "csrc/_session_c.pyx into unionfs.fs._session_c")
    ext_modules = cythonize(
        [Extension("unionfs.fs._fast_c", ["csrc/_fast_c.pyx"]),
         # liburing (Debian's liburing-dev) sets up the rings of FUSE over io_uring.
         Extension("unionfs.fs._session_c", ["csrc/_session_c.pyx"], include_dirs=["csrc"],
                   libraries=["uring"], depends=["csrc/_uring.h"])],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
