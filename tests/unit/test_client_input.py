"""Input that once got a 500 (issue 14, class 4) or was taken for something it is not (class 8):
every such REST request is a 400 naming the parameter, every such socket message an error on
a socket that stays open; numbers as text are plain decimals on every surface; pages of
another origin cannot start generations with a GET.

REST through Flask's test client; the sockets' message handling in-process (a socket object
that records what is sent). The same input over real sockets: tests/integration/
test_input_hardening_live.py.
"""

from __future__ import annotations

import pytest

from tanglebox.chat_request import RequestError, parse_max_new_tokens, parse_temperature
from tanglebox.client_json import MAX_DEPTH, decode_json
from tanglebox.web.original_socket import (SET_MAX_TOKENS, SET_TEMPERATURE, ControlMessage,
                                           SocketState, apply_setting)
from tanglebox.web.ui_socket import Unreadable, parse_message

SURROGATE = "\ud800"
DEEP = 50_000


def post_json(client, text: str, **headers):
    return client.post("/conversation", data=text.encode("utf-8", "surrogatepass"),
                       content_type="application/json", headers=headers)


# -- REST: the requests that got a 500 ---------------------------------------------------------

@pytest.mark.parametrize("role", [["Human"], {"role": "Human"}, 1, None])
def test_a_role_of_the_wrong_type_is_a_400_naming_the_pair(client, role):
    response = client.post("/conversation", json={
        "userPrompt": "echo hi", "conversationHistory": [["Human", "a"], [role, "b"]]})
    assert response.status_code == 400
    assert response.text.startswith("conversationHistory[1]: role must be")


@pytest.mark.parametrize("body, param", [
    ('{"userPrompt": "\\ud800"}', "userPrompt"),
    ('{"userPrompt": "echo hi", "systemPrompt": "x\\udfff"}', "systemPrompt"),
    ('{"userPrompt": "echo hi", "conversationHistory": [["Human", "\\ud800"]]}',
     "conversationHistory[0][1]"),
    ('{"userPrompt": "echo hi", "token": "\\ud800"}', "token"),
    ('{"userPrompt": "echo hi", "\\ud800": 1}', "body"),
])
def test_a_lone_surrogate_anywhere_in_a_json_body_is_a_400_naming_it(client, fake_backend,
                                                                     body, param):
    response = post_json(client, body)
    assert response.status_code == 400
    assert response.text.startswith(f"{param}: holds a lone UTF-16 surrogate")
    assert not any(fake_backend.sequences)  # refused before the model


@pytest.mark.parametrize("settings_values", [{"isApiTokensRequired": True}])
def test_a_lone_surrogate_in_the_token_is_a_400_when_tokens_are_required(client):
    response = post_json(client, '{"userPrompt": "echo hi", "token": "\\ud800"}')
    assert response.status_code == 400
    assert response.text.startswith("token: holds a lone UTF-16 surrogate")


def test_a_conversation_history_string_nested_50000_deep_is_a_400(client):
    for send in (lambda params: client.get("/conversation", query_string=params),
                 lambda params: client.post("/conversation", data=params),
                 lambda params: client.post("/conversation", json=params)):
        response = send({"userPrompt": "echo hi", "conversationHistory": "[" * DEEP})
        assert response.status_code == 400
        assert response.text.startswith("conversationHistory: nested too deeply")


@pytest.mark.parametrize("body", ["[" * DEEP, '{"userPrompt": ' + "[" * DEEP,
                                  '{"userPrompt": "hi", "x": ' + "[" * 100 + "]" * 100 + "}"])
def test_a_json_body_nested_too_deeply_is_a_400(client, body):
    response = post_json(client, body)
    assert response.status_code == 400
    assert "nested too deeply" in response.text


def test_nesting_up_to_the_limit_is_read(client):
    deep = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    response = post_json(client, '{"userPrompt": "echo hi", "extra": ' + deep + "}")
    assert response.status_code == 200 and response.text == "hi"


def test_the_decoder_names_items_inside_the_value():
    with pytest.raises(RequestError, match=r"^conversationHistory\[2\]\[0\]: holds a lone"):
        decode_json('[["Human","a"],["AI","b"],["\\ud800","c"]]', "conversationHistory", "x")
    with pytest.raises(RequestError, match=r"^body: not valid JSON; send UTF-8"):
        decode_json(b'{"userPrompt": "\xff"}', "body", "x")
    with pytest.raises(RequestError, match=r"^body: not valid JSON"):
        decode_json("1" * 5000, "body", "x")  # more digits than Python converts


