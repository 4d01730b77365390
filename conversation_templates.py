"""Conversation templates: how a conversation becomes one prompt string for a model.

Data only; ``tanglebox.prompting.render_prompt`` renders every template. API users send
``Human``/``AI`` roles and never see these formats.

Each named template has:
- ``system``: the default system prompt (a request's ``systemPrompt`` replaces it);
- ``roles``: what the human and the AI are called in the prompt;
- ``separator_style``: ``single`` (every message ends with ``separator``) or ``two`` (human
  messages end with ``separator``, AI messages with ``separator2``);
- ``few_shot``: example messages placed between the system prompt and the conversation;
- ``stop``: strings that end the reply (never shown to the user);
- ``output_separator``: what replaces a stop string when the reply is kept in the history
  (Vicuna 1.1 emits a space where its ``</s>`` stop was).

``auto`` is different: it renders the model's own Jinja chat template (GGUF metadata
``tokenizer.chat_template`` or ``tokenizer_config.json``) and stops at the model's end-of-turn
tokens.

The original's troubleshooting note still holds: with the wrong template the stop string never
matches and the model rambles on. Vicuna v1.1 ends turns with ``</s>``; Vicuna v0 with ``###``.
"""

AUTO = "auto"

_VICUNA0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VICUNA11_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_CODE_HELPER_SYSTEM = (
    "A chat between a programmer and an expert coding assistant. The assistant answers "
    "every request with one fenced Markdown code block and nothing else."
)
_CODE_HELPER_FEW_SHOT = (
    ("Human", "Write a Python function that returns the square of a number."),
    ("AI", "```python\ndef square(x):\n    return x * x\n```"),
    ("Human", "Print hello world in JavaScript."),
    ("AI", "```javascript\nconsole.log(\"hello world\");\n```"),
)

TEMPLATES = {
    "vicuna0": {
        "system": _VICUNA0_SYSTEM,
        "roles": ("Human", "Assistant"),
        "separator_style": "single",
        "separator": "###",
        "separator2": None,
        "few_shot": (),
        "stop": ("###",),
        "output_separator": "",
    },
    "vicuna1.1": {
        "system": _VICUNA11_SYSTEM,
        "roles": ("USER", "ASSISTANT"),
        "separator_style": "two",
        "separator": " ",
        "separator2": "</s>",
        "few_shot": (),
        "stop": ("</s>",),
        "output_separator": " ",
    },
    "vicky": {
        "system": (
            "You are Vicky, a friendly and knowledgeable assistant. You answer clearly and "
            "honestly, you say so when you do not know, and you keep answers short unless "
            "asked for detail."
        ),
        "roles": ("USER", "ASSISTANT"),
        "separator_style": "two",
        "separator": " ",
        "separator2": "</s>",
        "few_shot": (),
        "stop": ("</s>",),
        "output_separator": " ",
    },
    "codeHelper": {
        "system": _CODE_HELPER_SYSTEM,
        "roles": ("Human", "Assistant"),
        "separator_style": "single",
        "separator": "###",
        "separator2": None,
        "few_shot": _CODE_HELPER_FEW_SHOT,
        "stop": ("###",),
        "output_separator": "",
    },
    "codeHelperVicuna1.1": {
        "system": _CODE_HELPER_SYSTEM,
        "roles": ("USER", "ASSISTANT"),
        "separator_style": "two",
        "separator": " ",
        "separator2": "</s>",
        "few_shot": _CODE_HELPER_FEW_SHOT,
        "stop": ("</s>",),
        "output_separator": " ",
    },
}

TEMPLATE_NAMES = (AUTO, *TEMPLATES)
