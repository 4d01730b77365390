"""The chat UI's history through Flask's test client, on a real SQLite database: whose a
conversation is (another browser's is a 404 everywhere, never listed), the page at ``/c/<id>``,
search, rename, delete and undo, export, import, and the token rule.

Conversations are written with the store's own API (as the UI socket writes them), and read
back through the routes a browser uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets

import pytest
import requests

from tanglebox.api_tokens import add_token
from tanglebox.conversation_store import conversation_store
from tanglebox.web.browser_identity import PAGE_COOKIE, WIDGET_COOKIE
from tests.live_server import wait_until

SITE = "https://shop.example"
OTHER_SITE = "https://blog.example"


@pytest.fixture
def settings_values():
    return {"widgetAllowedOrigins": [SITE, OTHER_SITE]}


class Browser:
    """A test client with its own identity cookie, and the owner id the store knows it by."""

    def __init__(self, app, cookie: str = PAGE_COOKIE) -> None:
        self.client = app.test_client()
        self.value = secrets.token_urlsafe(32)
        self.client.set_cookie(cookie, self.value)
        self.owner = hashlib.sha256(self.value.encode()).hexdigest()

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture
def alice(app):
    return Browser(app)


@pytest.fixture
def bob(app):
    return Browser(app)


def stored(app, browser: Browser, prompt: str, reply: str, surface: str = "page",
           site: str = "") -> str:
    """A conversation of ``browser`` with one exchange; its id."""
    store = conversation_store(app)
    conversation = store.create(browser.owner, surface, site, {})
    question = store.add_message(conversation.id, None, "user", prompt)
    store.add_message(conversation.id, question.id, "assistant", reply, model="fake-model")
    return conversation.id


def listed(browser: Browser, query: str = "") -> list[str]:
    """The titles in the sidebar's list."""
    html = browser.get("/history", query_string={"q": query}).text
    return re.findall(r'class="history__link" href="/c/[^"]+"[^>]*>([^<]*)</a>', html)


def test_the_page_of_a_stored_conversation_shows_its_messages_and_connects_to_it(app, alice):
    conversation_id = stored(app, alice, "What is a tangle?", "A knot of **threads**.")
    response = alice.get(f"/c/{conversation_id}")
    assert response.status_code == 200
    assert "What is a tangle?" in response.text
    assert "A knot of <strong>threads</strong>." in response.text
    assert f"conversation={conversation_id}" in response.text  # its socket URL names it
    assert f'href="/c/{conversation_id}" aria-current="page"' in response.text  # the sidebar


def test_another_browsers_conversation_is_a_404_everywhere_and_never_listed(app, alice, bob):
    conversation_id = stored(app, alice, "my secret plan", "keep it quiet")
    page = bob.get(f"/c/{conversation_id}")
    assert page.status_code == 404
    assert "This conversation is not here" in page.text and 'href="/"' in page.text
    assert "secret" not in page.text
    assert listed(bob) == [] and listed(bob, "secret") == []
    for fmt in ("md", "json", "html"):
        assert bob.get(f"/c/{conversation_id}/export?format={fmt}").status_code == 404
    assert bob.post(f"/c/{conversation_id}/rename", data={"title": "mine"}).status_code == 404
    assert bob.post(f"/c/{conversation_id}/delete").status_code == 404
    assert bob.post(f"/c/{conversation_id}/restore").status_code == 404
    # Nothing bob did changed alice's conversation.
    assert listed(alice) == ["my secret plan"]
    assert alice.get(f"/c/{conversation_id}").status_code == 200


def test_an_unknown_id_and_a_malformed_one_are_the_same_404(alice):
    for path in ("/c/" + "A" * 22, "/c/" + "a" * 65, "/c/bad!id", "/c/x"):
        response = alice.get(path)
        assert response.status_code == 404 and "Start a new chat" in response.text


def test_the_widgets_conversations_stay_out_of_the_pages_list(app, alice):
    stored(app, alice, "asked on the page", "ok")
    widget_id = stored(app, alice, "asked in the widget", "ok", surface="widget", site=SITE)
    assert listed(alice) == ["asked on the page"]
    assert alice.get(f"/c/{widget_id}").status_code == 404


def test_the_list_is_newest_first_and_search_finds_titles_and_text(app, alice):
    stored(app, alice, "Bake sourdough bread", "Start with a levain.")
    stored(app, alice, "Plan a trip to Lisbon", "Take the tram 28.")
    stored(app, alice, "Fix 100% of the bugs", "Write tests first.")
    assert listed(alice) == ["Fix 100% of the bugs", "Plan a trip to Lisbon",
                             "Bake sourdough bread"]
    assert listed(alice, "lisbon") == ["Plan a trip to Lisbon"]  # the title, any case
    assert listed(alice, "LEVAIN") == ["Bake sourdough bread"]  # a reply's text
    assert listed(alice, "100%") == ["Fix 100% of the bugs"]  # % is a character, not a pattern
    assert listed(alice, "%") == ["Fix 100% of the bugs"]
    response = alice.get("/history", query_string={"q": "nothing like it"})
    assert "No conversation matches “nothing like it”." in response.text


