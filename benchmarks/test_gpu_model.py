"""The GPU cost model (benchmarks/gpu_model.py) as a benchmark: runnable on the CPU, under the CUDA
emulator. Each row is a MODEL from emulated counts, not a measurement. In CI's smoke run
(--benchmark-disable) it models one case per kernel family with few sampled blocks and no ptxas;
a full run (`pytest benchmarks/test_gpu_model.py -s`) models every shape of the GPU benchmarks and
prints the tables for docs/performance.md."""
import pytest

import gpu_model
from imgtx_fast.testing import emulator_available

pytestmark = pytest.mark.skipif(not emulator_available(),
                                reason="needs imgtx_fast._C_simt (IMGTX_FAST_SIMT=1 pip install .)")

SMOKE_CASES = {"attention": "dense fwd", "codebook": "K=8192 D=64 float32", "diffusion": "(8,1024,256) plain"}


@pytest.mark.parametrize("family", sorted(gpu_model.FAMILIES))
def test_gpu_model(family, bench_settings, capsys):
    smoke = not bench_settings.timing
    cases = [c for c in gpu_model.FAMILIES[family]() if not smoke or SMOKE_CASES[family] in c.label]
    assert cases, family
    results = [gpu_model.model_case(c, sample_blocks=1 if smoke else 8, with_ptxas=not smoke)
               for c in cases]
    for r in results:
        assert r["launches"], f"{r['case'].label}: no CUDA kernel ran under the emulator"
        assert r["bytes_ratio"] >= 0.5, f"{r['case'].label}: moved less than the op must move"
    with capsys.disabled():
        print(f"\nGPU cost model, {family} ({gpu_model.H100.name}; a model, not a measurement)\n")
        print(gpu_model.markdown(results))
