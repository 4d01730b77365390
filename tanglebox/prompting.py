"""Render a conversation into the prompt string a model expects: one function for all templates.

Named templates are data in ``conversation_templates.py``. ``auto`` renders the model's own
Jinja chat template in Jinja's immutable sandbox: chat templates come from model files, and an
unsandboxed one was remote code execution in llama-cpp-python (CVE-2024-34359).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

import conversation_templates

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


class TemplateError(Exception):
    """The model's chat template cannot render a conversation."""


@dataclass(frozen=True)
class Message:
    role: str  # USER or ASSISTANT
    content: str


@dataclass(frozen=True)
class ModelChatFormat:
    """What a backend knows about its model's own prompt format."""

    chat_template: str | None
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True)
class Prompt:
    text: str
    stop: tuple[str, ...]  # strings that end the reply, beside the model's end-of-turn tokens


def template_names() -> tuple[str, ...]:
    return conversation_templates.TEMPLATE_NAMES


def render_prompt(template_name: str, messages: list[Message], system_prompt: str,
                  model_format: ModelChatFormat) -> Prompt:
    """The prompt for ``messages`` (ending with the user's turn), ready for the reply."""
    if template_name == conversation_templates.AUTO:
        return Prompt(_render_model_template(messages, system_prompt, model_format), ())
    template = conversation_templates.TEMPLATES.get(template_name)
    if template is None:
        raise TemplateError(f"unknown conversation template \"{template_name}\"; "
                            f"choose one of {', '.join(template_names())}")
    return Prompt(_render_named_template(template, messages, system_prompt), tuple(template["stop"]))


def _render_named_template(template: dict, messages: list[Message], system_prompt: str) -> str:
    human, ai = template["roles"]
    few_shot = [Message(USER if role == "Human" else ASSISTANT, text)
                for role, text in template["few_shot"]]
    separators = (template["separator"], template["separator2"] or template["separator"])
    if template["separator_style"] == "single":
        separators = (template["separator"], template["separator"])
    text = (system_prompt or template["system"]) + separators[0]
    for message in few_shot + list(messages):
        role = human if message.role == USER else ai
        separator = separators[0] if message.role == USER else separators[1]
        text += f"{role}: {message.content}{separator}"
    return text + f"{ai}:"


def _render_model_template(messages: list[Message], system_prompt: str,
                           model_format: ModelChatFormat) -> str:
    if not model_format.chat_template:
        raise TemplateError("the model has no chat template of its own; set "
                            "\"conversationTemplate\" to one of "
                            f"{', '.join(conversation_templates.TEMPLATES)}")
    chat = [{"role": SYSTEM, "content": system_prompt}] if system_prompt else []
    chat += [{"role": m.role, "content": m.content} for m in messages]
    try:
        return _compile(model_format.chat_template).render(
            messages=chat, add_generation_prompt=True,
            bos_token=model_format.bos_token, eos_token=model_format.eos_token)
    except jinja2.TemplateError as err:
        raise TemplateError(f"the model's chat template failed: {err}") from None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"the model's chat template does not parse: {err}") from None
