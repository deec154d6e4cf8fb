"""python -m imgtx_fast info | demo [--kernels] | bench"""
import argparse
import os
import platform
import sys


def info() -> int:
    """Print the build and runtime facts; 1 (with the reason on stderr) when a visible GPU
    cannot run our CUDA kernels."""
    import torch

    import imgtx_fast
    from imgtx_fast import _C, _cuda_report

    cuda_ok = torch.cuda.is_available()
    cuda_rows, errors = _cuda_report.cuda_report(_cuda_report.query_cuda(),
                                                 torch.cuda.device_count() if cuda_ok else 0)
    rows = [
        ("imgtx_fast", f"{imgtx_fast.__version__} ({os.path.dirname(imgtx_fast.__file__)})"),
        ("torch", torch.__version__),
        ("python", f"{platform.python_version()} on {platform.machine()}"),
        ("cpu path", f"{_C.cpu_isa()} (available: {', '.join(_C.cpu_isas_available())})"),
        ("cpu threads", f"{torch.get_num_threads()} (torch.get_num_threads()), run on "
                        + ("torch's OpenMP team (libgomp)" if _C.cpu_threading() == "openmp"
                           else "the library's own thread pool")),
        ("cuda compiled", "yes" if _C.cuda_compiled() else "no"),
        ("cuda archs", _C.cuda_archs() or "-"),
        *cuda_rows,
        ("backend", imgtx_fast.get_backend()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for e in errors:
        print(f"imgtx-fast info: error: {e}", file=sys.stderr)
    return 1 if errors else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        from .demos import main as demo_main

        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m imgtx_fast")
    parser.add_argument("command", choices=["info", "demo", "bench"], nargs="?", default="info")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    else:
        import pytest

        bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
        if not os.path.isdir(bench_dir):
            print("benchmarks/ ships with the source tree: run `pytest benchmarks/` from a checkout")
            return 1
        return pytest.main([bench_dir])
    return 0


if __name__ == "__main__":
    sys.exit(main())
