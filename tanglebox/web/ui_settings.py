"""The chat page's settings panel: this conversation's model, temperature, max new tokens and
system prompt.

The panel is a form (``templates/_settings.html``) that htmx sends over the UI socket as
``{"action": "settings", "model": …, "temperature": …, "maxNewTokens": …,
"systemPrompt": …}``.
:func:`read_settings_form` checks every field once, with the rules every surface shares
(``chat_request.py``) and the model against the served ids (``runtime.model_ids()``): all
valid, a new :class:`ChatSettings` that the socket applies from the next reply on; else the
errors by field, and nothing changes.

The model picker lists every served model with its state (``runtime.model_statuses()``): the
conversation's choice selected (the default model when it has none), a model that is not ready
shown with its state and disabled. With one model served there is nothing to choose and no
picker. The widget has no panel: its model is the ``widgetModel`` setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tanglebox.chat_request import (
    RequestError,
    parse_max_new_tokens,
    parse_system_prompt,
    parse_temperature,
)
from tanglebox.runtime import Runtime
from tanglebox.served_models import ModelState
from tanglebox.web.ui_conversation import ChatSettings

FORM_FIELDS = ("model", "temperature", "maxNewTokens", "systemPrompt")


@dataclass(frozen=True)
class ModelOption:
    """One entry of the model picker."""

    id: str
    state: ModelState
    default: bool
    selected: bool

    @property
    def disabled(self) -> bool:
        # The chosen model stays selectable even when it is down: a disabled option is left
        # out of the form, and applying the other fields would then switch models silently.
        return self.state != ModelState.READY and not self.selected

    @property
    def label(self) -> str:
        notes = (["default"] if self.default else []) + (
            [self.state.value] if self.state != ModelState.READY else [])
        return f"{self.id} ({', '.join(notes)})" if notes else self.id


def model_options(runtime: Runtime, chosen: str) -> list[ModelOption]:
    """The picker's options, in ``model_ids()`` order; ``chosen`` empty: the default model."""
    selected = chosen or runtime.default_model_id
    return [ModelOption(status.id, status.state, status.id == runtime.default_model_id,
                        status.id == selected) for status in runtime.model_statuses()]


def shown_model(runtime: Runtime, chosen: str) -> tuple[str, str]:
    """The model's name and where it runs, as the page shows them: the local backend's name and
    device for the default model, else the chosen id and its kind ("remote")."""
    if not chosen or chosen == runtime.default_model_id:
        return runtime.model_name, runtime.device
    kinds = {status.id: status.kind for status in runtime.model_statuses()}
    return chosen, kinds.get(chosen, "")


def settings_form_values(settings: ChatSettings) -> dict[str, str]:
    """The settings as the form shows them (the original parameter names)."""
    return {"model": settings.model,
            "temperature": f"{settings.temperature:g}",
            "maxNewTokens": str(settings.max_new_tokens),
            "systemPrompt": settings.system_prompt}


def parse_model(value: Any, served: list[str]) -> str:
    """A served model's id, or "" (nothing chosen: the default model)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or value not in served:
        raise RequestError("model", f"must be one of the models served here: "
                                    f"{', '.join(served)}")
    return value


def field_error(err: RequestError) -> str:
    """``"temperature: must be …"`` as a sentence for a person: ``"Must be …."``."""
    text = str(err).split(": ", 1)[-1]
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def read_settings_form(runtime: Runtime, message: dict[str, Any]
                       ) -> tuple[ChatSettings | None, dict[str, str], dict[str, str]]:
    """The form's settings, or None with the values as sent (for the form) and the errors by
    field."""
    form = {key: message.get(key, "") for key in FORM_FIELDS}
    limit = runtime.settings["maxNewTokensLimit"]
    served = runtime.model_ids()
    parsers = {"model": lambda value: parse_model(value, served),
               "temperature": parse_temperature,
               "maxNewTokens": lambda value: parse_max_new_tokens(value, limit),
               "systemPrompt": parse_system_prompt}
    parsed: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, parse in parsers.items():
        try:
            parsed[key] = parse(form[key])
        except RequestError as err:
            errors[key] = field_error(err)
    if errors:
        shown = {key: value if isinstance(value, str) else json.dumps(value)
                 for key, value in form.items()}
        return None, shown, errors
    return ChatSettings(parsed["temperature"], parsed["maxNewTokens"], parsed["systemPrompt"],
                        parsed["model"]), {}, {}
