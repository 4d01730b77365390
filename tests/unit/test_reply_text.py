"""UTF-8-safe deltas and stop strings held back until they match or stop matching."""

from tanglebox.reply_text import ReplyText


def feed_all(reply: ReplyText, pieces: list[bytes]) -> list[str]:
    return [reply.feed(piece) for piece in pieces] + [reply.finish()]


def test_a_character_split_across_tokens_is_released_whole():
    reply = ReplyText()
    euro = "€".encode()  # three bytes
    assert feed_all(reply, [b"1 ", euro[:1], euro[1:2], euro[2:]]) == ["1 ", "", "", "€", ""]
    assert reply.text == "1 €"


def test_a_reply_cut_off_inside_a_character_ends_before_it():
    reply = ReplyText()
    wink = "😉".encode()  # four bytes; the token limit came after two
    assert feed_all(reply, [b"ok ", wink[:2]]) == ["ok ", "", ""]
    assert reply.text == "ok "


def test_invalid_bytes_inside_the_reply_still_show_as_replacement_characters():
    reply = ReplyText()
    assert feed_all(reply, [b"a\x80b"]) == ["a\ufffdb", ""]


def test_a_stop_string_split_over_tokens_never_shows():
    reply = ReplyText(("###",))
    deltas = feed_all(reply, [b"Paris", b"#", b"#", b"#", b"Human"])
    assert "".join(deltas) == "Paris"
    assert reply.stopped and reply.text == "Paris"


def test_a_partial_stop_that_stops_matching_is_released():
    reply = ReplyText(("</s>",))
    assert reply.feed(b"a <") == "a "
    assert reply.feed(b"/b>") == "</b>"
    assert reply.finish() == ""
    assert reply.text == "a </b>"


def test_held_text_is_released_when_the_reply_ends():
    reply = ReplyText(("###",))
    assert reply.feed(b"C#") == "C"
    assert reply.finish() == "#"
    assert not reply.stopped


def test_the_earliest_of_several_stop_strings_wins():
    reply = ReplyText(("END", "\nUser:"))
    assert "".join(feed_all(reply, [b"done\nUser: hi END"])) == "done"
