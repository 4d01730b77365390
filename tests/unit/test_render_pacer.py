"""How often the UI re-renders a streaming reply: often for one, less for many or long ones."""

from __future__ import annotations

import pytest

from tanglebox.web.ui_socket import RENDER_CPU_SHARE, RENDER_INTERVAL_SECONDS, RenderPacer


def pacer_with(streaming: int) -> RenderPacer:
    pacer = RenderPacer()
    pacer.streaming = streaming
    return pacer


def test_one_short_reply_updates_at_the_normal_rate():
    assert pacer_with(1).interval_after(0.001) == RENDER_INTERVAL_SECONDS


def test_a_slow_render_spaces_the_updates_of_that_reply():
    assert pacer_with(1).interval_after(0.02) == pytest.approx(0.02 / RENDER_CPU_SHARE)


@pytest.mark.parametrize("streaming", [8, 32])
def test_many_replies_at_once_share_one_render_budget(streaming):
    render = 0.0015
    interval = pacer_with(streaming).interval_after(render)
    assert interval > RENDER_INTERVAL_SECONDS
    # every reply rendering once per interval uses RENDER_CPU_SHARE of a core, not more
    assert streaming * render / interval == pytest.approx(RENDER_CPU_SHARE)


def test_no_reply_streaming_counts_as_one():
    assert pacer_with(0).interval_after(0.02) == pacer_with(1).interval_after(0.02)
