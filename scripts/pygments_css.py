"""Writes the code-highlighting stylesheets, ``static/pygments-light.css`` and
``static/pygments-dark.css``, from Pygments' styles (``tanglebox.code_highlight.THEMES``).

Run it from the repository root after changing a theme or upgrading Pygments:
``python -m scripts.pygments_css``.
tests/unit/test_code_highlight.py fails while the committed files differ from its output.
"""

from __future__ import annotations

from pathlib import Path

from tanglebox.code_highlight import THEMES, stylesheet

STATIC = Path(__file__).resolve().parent.parent / "static"


def stylesheet_path(theme: str) -> Path:
    """Where the stylesheet of ``theme`` is committed."""
    return STATIC / f"pygments-{theme}.css"


def main() -> None:
    for theme in THEMES:
        stylesheet_path(theme).write_text(stylesheet(theme), encoding="utf-8")
        print(stylesheet_path(theme))


if __name__ == "__main__":
    main()
