"""Pure-Python install: the C++/CUDA core builds on first import (tokenspeed_ext/_build.py).

A non-editable install copies csrc/ into the installed tokenspeed_ext package so the JIT
build finds its sources wherever the package lands.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ from the source tree
        target = Path(self.build_lib) / "tokenspeed_ext" / "csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target,
                        ignore=shutil.ignore_patterns("*.o", "__pycache__", "build*"))


setup(cmdclass={"build_py": BuildPyWithSources})
