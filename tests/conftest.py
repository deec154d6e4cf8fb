import pytest
import torch

from source_tree import prefer_installed_package

prefer_installed_package()  # `python -m pytest` from a checkout root: the installed package

from imgtx_fast import _C  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and _C.cuda_compiled():
        return
    why = "needs a CUDA device and a CUDA build of imgtx_fast"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the item (item.rep_setup, item.rep_call): fixtures read it
    at teardown (tests/cuda_targets.py checks the emulator's launch count after passed tests)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(params=_C.cpu_isas_available())
def cpu_isa(request):
    """Run a test once per CPU code path this machine can execute (portable, avx2)."""
    previous = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors on a shared 2-core machine, where OpenMP
    barriers would dominate. Model and demo tests use it module-wide via
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
