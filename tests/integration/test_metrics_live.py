"""``/metrics`` on a live server (gunicorn + gevent, the fake backend): replies over the two
sockets are counted under their surface, and each socket's request once it has closed."""

from __future__ import annotations

from contextlib import closing

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_original_socket import ask, connect
from tests.integration.test_ui_socket import ChatClient, shown_text
from tests.live_server import wait_until

MODEL = "SmolLM2-135M-Instruct"  # the default modelName's id (the fake backend serves it)


def scrape(server) -> dict[tuple[str, frozenset], float]:
    response = requests.get(server.url + "/metrics", timeout=15)
    assert response.status_code == 200
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def test_socket_replies_are_counted_under_their_surface(fake_server):
    server = fake_server.start(fake={}, temperature=0)
    with closing(connect(server)) as ws:
        assert "".join(ask(ws, "echo Paris")[1:-1]) == "Paris"  # between #a-c-k# and #f-i-n#
    for surface in ("page", "widget"):
        chat = ChatClient(server, surface=surface)
        assert shown_text(chat.ask("echo Paris")) == "Paris"
        chat.close()

    def sockets_closed(samples) -> bool:
        return all(samples.get(("tanglebox_http_requests_total", frozenset(
            {"surface": surface, "model": MODEL, "status": "101"}.items()))) == 1
            for surface in ("original", "ui", "widget"))
    samples = wait_until(lambda: sockets_closed(s := scrape(server)) and s,
                         what="the three sockets counted as closed")
    for surface in ("original", "ui", "widget"):
        labels = {"surface": surface, "model": MODEL}
        assert samples[("tanglebox_replies_total",
                        frozenset({**labels, "outcome": "stop"}.items()))] == 1
        assert samples[("tanglebox_completion_tokens_total",
                        frozenset(labels.items()))] == len("Paris")
