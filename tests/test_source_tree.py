"""tests/source_tree.py: `python -m pytest` from a checkout root tests the installed package when
the checkout's imgtx_fast has no compiled core, and the checkout itself when it was built in
place (editable install, dev build). CI runs the real thing (.ci/run: `python -m pytest` after a
non-editable install); here a fake checkout and a fake install on sys.path."""
import importlib.machinery
import sys

import pytest

from source_tree import built_in_place, prefer_installed_package


def _package(parent, compiled=False):
    pkg = parent / "imgtx_fast"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if compiled:
        (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    return parent


@pytest.fixture
def layout(tmp_path, monkeypatch):
    checkout, site = tmp_path / "checkout", _package(tmp_path / "site")
    monkeypatch.setattr(sys, "path", ["", str(site)] + sys.path)
    monkeypatch.chdir(tmp_path)
    return checkout, site


@pytest.mark.parametrize("entry", ["cwd", "absolute"])
def test_a_checkout_without_its_core_leaves_sys_path(layout, monkeypatch, entry):
    checkout, site = layout
    _package(checkout)
    if entry == "cwd":  # python -m: '' is the working directory
        monkeypatch.chdir(checkout)
    else:
        sys.path.insert(0, str(checkout))
    assert prefer_installed_package(str(checkout))
    assert str(checkout) not in sys.path
    assert ("" in sys.path) == (entry == "absolute")  # '' stays unless it is the checkout
    assert str(site) in sys.path


def test_a_checkout_built_in_place_stays(layout, monkeypatch):
    checkout, _ = layout
    _package(checkout, compiled=True)
    monkeypatch.chdir(checkout)
    assert built_in_place(str(checkout / "imgtx_fast"))
    assert not prefer_installed_package(str(checkout))
    assert sys.path[0] == ""


def test_without_an_install_the_checkout_stays(tmp_path, monkeypatch):
    checkout = _package(tmp_path / "checkout")
    monkeypatch.setattr(sys, "path", [str(checkout), str(tmp_path / "empty")])
    assert not prefer_installed_package(str(checkout))
    assert sys.path[0] == str(checkout)


def test_a_checkout_off_sys_path_changes_nothing(layout):
    checkout, _ = layout
    _package(checkout)
    before = list(sys.path)
    assert not prefer_installed_package(str(checkout))
    assert sys.path == before

