"""The chat page and the widget through Flask's test client: headers, framing, what they load."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ["https://docs.example.com", "http://127.0.0.1:8765"]


def csp(response) -> dict[str, str]:
    directives = response.headers["Content-Security-Policy"].split(";")
    return {d.split()[0]: d.strip().split(" ", 1)[1] for d in directives if d.strip()}


def socket_url(html: str) -> str:
    return re.search(r'ws-connect="([^"]+)"', html).group(1).replace("&amp;", "&")


@pytest.mark.parametrize("path", ["/", "/widget"])
def test_pages_send_a_strict_csp_and_nosniff(client, path):
    response = client.get(path)
    assert response.status_code == 200
    policy = csp(response)
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["img-src"] == "'self' data:"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_chat_page_may_not_be_framed(client):
    response = client.get("/")
    assert csp(response)["frame-ancestors"] == "'none'"
    assert response.headers["X-Frame-Options"] == "DENY"


def test_the_widget_may_not_be_framed_by_default(client):
    response = client.get("/widget")
    assert csp(response)["frame-ancestors"] == "'none'"
    assert response.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("settings_values", [{"widgetAllowedOrigins": ALLOWED}])
def test_the_widget_may_be_framed_by_exactly_the_allowed_origins(client):
    response = client.get("/widget")
    assert csp(response)["frame-ancestors"] == " ".join(ALLOWED)
    assert "X-Frame-Options" not in response.headers  # it would forbid what the CSP allows
    assert csp(client.get("/"))["frame-ancestors"] == "'none'"  # the page stays closed


def test_the_page_shows_model_and_device_and_connects_its_own_conversation(client):
    first, second = client.get("/").text, client.get("/").text
    assert "fake-model" in first and ">cpu<" in first
    url = urlsplit(socket_url(first))
    assert url.path == "/ws/chat" and parse_qs(url.query)["surface"] == ["page"]
    assert parse_qs(url.query)["conversation"] != parse_qs(urlsplit(socket_url(second)).query)[
        "conversation"]


@pytest.mark.parametrize("settings_values", [{"widgetTitle": "Ask <Docs>",
                                              "widgetSystemPrompt": "secret instructions"}])
def test_the_widget_shows_its_title_and_never_its_system_prompt(client):
    html = client.get("/widget").text
    assert "Ask &lt;Docs&gt;" in html and "secret instructions" not in html
    assert parse_qs(urlsplit(socket_url(html)).query)["surface"] == ["widget"]
    assert 'id="settings-form"' not in html


def test_the_widget_never_takes_a_prompt_from_its_url(client):
    html = client.get("/widget?userPrompt=from-the-link&q=from-the-link&prompt=from-the-link").text
    assert "from-the-link" not in html


@pytest.mark.parametrize("settings_values", [{"maintenanceMode": True,
                                              "maintenanceMessage": "Back at 5 pm."}])
@pytest.mark.parametrize("path", ["/", "/widget"])
def test_maintenance_mode_shows_a_notice(client, path):
    assert 'class="notice"' in client.get(path).text
    assert "Back at 5 pm." in client.get(path).text


@pytest.mark.parametrize("path", ["/", "/widget"])
def test_pages_load_only_local_scripts_and_nothing_inline(client, path):
    html = client.get(path).text
    scripts = re.findall(r"<script\b([^>]*)>", html)
    assert scripts and all(re.search(r'src="/static/', attrs) for attrs in scripts)
    assert "/static/vendor/htmx-2.0." in html and "/static/vendor/htmx-ext-ws-2.0." in html
    assert not re.search(r"\sstyle=", html) and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)
    assert '"allowEval":false' in html and '"includeIndicatorStyles":false' in html


@pytest.mark.parametrize("name", ["vendor/htmx-2.0.11.min.js", "vendor/htmx-ext-ws-2.0.4.js",
                                  "app.js", "app.css"])
def test_static_files_are_served_from_this_server(client, name):
    response = client.get(f"/static/{name}")
    assert response.status_code == 200 and len(response.data) > 1000
    response.close()


def test_templates_mark_nothing_safe_by_hand():
    # Only render_markdown() produces markup from untrusted text (it returns Markup).
    for template in (ROOT / "templates").glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, template
