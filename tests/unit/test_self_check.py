"""The start-up self-check reads how its child process ended: a native crash becomes one line
that names the cause and the fix (the child itself is run for real in
tests/integration/test_native_crashes.py)."""

from __future__ import annotations

import pytest

from tanglebox.self_check import REBUILD_COMMAND, interpret
from tanglebox.settings import SettingsError

PORTABLE = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
NATIVE_AMX = PORTABLE + "AVX512 = 1 | AMX_INT8 = 1 | "


def test_a_clean_child_returns_its_report():
    stdout = f"system_info: {PORTABLE}\nself-check: m.gguf generated 4 tokens in 0.3 s\n"
    assert interpret(0, stdout, "") == "self-check: m.gguf generated 4 tokens in 0.3 s"


def test_a_segfault_in_an_amx_build_names_amx_and_the_rebuild_command():
    with pytest.raises(SettingsError) as err:
        interpret(-11, f"system_info: {NATIVE_AMX}\n", "")
    line = str(err.value)
    assert line.startswith("llama.cpp crashed in its first decode (SIGSEGV, signal 11)")
    assert "AMX" in line and "-march=native" in line
    assert REBUILD_COMMAND in line and "\n" not in line


def test_a_segfault_in_a_portable_build_does_not_blame_amx():
    with pytest.raises(SettingsError) as err:
        interpret(-11, f"system_info: {PORTABLE}\n", "")
    assert "AMX" not in str(err.value) and REBUILD_COMMAND in str(err.value)


def test_an_illegal_instruction_says_the_build_is_for_another_cpu():
    with pytest.raises(SettingsError) as err:
        interpret(-4, f"system_info: {PORTABLE}\n", "")
    assert "(SIGILL, signal 4)" in str(err.value)
    assert "instructions this one lacks" in str(err.value)


def test_an_ordinary_failure_in_the_child_is_its_own_one_line_error():
    with pytest.raises(SettingsError) as err:
        interpret(2, "", "some warning\ntanglebox: error: llama.cpp could not load m.gguf\n")
    assert str(err.value) == "llama.cpp could not load m.gguf"


def test_any_other_exit_status_is_reported_with_the_last_line():
    with pytest.raises(SettingsError) as err:
        interpret(1, "", "Traceback (most recent call last):\nMemoryError\n")
    assert str(err.value) == "the start-up self-check failed (exit status 1): MemoryError"