@pytest.mark.parametrize("params", [
    {"temperature": 10 ** 400}, {"maxNewTokens": 10 ** 400}, {"temperature": -(10 ** 400)}])
def test_a_number_too_large_for_a_float_is_a_400(client, params):
    response = client.post("/conversation", json={"userPrompt": "echo hi", **params})
    assert response.status_code == 400 and response.text.startswith(f"{next(iter(params))}:")


@pytest.mark.parametrize("text", ["9" * 400, "9" * 5000, "9" * 400 + ".5"])
def test_a_number_with_too_many_digits_is_a_400(client, text):
    for param in ("temperature", "maxNewTokens"):
        response = client.post("/conversation", data={"userPrompt": "echo hi", param: text})
        assert response.status_code == 400 and response.text.startswith(f"{param}:")


# -- numbers written as text: plain decimals, the same on every surface ------------------------

@pytest.mark.parametrize("text", ["1_0", "1e2", "0x10", "inf", "nan", "\u0661\u0660", "1 0"])
def test_only_plain_decimal_numbers_are_numbers(client, text):
    with pytest.raises(RequestError):
        parse_max_new_tokens(text, 4096)
    with pytest.raises(RequestError):
        parse_temperature(text)
    state = SocketState(temperature=0.7, max_new_tokens=512, max_new_tokens_limit=4096)
    with pytest.raises(RequestError):
        apply_setting(state, ControlMessage(SET_MAX_TOKENS, text))
    with pytest.raises(RequestError):
        apply_setting(state, ControlMessage(SET_TEMPERATURE, text))
    assert (state.max_new_tokens, state.temperature) == (512, 0.7)  # unchanged
    response = client.get("/conversation", query_string={"userPrompt": "echo hi",
                                                         "maxNewTokens": text})
    assert response.status_code == 400 and response.text.startswith("maxNewTokens:")


@pytest.mark.parametrize("text, number", [("10", 10), (" 10 ", 10), ("+10", 10), ("10.", 10),
                                          ("10.0", 10)])
def test_plain_decimal_numbers_are_still_read(text, number):
    assert parse_max_new_tokens(text, 4096) == number
    assert parse_temperature("0.5") == 0.5 and parse_temperature(".5") == 0.5


# -- the chat UI socket's messages -------------------------------------------------------------

@pytest.mark.parametrize("raw, named", [
    ('{"userPrompt": "\\ud800"}', "userPrompt"),
    ('{"action": "settings", "systemPrompt": "\\udc00"}', "systemPrompt"),
    ("[" * 100_000, "message"),
    ('{"userPrompt": ' + "[" * 100 + "]" * 100 + "}", "userPrompt"),
    (b"\xff\xfe", "message"),
])
def test_an_unreadable_ui_socket_message_is_unreadable_naming_the_field(raw, named):
    with pytest.raises(Unreadable, match=rf"could not read that message \({named}[:\[.]"):
        parse_message(raw)


def test_a_ui_socket_message_is_read_as_before():
    assert parse_message('{"userPrompt": "hi", "HEADERS": {"HX-Request": "true"}}') == {
        "userPrompt": "hi"}


# -- pages of another origin cannot start a generation with a GET ------------------------------

@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"},  # <img> on 127.0.0.1:9000
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:9000"},  # fetch()
    {"Origin": "http://127.0.0.1:9000"},  # a browser without Sec-Fetch-Site
])
def test_a_same_site_page_cannot_start_a_generation(client, fake_backend, headers):
    response = client.get("/conversation?userPrompt=echo+pwned", headers=headers)
    assert response.status_code == 403 and "allowedOrigins" in response.text
    assert not any(fake_backend.sequences)


@pytest.mark.parametrize("headers", [
    {},  # a script
    {"Sec-Fetch-Site": "none"},  # typed in the address bar
    {"Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},  # the test client's host
])
def test_scripts_and_the_servers_own_pages_still_get_replies(client, headers):
    response = client.get("/conversation?userPrompt=echo+ok", headers=headers)
    assert response.status_code == 200 and response.text == "ok"


@pytest.mark.parametrize("settings_values", [{"allowedOrigins": ["http://127.0.0.1:9000"]}])
def test_a_same_site_page_whose_origin_is_allowed_is_served(client):
    response = client.get("/conversation?userPrompt=echo+ok", headers={
        "Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:9000"})
    assert response.status_code == 200 and response.text == "ok"


def test_an_error_quotes_a_huge_bad_value_cut_short(client):
    response = client.post("/conversation", json={"userPrompt": "hi", "temperature": "9" * 100_000})
    assert response.status_code == 400
    assert len(response.data) < 400
    assert b"(100002 characters)" in response.data
