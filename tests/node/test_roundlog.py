"""rounds.jsonl: one checksummed line per round; lenient for progress readers, strict for the
director's resume."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.roundlog import RoundLog, RoundLogError, decode_line, encode_line, read_records

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
records = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@given(record=records)
def test_a_line_holds_its_record_exactly_and_any_change_is_caught(record):
    line = encode_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one record, one line
    assert decode_line(line) == record
    obj = json.loads(line)
    obj["record"]["__extra"] = 1
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode_line(json.dumps(obj))


def test_progress_readers_skip_a_bad_line_and_stop_at_a_torn_one(tmp_path):
    log = RoundLog(tmp_path)
    for r in (1, 2, 3):
        log.append({"round": r})
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"round":2', b'"round":9')  # checksum no longer matches
    log.path.write_bytes(b"".join(lines) + b'{"record": {"round": 4')
    assert read_records(tmp_path) == [{"round": 1}, {"round": 3}]
    with pytest.raises(RoundLogError, match="line 2 is damaged"):
        log.load()


def test_the_director_cuts_a_torn_last_line_and_keeps_the_rest(tmp_path):
    log = RoundLog(tmp_path)
    log.append({"round": 1})
    good = log.path.read_bytes()
    with open(log.path, "ab") as fh:
        fh.write(encode_line({"round": 2})[:-9])
    assert log.load() == [{"round": 1}]
    assert log.path.read_bytes() == good
    log.append({"round": 2})
    assert log.load() == [{"round": 1}, {"round": 2}]


def test_truncate_after_drops_later_rounds_from_the_file(tmp_path):
    log = RoundLog(tmp_path)
    for r in (1, 2, 3, 4):
        log.append({"round": r})
    kept = log.truncate_after(2, log.load())
    assert kept == [{"round": 1}, {"round": 2}] and log.load() == kept
    assert read_records(tmp_path) == kept
