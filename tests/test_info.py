"""`imgtx-fast info`'s CUDA report: the driver, and whether our kernels can run on each GPU.

The facts come from imgtx_fast._cuda_report.query_cuda() (the CUDA runtime linked into _C);
these tests replace it with drivers and GPUs this machine does not have.
"""
import re

import pytest

from imgtx_fast import _C, _cuda_report
from imgtx_fast.__main__ import main
from imgtx_fast._cuda_report import cuda_report, kernel_image

WHEEL_ARCHS = "80-real,90a-real,90-virtual"  # the default build (CMakeLists.txt)
H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": (9, 0)}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "capability": (8, 0)}
B200 = {"name": "NVIDIA B200", "capability": (10, 0)}
T4 = {"name": "Tesla T4", "capability": (7, 5)}


def facts(driver=13000, runtime=13000, devices=(H100,), error="", archs=WHEEL_ARCHS):
    return {"driver_version": driver, "runtime_version": runtime, "devices": list(devices),
            "error": error, "archs": archs}


def run_info(monkeypatch, capsys, query):
    monkeypatch.setattr(_cuda_report, "query_cuda", lambda: query)
    code = main(["info"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("capability, image", [
    ((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 9), "sm_80"),   # A100, RTX 30xx, L4/RTX 40xx
    ((9, 0), "sm_90a"),                                          # H100/H200: the Hopper binary
    ((10, 0), "compute_90 PTX"), ((12, 0), "compute_90 PTX"),    # Blackwell: the driver compiles PTX
    ((7, 5), None), ((7, 0), None),                              # Turing, Volta: nothing fits
])
def test_kernel_image_of_the_default_archs(capability, image):
    assert kernel_image(capability, WHEEL_ARCHS) == image


@pytest.mark.parametrize("archs, capability, image", [
    ("86-real", (8, 9), "sm_86"),        # a binary runs on later minors of its major
    ("86-real", (8, 0), None),           # ... not on earlier ones
    ("86-real", (9, 0), None),           # ... nor on another major
    ("90a-real", (9, 1), None),          # arch-specific: that exact GPU only
    ("90a-virtual", (10, 0), None),      # arch-specific PTX too
    ("100f-real", (10, 3), "sm_100f"),   # family binary: later minors of the family
    ("80", (8, 0), "sm_80"),             # no suffix: binary and PTX, the binary wins
    ("80", (9, 0), "compute_80 PTX"),
    ("75-real;80-real", (8, 6), "sm_80"),  # ';' separated, as CMake writes it
    ("80-real;86-real", (8, 9), "sm_86"),  # the newest binary that fits
    ("90-real;90a-real", (9, 0), "sm_90a"),  # the arch-specific one on its own GPU
    ("native", (9, 0), "unknown"), ("all-major", (8, 0), "unknown"),
])
def test_kernel_image_rules(archs, capability, image):
    assert kernel_image(capability, archs) == image


def test_supported_gpus_and_driver(monkeypatch, capsys):
    code, out, err = run_info(monkeypatch, capsys, facts(driver=13020, devices=[H100, A100, B200]))
    assert code == 0 and err == ""
    assert "supports CUDA 13.2" in out and "13.0 (linked into imgtx_fast._C)" in out
    assert "3 visible to imgtx_fast" in out
    assert "NVIDIA H100 80GB HBM3, sm_90: runs our kernels (sm_90a)" in out
    assert "NVIDIA A100-SXM4-80GB, sm_80: runs our kernels (sm_80)" in out
    assert "NVIDIA B200, sm_100: runs our kernels (compute_90 PTX)" in out


def test_driver_older_than_the_runtime(monkeypatch, capsys):
    # an R570 driver (CUDA 12.8) under the CUDA 13 runtime: cudaGetDeviceCount fails too
    query = facts(driver=12080, devices=[],
                  error="cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    code, out, err = run_info(monkeypatch, capsys, query)
    assert code == 1
    assert re.search(r"cuda driver +supports CUDA 12\.8", out)
    assert err.count("error:") == 1, err  # one clear reason, not the raw runtime error too
    assert "supports CUDA 12.8" in err and "CUDA 13.0 runtime" in err and "R580 or newer" in err
    assert "Update the driver" in err


def test_old_driver_marks_each_gpu(monkeypatch, capsys):
    code, out, err = run_info(monkeypatch, capsys, facts(driver=12090, devices=[H100]))
    assert code == 1
    assert "sm_90: cannot run our kernels (driver too old)" in out
    assert "R580" in err


def test_minor_version_compatibility(monkeypatch, capsys):
    # a CUDA 13.0 driver runs binaries of a CUDA 13.2 runtime ...
    code, out, err = run_info(monkeypatch, capsys, facts(driver=13000, runtime=13020, devices=[H100]))
    assert code == 0 and err == ""
    # ... but cannot compile its PTX
    code, out, err = run_info(monkeypatch, capsys, facts(driver=13000, runtime=13020, devices=[B200]))
    assert code == 1
    assert "cannot run our kernels (compute_90 PTX from CUDA 13.2, driver too old)" in out
    assert "GPU 0 (NVIDIA B200, sm_100)" in err and "Update the driver" in err


def test_gpu_without_a_kernel_image(monkeypatch, capsys):
    code, out, err = run_info(monkeypatch, capsys, facts(devices=[A100, T4]))
    assert code == 1
    assert re.search(r"gpu 0 +NVIDIA A100-SXM4-80GB, sm_80: runs our kernels \(sm_80\)", out)
    assert re.search(r"gpu 1 +Tesla T4, sm_75: cannot run our kernels", out)
    assert err.count("error:") == 1
    assert "GPU 1 (Tesla T4, sm_75) cannot run imgtx_fast's CUDA kernels" in err
    assert WHEEL_ARCHS in err


@pytest.mark.parametrize("query", [
    facts(driver=0, devices=[]),                             # no NVIDIA driver installed
    facts(devices=[]),                                       # a driver, no GPU (cudaErrorNoDevice)
    facts(driver=0, runtime=0, devices=[], archs=""),        # a build without CUDA
])
def test_no_gpu_is_not_an_error(monkeypatch, capsys, query):
    code, out, err = run_info(monkeypatch, capsys, query)
    assert code == 0 and err == ""
    assert "0 visible to imgtx_fast" in out
    assert ("none found" in out) == (query["driver_version"] == 0)
    assert bool(re.search(r"cuda runtime +-\n", out)) == (query["runtime_version"] == 0)


def test_other_query_errors_are_reported(monkeypatch, capsys):
    query = facts(devices=[], error="cudaErrorOperatingSystem: OS call failed or operation not supported")
    code, out, err = run_info(monkeypatch, capsys, query)
    assert code == 1
    assert "cannot list the GPUs: cudaErrorOperatingSystem" in err


def test_report_rows_are_info_rows():
    rows, errors = cuda_report(facts(devices=[H100]), torch_devices=1)
    assert [k for k, _ in rows] == ["cuda driver", "cuda runtime", "cuda devices", "gpu 0"]
    assert rows[2][1] == "1 visible to imgtx_fast; torch sees 1"
    assert errors == []


def test_query_of_the_compiled_module():
    """The real query: the keys the report reads, and a build without CUDA reports none."""
    query = _cuda_report.query_cuda()
    assert set(query) == {"driver_version", "runtime_version", "devices", "error", "archs"}
    assert query["archs"] == _C.cuda_archs()
    if not _C.cuda_compiled():
        assert query == facts(driver=0, runtime=0, devices=[], archs="")
    else:
        assert query["runtime_version"] >= 12000
        for dev in query["devices"]:
            assert isinstance(dev["name"], str) and len(dev["capability"]) == 2
