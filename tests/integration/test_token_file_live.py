"""A token file that breaks while an original websocket waits for its ``#-token-#`` message: the
socket says why and closes with 1013 (try again later), never an HTTP answer written into the
upgraded connection."""

from __future__ import annotations

from contextlib import closing

import websocket

from tanglebox.api_tokens import add_token


def test_the_original_socket_says_the_token_file_cannot_be_read_and_closes_1013(fake_server,
                                                                                tmp_path):
    tokens = tmp_path / "tokens.txt"
    token = add_token(tokens, "alice")
    fake_server.start(fake={}, isApiTokensRequired=True, apiTokensFile="tokens.txt")
    with closing(websocket.create_connection(fake_server.ws_url + "/", timeout=30)) as ws:
        tokens.write_bytes(tokens.read_bytes() + b"caf\xe9:tbx_not-utf8\n")  # an editor's Latin-1
        ws.send(f"#-token-#{token}")
        message = ws.recv()
        assert message.startswith("Error: The server cannot read its API token file")
        assert token not in message
        opcode, frame = ws.recv_data_frame(True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame.data[:2], "big") == 1013
