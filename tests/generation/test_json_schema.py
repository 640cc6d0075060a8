"""The schema layer of JSON mode: whatever characters a model tries, what is accepted and then
completed is an object with the schema's keys, in order, and values of their top-level types."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.generation.json_schema import SchemaState

SCHEMA = {"type": "object", "required": ["city", "days", "hot", "tags", "any"], "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hot": {"type": "boolean"},
    "tags": {"type": "array"}, "any": {}, "optional": {"type": "number"}}}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list('{}[]":,0123456789-.eE+tfruealns ab\\') + ['"city": ', ', "days": ']),
                max_size=40))
def test_accepted_text_completes_to_a_conforming_object(attempts):
    state, text = SchemaState(SCHEMA), ""
    for piece in attempts:
        if state.accepts(piece):
            state.feed(piece)
            text += piece
        if state.done:
            break
    obj = json.loads(text + state.completion())
    assert list(obj) == ["city", "days", "hot", "tags", "any"]      # required keys only, in order
    assert isinstance(obj["city"], str) and type(obj["days"]) is int and isinstance(obj["hot"], bool)
    assert isinstance(obj["tags"], list)


def test_keys_are_forced_and_types_checked():
    s = SchemaState(SCHEMA)
    assert s.completion() == '{"city":"","days":0,"hot":false,"tags":[],"any":0}'
    assert s.feed('{ "') and s.accepts('city": "x"') and not s.accepts('days')
    assert s.feed('city": "Paris", "days": 3')
    assert not s.accepts(".5") and not s.accepts("}") and s.accepts("0, ")
    assert s.feed(', "hot": ') and not s.accepts('"yes"') and s.accepts("true")
