"""Build hook: the native CPU expert kernels (homerun/kernels/csrc) are an optional shared library, compiled from source at
install and loaded by homerun/kernels/cpu_experts.py through ctypes. If the C compiler is missing or the build fails, the
install still succeeds and homerun uses its pure-torch fallback (`homerun plan --hw auto` reports which path runs).

It is built as a setuptools Extension only for the compiler plumbing; it has no Python module init and is never
imported. Rebuild in a source checkout with `python setup.py build_ext --inplace`.
"""

import glob
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_KERNEL = "homerun.kernels._hr_kernels"
_ROOT = os.path.dirname(os.path.abspath(__file__))


def _source_hash():
    """homerun/kernels/csrc_hash.py's hash of the C sources, loaded by path (homerun itself needs torch)."""
    spec = importlib.util.spec_from_file_location("_hr_csrc_hash", os.path.join(_ROOT, "homerun", "kernels", "csrc_hash.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_hash()


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a compiler error leaves the package without the kernel library."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the torch fallback"
            for ext in self.extensions:
                self._remove_old(ext)
            self._skip(exc)

    def build_extension(self, ext):
        # The library records the hash of its sources; the loader refuses one whose hash differs from the sources.
        h = _source_hash()
        if h:
            ext.define_macros = [m for m in ext.define_macros if m[0] != "HR_SRC_HASH"] + [("HR_SRC_HASH", f'"{h}"')]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._remove_old(ext)
            self._skip(exc)

    def _remove_old(self, ext):
        """A failed build must not leave the previous library in place (it would run old code unnoticed)."""
        name = self.get_ext_filename(ext.name)
        for path in {os.path.join(self.build_lib, name), os.path.join(_ROOT, name)}:
            if os.path.exists(path):
                os.remove(path)
                sys.stderr.write(f"warning: removed the previous build {path}\n")

    def get_export_symbols(self, ext):
        # A plain C library for ctypes: no PyInit_ symbol to export (MSVC would otherwise fail the link).
        return []

    def _skip(self, exc):
        sys.stderr.write(
            f"warning: homerun native CPU kernels were not built ({exc}); the pure-torch fallback will be used.\n"
        )


def _compile_args():
    if sys.platform == "win32":
        return ["/O2"]
    return ["-O3", "-std=gnu11", "-fPIC", "-pthread", "-fvisibility=default"]


def _link_args():
    return [] if sys.platform == "win32" else ["-pthread"]


_src = os.path.join("homerun", "kernels", "csrc", "hr_kernels.c")

setup(
    ext_modules=[
        Extension(
            _KERNEL,
            sources=[_src],
            depends=sorted(glob.glob(os.path.join("homerun", "kernels", "csrc", "*.[hi]*"))),
            include_dirs=[os.path.join("homerun", "kernels", "csrc")],
            extra_compile_args=_compile_args(),
            extra_link_args=_link_args(),
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
