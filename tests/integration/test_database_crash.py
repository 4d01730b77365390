"""A process killed mid-reply loses no saved message: every save it finished is there after,
and the next start marks the reply interrupted with the text saved last."""

from __future__ import annotations

import signal
import subprocess
import sys

from tanglebox.conversation_store import ConversationStore
from tanglebox.database import open_database
from tests.conftest import ROOT
from tests.postgres import database_url, postgres_server  # noqa: F401 - fixtures

SAVES_SEEN = 20  # saves reported before the kill

# Saves a growing reply forever, printing each text once its save has returned.
WRITER = """
import sys
from tanglebox.conversation_store import ConversationStore
from tanglebox.database import open_database
store = ConversationStore(open_database(sys.argv[1]))
conversation = store.create("a" * 64, "page", "", {})
question = store.add_message(conversation.id, None, "user", "Count for ever")
reply = store.add_message(conversation.id, question.id, "assistant", "", state="writing")
print(conversation.id, flush=True)
text = ""
for number in range(1, 10**9):
    text += f"{number} "
    store.update_reply(reply.id, text, "writing")
    print(text, flush=True)
"""


def test_a_process_killed_mid_reply_loses_no_saved_text(database_url):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, database_url], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conversation_id = writer.stdout.readline().strip()
    saved = [writer.stdout.readline() for _ in range(SAVES_SEEN)]
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert conversation_id and all(saved), writer.stderr.read()[-2000:]
    database = open_database(database_url)
    store = ConversationStore(database)
    assert store.interrupt_unfinished() == 1  # as the next start does
    question, reply = store.branch(conversation_id)
    assert question.content == "Count for ever"
    # At least what was reported saved, possibly one save more (killed after its commit).
    assert reply.content.startswith(saved[-1].rstrip("\n"))
    assert (reply.state, reply.note) == ("interrupted", "Interrupted")
    database.close()
