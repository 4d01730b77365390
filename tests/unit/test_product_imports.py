"""The product stands without the development tooling: nothing in ``tanglebox/`` (nor ``app.py``)
needs the benchmark or the packages only ``requirements-dev.txt`` installs (``requests``,
``websocket-client``), so ``requirements.txt`` alone runs the server and the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

DEV_ONLY = ("bench", "requests", "websocket")

# In a fresh interpreter, with every dev-only package made unimportable (a None in sys.modules
# makes `import requests` raise ImportError), import app.py and every module of the package.
IMPORT_EVERYTHING = f"""
import importlib, pkgutil, sys
for name in {DEV_ONLY!r}:
    sys.modules[name] = None
import tanglebox
names = ["app", "conversation_templates"] + [
    m.name for m in pkgutil.walk_packages(tanglebox.__path__, "tanglebox.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_product_module_imports_without_the_dev_only_packages():
    completed = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert int(completed.stdout.split()[-1]) > 20  # the walk found the package's modules


def test_no_product_module_imports_a_dev_only_package_even_lazily():
    # The subprocess above sees only imports that run at import time; one inside a function
    # would fail later, on a user's machine, on the first call.
    offenders = []
    for path in [ROOT / "app.py", *sorted((ROOT / "tanglebox").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                          for name in names if name.split(".")[0] in DEV_ONLY]
    assert offenders == []
