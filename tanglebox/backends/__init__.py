"""Choose and load the backend. Heavy imports (llama_cpp, torch, transformers) happen here,
only for the backend in use, so the web layer imports without them."""

from __future__ import annotations

from tanglebox.backends.base import Backend, BackendError
from tanglebox.model_location import ModelLocation
from tanglebox.settings import Settings, SettingsError


def check_device(settings: Settings, location: ModelLocation) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    device, where = settings["device"], settings.path.name
    if location.backend == "transformers" and device in ("cuda", "mps"):
        from tanglebox.backends.transformers.plan import device_problem
        problem = device_problem(device)
        if problem:
            raise SettingsError(f"{where}: \"device\" is {device}, but {problem}")
    if location.backend == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SettingsError("the llama.cpp backend needs llama-cpp-python: "
                                "pip install -r requirements.txt") from None
        if device in ("cuda", "mps"):
            from tanglebox.backends.llama_cpp_backend import gpu_offload_supported
            if not gpu_offload_supported():
                raise SettingsError(f"{where}: \"device\" is {device}, but this llama-cpp-python "
                                    "was built without GPU support; reinstall it with "
                                    "CMAKE_ARGS=\"-DGGML_CUDA=on\" (README: llama.cpp on an "
                                    "NVIDIA GPU), or set \"device\" to cpu")


def load_backend(settings: Settings, location: ModelLocation) -> Backend:
    try:
        if location.backend == "llama.cpp":
            from tanglebox.backends.llama_cpp_backend import LlamaCppBackend
            return LlamaCppBackend.load(settings, location)
        from tanglebox.backends.transformers.backend import TransformersBackend
        return TransformersBackend.load(settings, location)
    except BackendError as err:
        raise SettingsError(str(err)) from None