def test_the_search_field_asks_as_the_person_types(alice):
    html = alice.get("/").text
    field = re.search(r'<input id="history-search"[^>]*>', html).group(0)
    assert 'hx-get="/history"' in field and "input changed delay:300ms" in field


def test_rename_answers_the_renamed_row_and_refuses_an_empty_title(app, alice):
    conversation_id = stored(app, alice, "first words", "reply")
    response = alice.post(f"/c/{conversation_id}/rename", data={"title": "  Trip   notes "})
    assert response.status_code == 200
    assert f'href="/c/{conversation_id}"' in response.text and ">Trip notes</a>" in response.text
    assert listed(alice) == ["Trip notes"]
    bad = alice.post(f"/c/{conversation_id}/rename", data={"title": "   "})
    assert bad.status_code == 400 and bad.text.startswith("title:")
    too_long = alice.post(f"/c/{conversation_id}/rename", data={"title": "x" * 201})
    assert too_long.status_code == 400 and "title:" in too_long.text
    assert listed(alice) == ["Trip notes"]


def test_state_changing_routes_are_post_only(app, alice):
    conversation_id = stored(app, alice, "hello", "hi")
    for action in ("rename", "delete", "restore"):
        assert alice.get(f"/c/{conversation_id}/{action}").status_code == 405
    assert alice.get("/import").status_code == 405


