"""Build the compiled hot path.

FLEXNBD_DEBUG_BUILD=1 builds with Cython annotations, line tracing and C asserts.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FLEXNBD_DEBUG_BUILD") == "1"

macros = [("_GNU_SOURCE", "1")]
cflags = ["-O2", "-Wno-unused-function"]
if DEBUG:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
    cflags = ["-O1", "-g", "-UNDEBUG"]

# The modules whose code calls OpenSSL (the transport in _nbdio.pxd is inlined into _core,
# _client, _mirror and _proxy) link the system libssl; the wheels bundle it.
TLS_USERS = {"_core", "_client", "_mirror", "_proxy", "_tls"}

extensions = [
    Extension(
        f"flexnbd.{name}",
        [f"flexnbd/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=cflags,
        libraries=["ssl", "crypto"] if name in TLS_USERS else [],
    )
    for name in ("_wire", "_allocmap", "_core", "_client", "_mirror", "_proxy", "_tls")
]

# Both steps use every CPU: the C of _core and _tls alone takes most of a minute per build.
JOBS = os.cpu_count() or 1

setup(
    options={"build_ext": {"parallel": JOBS}},
    ext_modules=cythonize(
        extensions,
        nthreads=JOBS,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "linetrace": DEBUG,
        },
    ),
)
