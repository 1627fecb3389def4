"""The package's layout: the library never imports its test fixtures at load time.

``model.testing`` (tiny models, random architectures, processor files) is imported only when an
entry point is asked to run without a checkpoint (``loading.load_engine``) and by tests.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a fresh interpreter
def test_importing_every_library_module_leaves_the_fixtures_out():
    code = """
import importlib, pkgutil, sys
import model
skip = ("model.testing", "model.__main__", "model.eval.__main__", "model.serve")
names = [m.name for m in pkgutil.walk_packages(model.__path__, "model.") if not m.name.startswith(skip)]
for name in names:
    importlib.import_module(name)
assert len(names) > 30, names
print("testing" if "model.testing" in sys.modules else "clean", len(names))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "clean", out.stdout