def test_a_post_from_another_origin_is_refused(app, alice):
    conversation_id = stored(app, alice, "hello", "hi")
    response = alice.post(f"/c/{conversation_id}/delete",
                          headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert listed(alice) == ["hello"]


def test_delete_hides_the_conversation_at_once_and_undo_brings_it_back(app, alice):
    conversation_id = stored(app, alice, "to be deleted", "reply")
    response = alice.post(f"/c/{conversation_id}/delete")
    assert response.status_code == 200
    assert "Deleted “to be deleted”" in response.text and "Undo" in response.text
    assert listed(alice) == []
    assert alice.get(f"/c/{conversation_id}").status_code == 404
    assert alice.get(f"/c/{conversation_id}/export?format=md").status_code == 404
    undo = alice.post(f"/c/{conversation_id}/restore")
    assert undo.status_code == 200 and ">to be deleted</a>" in undo.text
    assert listed(alice) == ["to be deleted"]
    assert "to be deleted" in alice.get(f"/c/{conversation_id}").text


def test_export_as_markdown_json_and_html_downloads(app, alice):
    conversation_id = stored(app, alice, "What is 2 + 2?", "It is **4**.")
    markdown = alice.get(f"/c/{conversation_id}/export?format=md")
    assert markdown.status_code == 200 and markdown.mimetype == "text/markdown"
    assert markdown.headers["Content-Disposition"] == (
        "attachment; filename=\"what-is-2-2.md\"; filename*=UTF-8''what-is-2-2.md")
    assert "What is 2 + 2?" in markdown.text and "It is **4**." in markdown.text

    document = alice.get(f"/c/{conversation_id}/export?format=json")
    assert document.mimetype == "application/json"
    assert document.headers["Content-Disposition"].endswith("what-is-2-2.json")
    body = json.loads(document.text)
    assert body["messages"][-2:] == [{"role": "user", "content": "What is 2 + 2?"},
                                     {"role": "assistant", "content": "It is **4**."}]
    assert body["tanglebox"]["messages"][-1]["model"] == "fake-model"

    page = alice.get(f"/c/{conversation_id}/export?format=html")
    assert page.mimetype == "text/html"
    assert page.headers["Content-Disposition"].endswith("what-is-2-2.html")
    assert "<strong>4</strong>" in page.text and "<script" not in page.text

    alice.post(f"/c/{conversation_id}/rename", data={"title": "Café 東京 ../../etc/passwd"})
    renamed = alice.get(f"/c/{conversation_id}/export?format=md")
    assert renamed.headers["Content-Disposition"] == (
        'attachment; filename="caf-etc-passwd.md"; '
        "filename*=UTF-8''caf%C3%A9-%E6%9D%B1%E4%BA%AC-etc-passwd.md")

    bad = alice.get(f"/c/{conversation_id}/export?format=pdf")
    assert bad.status_code == 400 and bad.text.startswith("format:")


def test_import_of_an_export_makes_a_new_conversation_and_opens_it(app, alice, bob):
    conversation_id = stored(app, alice, "Name three rivers", "Rhine, Danube, Loire.")
    exported = alice.get(f"/c/{conversation_id}/export?format=json").data
    response = bob.post("/import", data={"file": (_file(exported), "rivers.json")},
                        content_type="multipart/form-data")
    assert response.status_code == 303
    new_path = response.headers["Location"]
    assert re.fullmatch(r"/c/[A-Za-z0-9_-]{16,64}", new_path)
    assert new_path != f"/c/{conversation_id}"
    page = bob.get(new_path)
    assert page.status_code == 200
    assert "Name three rivers" in page.text and "Rhine, Danube, Loire." in page.text
    assert listed(bob) == ["Name three rivers"]
    assert alice.get(new_path).status_code == 404  # the copy is bob's alone
    assert json.loads(bob.get(new_path + "/export?format=json").text)["messages"][-2:] == \
        json.loads(exported)["messages"][-2:]


@pytest.mark.parametrize("settings_values", [{"maxNewTokensLimit": 300, "maxNewTokens": 256}])
def test_an_import_keeps_to_this_servers_max_new_tokens_limit(app, alice):
    document = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}],
                "tanglebox": {"version": 1, "settings": {"maxNewTokens": 4000}}}
    response = alice.post("/import", data={"file": (_file(json.dumps(document).encode()),
                                                    "big.json")},
                          content_type="multipart/form-data")
    assert response.status_code == 303
    conversation_id = response.headers["Location"][len("/c/"):]
    stored_settings = conversation_store(app).get(conversation_id, alice.owner).settings
    assert stored_settings["maxNewTokens"] == 300


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "file: not valid JSON"),
    (b"[1, 2]", "file: must hold a JSON object"),
    (b'{"title": "no messages here"}', "file: "),
    (b"\xff\xfe", "file: not valid JSON"),
])
def test_a_bad_import_is_a_400_that_names_the_problem(alice, content, problem):
    response = alice.post("/import", data={"file": (_file(content), "bad.json")},
                          content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.text.startswith(problem)
    assert listed(alice) == []


def test_an_import_without_a_file_is_a_400(alice):
    response = alice.post("/import", data={}, content_type="multipart/form-data")
    assert response.status_code == 400 and response.text.startswith("file:")


@pytest.mark.parametrize("settings_values", [{"isApiTokensRequired": True,
                                              "apiTokensFile": "tokens.txt"}])
def test_the_history_follows_the_sign_in_rule(app, alice, tmp_path):
    conversation_id = stored(app, alice, "behind a token", "reply")
    page = alice.get(f"/c/{conversation_id}")
    assert page.status_code == 303
    assert page.headers["Location"] == f"/signin?next=%2Fc%2F{conversation_id}"
    assert alice.get("/history").status_code == 401
    assert alice.get(f"/c/{conversation_id}/export?format=md").status_code == 401
    assert alice.post(f"/c/{conversation_id}/delete").status_code == 401
    assert alice.post("/import", data={}).status_code == 401
    token = add_token(tmp_path / "tokens.txt", "alice")
    signed_in = alice.post("/signin", data={"token": token, "next": f"/c/{conversation_id}"})
    assert signed_in.status_code == 303  # back to the conversation the link named
    assert signed_in.headers["Location"] == f"/c/{conversation_id}"
    assert listed(alice) == ["behind a token"]
    assert alice.get(f"/c/{conversation_id}").status_code == 200


def test_the_widget_reopens_this_browsers_latest_conversation_with_the_same_site(app):
    visitor = Browser(app, cookie=WIDGET_COOKIE)
    stored(app, visitor, "Where is my order?", "It ships today.", surface="widget", site=SITE)
    on_site = visitor.get("/widget", headers={"Referer": SITE + "/checkout"}).text
    assert "Where is my order?" in on_site and "site=https" in on_site
    elsewhere = visitor.get("/widget", headers={"Referer": OTHER_SITE + "/post"}).text
    assert "Where is my order?" not in elsewhere
    stranger = Browser(app, cookie=WIDGET_COOKIE)
    assert "Where is my order?" not in stranger.get(
        "/widget", headers={"Referer": SITE + "/checkout"}).text


def _file(content: bytes) -> io.BytesIO:
    return io.BytesIO(content)


def test_the_browser_cookie_never_reaches_the_server_log(fake_server):
    fake_server.start(fake={}, logFormat="json", enableWebLogOutput=True)
    browser = requests.Session()
    browser.get(fake_server.url + "/")
    value = browser.cookies[PAGE_COOKIE]
    assert browser.get(fake_server.url + "/history?q=anything").status_code == 200
    assert browser.get(fake_server.url + "/c/" + "A" * 22).status_code == 404
    wait_until(lambda: '"path": "/history"' in fake_server.log(), what="the access line")
    fake_server.stop()
    log = fake_server.log()
    assert value not in log and hashlib.sha256(value.encode()).hexdigest() not in log  # ...not it
