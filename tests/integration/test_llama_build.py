"""The llama.cpp that README's install builds runs on any x86-64 CPU with AVX2.

A native build on a CPU with AVX-512 holds AVX-512 code (``zmm`` registers), and one on a Xeon
with AMX holds AMX tile instructions, whose path segfaults in the first decode (llama.cpp issue
20824). The portable build of ``requirements.txt`` holds neither; this reads the installed
libraries' machine code to prove it, whatever CPU the tests run on.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)"),
]
BEYOND_AVX2 = ("%zmm", "ldtilecfg", "tileloadd", "tdpbssd", "tdpbf16ps")


def instructions_beyond_avx2(library: Path) -> set[str]:
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True, check=True).stdout
    return {marker for marker in BEYOND_AVX2 if marker in code}


def test_the_installed_llama_cpp_has_no_avx512_or_amx_code():
    import llama_cpp
    libraries = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml*.so"))
    assert libraries, "llama-cpp-python's libraries were not found"
    found = {lib.name: instructions_beyond_avx2(lib) for lib in libraries}
    assert not any(found.values()), (
        f"llama.cpp was built for this CPU only ({found}); rebuild it portably: "
        "python -m pip cache remove llama_cpp_python && "
        "python -m pip install --force-reinstall --no-deps -r requirements.txt")
    system_info = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in system_info and "AMX_INT8 = 1" not in system_info


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_check_finds_avx512_code_where_there_is_some(tmp_path):
    source = tmp_path / "scale.c"
    source.write_text("void scale(float *a) { for (int i = 0; i < 64; i++) a[i] *= 2; }\n")
    for flags, expected in ((["-mavx2"], set()), (["-mavx512f"], {"%zmm"})):
        subprocess.run(["gcc", "-O3", *flags, "-c", str(source), "-o", str(tmp_path / "s.o")],
                       check=True)
        assert instructions_beyond_avx2(tmp_path / "s.o") == expected
