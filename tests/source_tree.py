"""Test the installed imgtx_fast from a checkout root, however pytest is started.

`python -m pytest` (unlike `pytest`) puts the working directory first on sys.path. From a
checkout root that is the source tree, whose imgtx_fast has no compiled _C unless it was built in
place (`pip install -e .`, the dev build): it would shadow the installed package, and every test
module would fail to import. tests/conftest.py and benchmarks/conftest.py call
prefer_installed_package() before anything imports imgtx_fast. Imports nothing of the package.
"""
import importlib.machinery
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built_in_place(package_dir: str) -> bool:
    """Whether the compiled core _C lies in package_dir (an editable install or a dev build)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return any(name.startswith("_C.") and name.endswith(suffixes) for name in os.listdir(package_dir))


def prefer_installed_package(root: str = ROOT) -> bool:
    """Drop the checkout `root` from sys.path when its imgtx_fast cannot run (no _C built in
    place) and an installed imgtx_fast exists elsewhere on sys.path. Returns whether it did."""
    source = os.path.join(root, "imgtx_fast")
    if not os.path.isdir(source) or built_in_place(source):
        return False  # not a checkout, or the checkout is the package
    here = os.path.realpath(root)
    rest = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != here]
    if len(rest) == len(sys.path):
        return False  # the checkout is not on sys.path (plain `pytest`): nothing shadows
    if importlib.machinery.PathFinder.find_spec("imgtx_fast", rest) is None:
        return False  # nothing installed: the import fails with the package's own advice
    sys.path[:] = rest
    return True
