"""The serving benchmark says whether llama-server runs the very llama.cpp libraries Tanglebox
calls (the same kernels), read from the process's memory map."""

from __future__ import annotations

import os
from pathlib import Path

from bench import servers
from bench.servers import llama_cpp_lib_dir, llama_server_libraries, mapped_llama_libraries


class _Running:
    """A started server, as far as the library check needs one: its process id."""

    def __init__(self, pid: int) -> None:
        self._pid = pid

    def pid(self) -> int:
        return self._pid


def test_a_process_on_llama_cpp_pythons_libraries_is_said_to_run_them():
    import llama_cpp  # noqa: F401 - loads libllama (and libggml) into this process

    mapped = mapped_llama_libraries(os.getpid())
    assert any(path.name.startswith("libllama.") for path in mapped)
    assert {path.parent for path in mapped} == {llama_cpp_lib_dir().resolve()}
    assert "runs llama-cpp-python's own libllama/libggml" in llama_server_libraries(
        _Running(os.getpid()))


def test_libraries_of_another_build_are_named_with_the_way_to_the_same_kernels(monkeypatch):
    monkeypatch.setattr(servers, "mapped_llama_libraries",
                        lambda pid: {Path("/opt/llama.cpp/build/bin/libggml-cpu.so")})
    line = llama_server_libraries(_Running(os.getpid()))
    assert "from /opt/llama.cpp/build/bin, not llama-cpp-python's" in line
    assert "--same-libs" in line


def test_a_statically_linked_llama_server_is_said_to_run_its_own_build(monkeypatch):
    monkeypatch.setattr(servers, "mapped_llama_libraries", lambda pid: set())
    assert "linked statically" in llama_server_libraries(_Running(os.getpid()))


def test_same_libs_puts_llama_cpp_pythons_lib_folder_first_on_the_library_path(monkeypatch,
                                                                                tmp_path):
    started = {}

    class _Recorded:
        def __init__(self, name, command, port, log_path, env=None) -> None:
            started.update(command=command, env=env)

    monkeypatch.setattr(servers, "ServerProcess", _Recorded)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/lib")
    servers.start_llama_server(Path("llama-server"), Path("model.gguf"), 4, 1024, 2, tmp_path,
                               same_libs=True)
    assert started["env"]["LD_LIBRARY_PATH"].split(os.pathsep) == [str(llama_cpp_lib_dir()),
                                                                    "/usr/local/lib"]
    servers.start_llama_server(Path("llama-server"), Path("model.gguf"), 4, 1024, 2, tmp_path)
    assert started["env"] is None  # its own build's libraries, as it was linked
