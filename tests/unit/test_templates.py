"""Golden prompts: each template renders a known conversation to exactly the expected text."""

from __future__ import annotations

import pytest

import conversation_templates
from tanglebox.prompting import (ASSISTANT, USER, Message, ModelChatFormat, TemplateError,
                                 render_prompt)
from tests.fake_backend import CHAT_TEMPLATE

CONVERSATION = [Message(USER, "Hi"), Message(ASSISTANT, "Hello!"), Message(USER, "2+2?")]
NO_MODEL_TEMPLATE = ModelChatFormat(None)

VICUNA0 = conversation_templates.TEMPLATES["vicuna0"]["system"]
VICUNA11 = conversation_templates.TEMPLATES["vicuna1.1"]["system"]
VICKY = conversation_templates.TEMPLATES["vicky"]["system"]
CODE = conversation_templates.TEMPLATES["codeHelper"]["system"]
FEW_SHOT_SINGLE = ("Human: Write a Python function that returns the square of a number.###"
                   "Assistant: ```python\ndef square(x):\n    return x * x\n```###"
                   "Human: Print hello world in JavaScript.###"
                   "Assistant: ```javascript\nconsole.log(\"hello world\");\n```###")
FEW_SHOT_TWO = ("USER: Write a Python function that returns the square of a number. "
                "ASSISTANT: ```python\ndef square(x):\n    return x * x\n```</s>"
                "USER: Print hello world in JavaScript. "
                "ASSISTANT: ```javascript\nconsole.log(\"hello world\");\n```</s>")

GOLDEN = {
    "vicuna0": (VICUNA0 + "###Human: Hi###Assistant: Hello!###Human: 2+2?###Assistant:",
                ("###",)),
    "vicuna1.1": (VICUNA11 + " USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:",
                  ("</s>",)),
    "vicky": (VICKY + " USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:", ("</s>",)),
    "codeHelper": (CODE + "###" + FEW_SHOT_SINGLE
                   + "Human: Hi###Assistant: Hello!###Human: 2+2?###Assistant:", ("###",)),
    "codeHelperVicuna1.1": (CODE + " " + FEW_SHOT_TWO
                            + "USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:", ("</s>",)),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_named_template_renders_the_golden_prompt(name):
    prompt = render_prompt(name, CONVERSATION, "", NO_MODEL_TEMPLATE)
    assert (prompt.text, prompt.stop) == GOLDEN[name]


def test_every_original_template_has_a_golden_prompt():
    assert set(GOLDEN) == set(conversation_templates.TEMPLATES)


def test_a_system_prompt_replaces_the_templates_own():
    prompt = render_prompt("vicuna1.1", [Message(USER, "Hi")], "Be brief.", NO_MODEL_TEMPLATE)
    assert prompt.text == "Be brief. USER: Hi ASSISTANT:"


def test_auto_renders_the_models_own_template():
    model = ModelChatFormat(CHAT_TEMPLATE, "", "<|end|>")
    prompt = render_prompt("auto", CONVERSATION, "Be brief.", model)
    assert prompt.text == ("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!"
                           "<|end|><|user|>2+2?<|end|><|assistant|>")
    assert prompt.stop == ()


def test_auto_renders_chatml_like_smollm2():
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
              "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    prompt = render_prompt("auto", [Message(USER, "Hi")], "", ModelChatFormat(chatml))
    assert prompt.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_auto_without_a_model_template_says_what_to_set():
    with pytest.raises(TemplateError, match="conversationTemplate"):
        render_prompt("auto", [Message(USER, "Hi")], "", NO_MODEL_TEMPLATE)


def test_unknown_template_names_the_choices():
    with pytest.raises(TemplateError, match="vicuna0"):
        render_prompt("alpaca", [Message(USER, "Hi")], "", NO_MODEL_TEMPLATE)


def test_model_templates_run_in_a_sandbox():
    # CVE-2024-34359: a chat template from a model file must not reach Python internals.
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        render_prompt("auto", [Message(USER, "Hi")], "", ModelChatFormat(evil))


def test_a_template_may_raise_its_own_error():
    strict = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(TemplateError, match="alternate"):
        render_prompt("auto", [Message(USER, "Hi")], "", ModelChatFormat(strict))
