"""The JSON recognizer behind JSON mode: it accepts every prefix of valid JSON objects, refuses
what cannot continue one, and its shortest completion always parses (checked by json.loads)."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.generation.json_state import JsonState

values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)
objects = st.dictionaries(st.text(max_size=5), values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(objects, st.sampled_from([None, 2]), st.booleans())
def test_every_prefix_is_accepted_and_completes_to_json(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    state = JsonState()
    for i, ch in enumerate(text):
        json.loads(text[:i] + state.completion())      # the shortest completion parses
        assert state.feed(ch), f"refused {ch!r} at {i} of {text!r}"
    assert state.done and state.completion() == ""
    assert not state.accepts(" ") and not state.accepts("}")   # nothing after the object


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]":,0123456789-.eE+tfruealns \\\n', max_size=30))
def test_whatever_it_accepts_parses_once_completed(text):
    state = JsonState()
    if state.feed(text):
        assert isinstance(json.loads(text + state.completion()), dict)


def test_root_must_be_an_object_and_whitespace_is_capped():
    assert not JsonState().accepts("[1]") and not JsonState().accepts(" {")
    state = JsonState()
    assert state.feed("{")
    assert state.accepts(" " * 16) and not state.accepts(" " * 17)
    assert not state.accepts('"a\x01')                     # control characters must be escaped
    assert state.completion() == "}"
    assert state.feed('"k": [tr') and state.completion() == "ue]}"
    assert state.feed('ue, -') and state.completion() == "0]}"
