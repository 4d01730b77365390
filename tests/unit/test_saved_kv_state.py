"""The folder of saved KV states (no model: states are bytes here): found by the longest shared
prefix, bounded on disk least recently used first, and a file it cannot trust is removed, never
loaded."""

from __future__ import annotations

from pathlib import Path

from tanglebox.backends.llama_cpp_saved_state import SavedStates

MODEL = b"m" * 32
OTHER_MODEL = b"o" * 32
MB = 1 << 20


def folder(root: Path, fingerprint: bytes = MODEL, budget: int = 100 * MB) -> SavedStates:
    return SavedStates(root / "kv-cache", fingerprint, budget)


def files(root: Path) -> set[Path]:
    return set((root / "kv-cache").rglob("*.kvstate"))


def one_saved(root: Path) -> tuple[SavedStates, Path]:
    """A folder holding one state, of the tokens [1, 2, 3], and its file."""
    states = folder(root)
    states.write([1, 2, 3], b"a state of some length")
    (path,) = files(root)
    return states, path


def test_a_saved_state_is_found_by_the_longest_prefix_and_reads_back(tmp_path):
    states = folder(tmp_path)
    states.write([1, 2, 3, 4], b"state of 1234")
    states.write([1, 2, 9], b"state of 129")
    restarted = folder(tmp_path)  # a new process finds them in the folder
    state, shared = restarted.longest_prefix([1, 2, 3, 4, 5, 6])
    assert shared == 4 and state.tokens.tolist() == [1, 2, 3, 4]
    assert restarted.read(state) == b"state of 1234"
    state, shared = restarted.longest_prefix([1, 2, 9, 9])
    assert shared == 3 and restarted.read(state) == b"state of 129"
    assert restarted.longest_prefix([7, 7]) is None


def test_a_state_that_a_longer_one_starts_with_is_replaced_by_it(tmp_path):
    states = folder(tmp_path)
    states.write([1, 2, 3], b"short")
    states.write([1, 2, 3, 4, 5], b"long")
    assert len(files(tmp_path)) == 1
    state, shared = states.longest_prefix([1, 2, 3, 7])
    assert shared == 3 and states.read(state) == b"long"


def test_the_folder_keeps_to_its_budget_dropping_the_least_recently_used(tmp_path):
    states = folder(tmp_path, budget=int(2.5 * MB))
    states.write([1], bytes(MB))
    states.write([2], bytes(MB))
    states.read(states.longest_prefix([1])[0])  # [1] used again: [2] is now the oldest
    states.write([3], bytes(MB))
    assert states.longest_prefix([2]) is None
    assert states.longest_prefix([1]) is not None and states.longest_prefix([3]) is not None
    assert len(files(tmp_path)) == 2
    assert sum(path.stat().st_size for path in files(tmp_path)) <= 2.5 * MB


def test_the_budget_covers_every_model_in_the_folder(tmp_path):
    other = folder(tmp_path, OTHER_MODEL, budget=int(2.5 * MB))
    other.write([1], bytes(MB))
    states = folder(tmp_path, budget=int(2.5 * MB))
    states.write([2], bytes(MB))
    states.write([3], bytes(MB))  # over: the other model's older state goes
    assert folder(tmp_path, OTHER_MODEL).longest_prefix([1]) is None
    assert len(files(tmp_path)) == 2


def test_a_state_bigger_than_the_budget_is_not_saved_and_evicts_nothing(tmp_path):
    states = folder(tmp_path, budget=MB)
    states.write([1], b"a small state")
    states.write([2], bytes(2 * MB))
    assert states.longest_prefix([2]) is None
    assert states.longest_prefix([1]) is not None
    assert len(files(tmp_path)) == 1


def test_another_models_states_are_not_seen_and_left_alone(tmp_path):
    folder(tmp_path, OTHER_MODEL).write([1, 2, 3], b"the other model's")
    states = folder(tmp_path)
    assert states.longest_prefix([1, 2, 3]) is None
    assert len(files(tmp_path)) == 1  # still there, for the other model
    assert folder(tmp_path, OTHER_MODEL).longest_prefix([1, 2, 3]) is not None


def test_a_file_of_another_model_in_this_models_folder_is_removed(tmp_path):
    other = folder(tmp_path, OTHER_MODEL)
    other.write([1, 2, 3], b"the other model's")
    states = folder(tmp_path)
    (path,) = files(tmp_path)
    path.rename(states.folder / path.name)  # e.g. copied in by hand
    assert states.longest_prefix([1, 2, 3]) is None
    assert not files(tmp_path)


def test_a_corrupt_state_is_removed_and_not_loaded(tmp_path):
    states, path = one_saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the state
    path.write_bytes(bytes(data))
    state, _ = states.longest_prefix([1, 2, 3])
    assert states.read(state) is None
    assert not files(tmp_path)
    assert states.longest_prefix([1, 2, 3]) is None


def test_a_cut_short_or_foreign_file_is_removed_at_start(tmp_path):
    states, path = one_saved(tmp_path)
    path.write_bytes(path.read_bytes()[:20])  # a crash mid-copy, by hand
    (states.folder / "junk.kvstate").write_bytes(b"not a state at all")
    restarted = folder(tmp_path)
    assert restarted.longest_prefix([1, 2, 3]) is None
    assert not files(tmp_path)


def test_a_state_cut_short_after_its_header_is_removed_when_read(tmp_path):
    states, path = one_saved(tmp_path)
    state, _ = states.longest_prefix([1, 2, 3])
    path.write_bytes(path.read_bytes()[:-4])
    assert states.read(state) is None
    assert not files(tmp_path)


def test_a_header_claiming_a_huge_state_is_removed_without_reading_it(tmp_path):
    states, path = one_saved(tmp_path)
    state, _ = states.longest_prefix([1, 2, 3])
    data = bytearray(path.read_bytes())
    data[44:52] = (1 << 60).to_bytes(8, "little")  # the state size: an exabyte
    path.write_bytes(bytes(data))
    assert states.read(state) is None
    assert not files(tmp_path)
