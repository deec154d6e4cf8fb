import pytest
import torch

from imgtx_fast import _C


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and _C.cuda_compiled():
        return
    why = "needs a CUDA device and a CUDA build of imgtx_fast"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(params=_C.cpu_isas_available())
def cpu_isa(request):
    """Run a test once per CPU code path this machine can execute (portable, avx2)."""
    previous = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)
