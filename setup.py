"""The one build step pyproject.toml cannot say: goev.py becomes the package goev/.

PEP 561 reads a ``py.typed`` marker only inside a package: a wheel that installed
goev.py as a top-level module would give type checkers nothing ("module is
installed, but missing library stubs or py.typed marker").  So the wheel holds

    goev/__init__.py   goev.py itself, byte for byte
    goev/__main__.py   ``python -m goev``: calls goev.py's CLI entry point, _main()
    goev/py.typed      the PEP 561 marker (empty)

made here at build time, while the repository keeps the one goev.py: vendoring is
still "copy goev.py", and ``python -m goev`` in a checkout runs goev.py itself.  An
editable install (``pip install -e .``) maps the module goev to the checkout's
goev.py instead, so edits are live (and PEP 561 does not apply to it).
Standard library and setuptools only; everything else is in pyproject.toml.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))

# What goev.py runs under ``if __name__ == "__main__"``, for the package form.
MAIN_PY = '''\
"""python -m goev: goev.py's command line (its section 16)."""

import sys

from goev import _main

if __name__ == "__main__":
    sys.exit(_main())
'''


class GoevDistribution(Distribution):
    """pyproject.toml lists no module (the package is made below), so say there is
    one: setuptools runs build_py and install_lib only for a distribution that has
    pure modules."""

    def has_pure_modules(self) -> bool:
        return True


class BuildGoevPackage(build_py):
    """build_py that writes goev/ (see the module docstring) into build_lib."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:            # (the module goev is goev.py: see setup() below)
            return
        pkg = os.path.join(self.build_lib, "goev")
        self.mkpath(pkg)
        self.copy_file(os.path.join(HERE, "goev.py"), os.path.join(pkg, "__init__.py"))
        for name, text in (("__main__.py", MAIN_PY), ("py.typed", "")):
            with open(os.path.join(pkg, name), "w", encoding="utf-8") as f:
                f.write(text)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        pkg = os.path.join(self.build_lib, "goev")
        return super().get_outputs(include_bytecode) + [
            os.path.join(pkg, name) for name in ("__init__.py", "__main__.py", "py.typed")]

    def get_source_files(self) -> list:
        return super().get_source_files() + ["goev.py"]     # (so the sdist carries it)


# No module to discover or copy: build_py makes the package.  An editable build
# (setuptools runs the command editable_wheel) maps the module goev to goev.py.
EDITABLE = "editable_wheel" in sys.argv[1:]
setup(distclass=GoevDistribution, cmdclass={"build_py": BuildGoevPackage},
      py_modules=["goev"] if EDITABLE else [], packages=[])
