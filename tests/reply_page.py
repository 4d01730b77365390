"""A reply as the chat page holds it, built from the UI socket's fragments the way htmx's ws
extension swaps them in (ui_socket's docstring): outerHTML by id, ``beforebegin``/``beforeend``
into a selector, ``delete``. The article is kept as HTML text, so a test can compare what the
page shows after streaming with the one-shot render a reconnect gets.

Only the swaps the UI socket sends for one reply are known; any other fragment is ignored.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

TAG = re.compile(r"<(/?)([a-z][a-z0-9]*)\b[^>]*>")
OOB = re.compile(r'\s?hx-swap-oob="[^"]*"')


def element_end(html: str, start: int) -> int:
    """The end of the element whose start tag is at ``start`` (escaped text holds no tags)."""
    name = TAG.match(html, start).group(2)
    depth = 0
    for tag in TAG.finditer(html, start):
        if tag.group(2) != name:
            continue
        depth += -1 if tag.group(1) else 1
        if depth == 0:
            return tag.end()
    raise ValueError(f"<{name}> at {start} is not closed")


def top_level(message: str) -> list[tuple[str, str]]:
    """Each top-level element of a message: its hx-swap-oob value and its outer HTML."""
    elements, position = [], 0
    while (tag := TAG.search(message, position)) is not None:
        end = element_end(message, tag.start())
        oob = re.search(r'hx-swap-oob="([^"]*)"', tag.group(0))
        elements.append((oob.group(1) if oob else "", message[tag.start():end]))
        position = end
    return elements


def inner(outer: str) -> str:
    return outer[outer.index(">") + 1:outer.rindex("<")]


class ReplyPage:
    """``article#turn-N-reply`` on the page, swapped as the fragments arrive."""

    def __init__(self, turn: int = 1) -> None:
        self.id = f"turn-{turn}-reply"
        self.html = ""  # the article's outer HTML; "" until a fragment brings it

    def apply_all(self, messages: list[str]) -> "ReplyPage":
        for message in messages:
            self.apply(message)
        return self

    def apply(self, message: str) -> None:
        for oob, outer in top_level(message):
            if oob == "true" and f'id="{self.id}"' in outer[:outer.index(">")]:
                self.html = OOB.sub("", outer, count=1)
            elif oob in ("beforeend:#messages", "true") and f'<article id="{self.id}"' in outer:
                # the turn's first fragment; or #messages, section#turn-N holding it whole
                start = outer.index(f'<article id="{self.id}"')
                self.html = outer[start:element_end(outer, start)]
            elif oob == "true" and f'id="{self.id}-open"' in outer[:outer.index(">")]:
                self._replace(self._span(f'<div id="{self.id}-open"'), OOB.sub("", outer, 1))
            elif oob == f"beforebegin:#{self.id}-open":
                start = self.html.index(f'<div id="{self.id}-open"')
                self._replace((start, start), inner(outer))
            elif oob == f"beforebegin:#{self.id}-open-line":
                start = self.html.index(f'<span id="{self.id}-open-line"')
                self._replace((start, start), inner(outer))
            elif oob == "true" and f'id="{self.id}-open-line"' in outer[:outer.index(">")]:
                self._replace(self._span(f'<span id="{self.id}-open-line"'),
                              OOB.sub("", outer, 1))
            elif oob == "delete" and f'id="{self.id}-open"' in outer:
                self._replace(self._span(f'<div id="{self.id}-open"'), "")
            elif oob == f"beforeend:#{self.id} .message__body":
                end = self._span('<div class="message__body">')[1] - len("</div>")
                self._replace((end, end), inner(outer))

    @property
    def streaming(self) -> bool:
        return f'id="{self.id}-open"' in self.html

    def text(self) -> str:
        """The reply's text as a reader sees it (``.message__content``), stripped."""
        start = self.html.index('<div class="message__content')
        parser = _Text()
        parser.feed(self.html[start:element_end(self.html, start)])
        return "".join(parser.parts).strip()

    def _span(self, start_tag: str) -> tuple[int, int]:
        start = self.html.index(start_tag)
        return start, element_end(self.html, start)

    def _replace(self, span: tuple[int, int], html: str) -> None:
        self.html = self.html[:span[0]] + html + self.html[span[1]:]


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)
