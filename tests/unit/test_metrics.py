"""``/metrics`` through Flask's test client on the fake backend: what a scrape shows after
replies on each HTTP surface (in Prometheus' text format, read by prometheus_client's own
parser), who may scrape, and each model's load as ``model_statuses()`` says it."""

from __future__ import annotations

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from tanglebox.api_tokens import add_token
from tanglebox.metrics import surface_of_request
from tanglebox.served_models import ModelState, ModelStatus
from tanglebox.settings import SettingsError, load_settings
from tests.conftest import write_settings

MODEL = "fake-model.gguf"


def served(**values) -> dict:
    return {"modelName": f"models/{MODEL}", "temperature": 0, **values}


@pytest.fixture
def settings_values():
    return served()


def scrape(client, **kwargs) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (name, labels) → value."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.mimetype == "text/plain"
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def assert_counted_once(samples: dict, surfaces: tuple[str, ...], outcome: str,
                        status: str) -> None:
    """One reply with ``outcome`` and one HTTP request with ``status`` on each surface."""
    for surface in surfaces:
        assert value(samples, "tanglebox_replies_total", surface=surface, model=MODEL,
                     outcome=outcome) == 1
        assert value(samples, "tanglebox_http_requests_total", surface=surface, model=MODEL,
                     status=status) == 1


def test_a_rest_and_an_openai_reply_are_counted_by_surface_and_model(client):
    rest = client.get("/conversation?userPrompt=echo+Hello+there",
                      headers={"Accept": "application/json"}).get_json()
    openai = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "echo Paris"}]}).get_json()

    samples = scrape(client)
    assert_counted_once(samples, ("rest", "openai"), outcome="stop", status="200")
    assert value(samples, "tanglebox_prompt_tokens_total", surface="rest", model=MODEL) == \
        rest["usage"]["promptTokens"]
    assert value(samples, "tanglebox_completion_tokens_total", surface="rest", model=MODEL) == \
        rest["usage"]["completionTokens"]
    assert value(samples, "tanglebox_completion_tokens_total", surface="openai", model=MODEL) == \
        openai["usage"]["completion_tokens"]
    assert value(samples, "tanglebox_time_to_first_token_seconds_count", model=MODEL) == 2
    # "Hello there" and "Paris" come a token (a byte) at a time: a gap between each two.
    gaps = len("Hello there") - 1 + len("Paris") - 1
    assert value(samples, "tanglebox_inter_token_latency_seconds_count", model=MODEL) == gaps
    assert value(samples, "tanglebox_inter_token_latency_seconds_bucket", model=MODEL,
                 le="+Inf") == gaps


def test_a_prompt_refused_by_its_size_at_submit_is_counted_once(client):
    # The engine answers it inside submit, before the metrics' watcher is set.
    prompt = "x" * (4096 * 64 + 1)
    response = client.post("/conversation", json={"userPrompt": prompt})
    assert response.status_code == 400
    assert_counted_once(scrape(client), ("rest",), outcome="prompt_too_long", status="400")


@pytest.mark.parametrize("settings_values", [served(maintenanceMode=True)])
def test_a_refusal_is_counted_with_its_reason_and_status(client):
    assert client.get("/conversation?userPrompt=hi").status_code == 503
    assert client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).status_code == 503
    assert_counted_once(scrape(client), ("rest", "openai"), outcome="maintenance", status="503")


def test_each_models_load_and_state_come_from_model_statuses(app, client, monkeypatch):
    statuses = [
        ModelStatus(MODEL, "local", ModelState.READY, "", busy=1, waiting=2, capacity=4,
                    cached_prompt_tokens=120, upstream_errors=0),
        ModelStatus("big", "remote", ModelState.UNAVAILABLE, "connection refused", busy=0,
                    waiting=0, capacity=8, cached_prompt_tokens=0, upstream_errors=3),
    ]
    monkeypatch.setattr(app.extensions["tanglebox"], "model_statuses", lambda: statuses)
    samples = scrape(client)
    assert value(samples, "tanglebox_model_busy_slots", model=MODEL) == 1
    assert value(samples, "tanglebox_model_waiting_requests", model=MODEL) == 2
    assert value(samples, "tanglebox_model_slots", model="big") == 8
    assert value(samples, "tanglebox_model_cached_prompt_tokens_total", model=MODEL) == 120
    assert value(samples, "tanglebox_model_upstream_errors_total", model="big") == 3
    assert value(samples, "tanglebox_model_state", model="big", kind="remote",
                 state="unavailable") == 1
    assert value(samples, "tanglebox_model_state", model="big", kind="remote",
                 state="ready") == 0
    assert value(samples, "tanglebox_model_state", model=MODEL, kind="local", state="ready") == 1


def test_the_local_models_slots_are_read_from_the_engine(client):
    samples = scrape(client)
    assert value(samples, "tanglebox_model_slots", model=MODEL) == 2  # FakeBackend's sequences
    assert value(samples, "tanglebox_model_busy_slots", model=MODEL) == 0


# -- who may scrape --------------------------------------------------------------------------

@pytest.mark.parametrize("settings_values", [served(enableMetrics=False)])
def test_enable_metrics_false_serves_no_metrics(client):
    assert client.get("/metrics").status_code == 404


@pytest.mark.parametrize("settings_values", [served(isApiTokensRequired=True)])
def test_with_tokens_required_a_scrape_needs_a_token(client, tmp_path):
    token = add_token(tmp_path / "apiTokens.txt", "prometheus")
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scrape(client, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("settings_values", [
    served(isApiTokensRequired=True, metricsAllowedAddresses=["10.0.0.0/8"])])
def test_with_tokens_required_a_listed_address_needs_none(client, tmp_path):
    add_token(tmp_path / "apiTokens.txt", "prometheus")
    scrape(client, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.1"}).status_code == 401


@pytest.mark.parametrize("settings_values", [served(metricsAllowedAddresses=["127.0.0.1"])])
def test_without_tokens_a_list_keeps_other_addresses_out(client):
    scrape(client, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.1"}).status_code == 403


def test_without_tokens_or_a_list_anyone_may_scrape_as_health(client):
    scrape(client, environ_base={"REMOTE_ADDR": "192.0.2.1"})


def test_an_address_entry_that_is_no_address_is_one_settings_line(tmp_path):
    with pytest.raises(SettingsError, match="metricsAllowedAddresses"):
        load_settings(write_settings(tmp_path, metricsAllowedAddresses=["localhost"]))


# -- the surface of a request ----------------------------------------------------------------

@pytest.mark.parametrize("path, headers, surface", [
    ("/conversation", {}, "rest"),
    ("/v1/chat/completions", {}, "openai"),
    ("/ws/chat", {"Upgrade": "websocket"}, "ui"),
    ("/ws/chat?surface=widget", {"Upgrade": "websocket"}, "widget"),
    ("/widget", {}, "widget"),
    ("/", {"Upgrade": "websocket"}, "original"),
    ("/", {}, "ui"),
    ("/health", {}, "health"),
])
def test_the_surface_is_read_from_the_request(path, headers, surface):
    with Flask(__name__).test_request_context(path, headers=headers):
        assert surface_of_request() == surface
