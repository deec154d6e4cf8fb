"""The promises of the build: no libtorch in the binary, and an honest `info`."""
import subprocess
import sys

import pytest

from imgtx_fast import _C


def elf_needed(path):
    """DT_NEEDED entries of an ELF shared object, read with the standard library only."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF", "not an ELF file"
    is64, little = data[4] == 2, data[5] == 1
    e = "<" if little else ">"
    if is64:
        shoff, = struct.unpack_from(e + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
    else:
        shoff, = struct.unpack_from(e + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(e + "HH", data, 0x2E)
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if is64:
            _, typ, _, _, offset, size, link, _, _, entsize = struct.unpack_from(e + "IIQQQQIIQQ", data, off)
        else:
            _, typ, _, _, offset, size, link, _, _, entsize = struct.unpack_from(e + "IIIIIIIIII", data, off)
        sections.append((typ, offset, size, link, entsize))
    needed = []
    for typ, offset, size, link, entsize in sections:
        if typ != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][1]
        fmt = e + ("qQ" if is64 else "iI")
        for j in range(size // entsize):
            tag, val = struct.unpack_from(fmt, data, offset + j * entsize)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + val)
                needed.append(data[strtab + val:end].decode())
    return needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check")
def test_extension_does_not_link_torch():
    needed = elf_needed(_C.__file__)
    assert needed, "found no DT_NEEDED entries: the reader is broken"
    assert any(n.startswith("libc.so") for n in needed)
    banned = [n for n in needed if any(b in n for b in ("torch", "c10", "cudart.so", "libgomp", "python"))]
    assert not banned, f"_C links {banned}; the compiled core must stay framework-free, so one build serves every torch"


def test_extension_imports_without_torch():
    """Load the .so by path, bypassing the package __init__ (which imports torch)."""
    code = ("import importlib.machinery, importlib.util, sys\n"
            "loader = importlib.machinery.ExtensionFileLoader('imgtx_fast._C', sys.argv[1])\n"
            "spec = importlib.util.spec_from_loader('imgtx_fast._C', loader)\n"
            "m = importlib.util.module_from_spec(spec); loader.exec_module(m)\n"
            "assert 'torch' not in sys.modules; print(m.cpu_isa())")
    out = subprocess.run([sys.executable, "-c", code, _C.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("avx512", "avx2", "portable")


def test_info_command(tmp_path):
    # cwd away from a source checkout, whose imgtx_fast/ (no _C) would shadow the install
    out = subprocess.run([sys.executable, "-m", "imgtx_fast", "info"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for key in ("cpu path", "cuda compiled", "cuda archs", "cpu threads", "cuda driver", "cuda runtime",
                "cuda devices"):
        assert key in out.stdout
    assert _C.cpu_isa() in out.stdout
    assert ("yes" if _C.cuda_compiled() else "no") in out.stdout


def test_cpu_isa_switch_rejects_unknown():
    with pytest.raises(ValueError, match="unknown CPU path"):
        _C.set_cpu_isa("sse9")
