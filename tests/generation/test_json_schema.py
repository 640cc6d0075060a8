"""The schema layer of JSON mode: whatever characters a model tries, what is accepted and then
completed is an object that follows the schema, at every depth (validated by `jsonschema`)."""
from __future__ import annotations

import json
import random

import pytest

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


NESTED = {
    "type": "object", "required": ["name", "kind", "size", "location", "tags", "mayor", "rank", "ratio"],
    "properties": {
        "name": {"type": "string"}, "kind": {"enum": ["city", "town", "village"]}, "size": {"type": "integer"},
        "location": {"$ref": "#/$defs/Point"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "mayor": {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]},
        "rank": {"const": 3}, "ratio": {"type": ["number", "null"]}, "note": {"type": "string"}},
    "$defs": {
        "Point": {"type": "object", "required": ["lat", "lon"],
                  "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
        "Person": {"type": "object", "properties": {
            "first": {"type": "string"}, "age": {"type": "integer"},
            "langs": {"type": "array", "items": {"enum": ["en", "fr", 1.5, True, None]}}}}}}
STRUCTURE = list('{}[]":,') + ["city", "town", "village", "null", "true", "3", "1.5", "-2e1"]
ALPHABET = STRUCTURE + list("abcdefghijklmnopqrstuvwxyz_0123456789-.eE+ \\")


def walk(schema: dict, seed: int) -> tuple[str, SchemaState]:
    """A random writer: at each step one of the accepted pieces (a structural one half the
    time, when one is accepted), until done or tired."""
    rng, state, text = random.Random(seed), SchemaState(schema), ""
    for _ in range(rng.randint(0, 400)):
        ok = [p for p in (STRUCTURE if rng.random() < 0.5 else ALPHABET) if state.accepts(p)] or \
            [p for p in ALPHABET if state.accepts(p)]
        if not ok or state.done:
            break
        piece = rng.choice(ok)
        assert state.feed(piece)
        text += piece
    return text, state


@pytest.mark.parametrize("seed", range(300))
def test_random_writers_are_held_to_the_nested_schema(seed):
    """Whatever a writer picks among the accepted pieces, the text plus the completion validates
    against the schema (checked by the `jsonschema` package), at every depth."""
    jsonschema = pytest.importorskip("jsonschema")
    text, state = walk(NESTED, seed)
    obj = json.loads(text + state.completion())
    jsonschema.validate(obj, NESTED)
    assert list(obj) == NESTED["required"] and list(obj["location"]) == ["lat", "lon"]
    assert obj["mayor"] is None or list(obj["mayor"]) == ["first", "age", "langs"]


def test_nested_rules_refuse_what_breaks_them():
    s = SchemaState(NESTED)
    assert s.completion() == ('{"name":"","kind":"city","size":0,"location":{"lat":0,"lon":0},"tags":[""],'
                              '"mayor":{"first":"","age":0,"langs":[]},"rank":3,"ratio":0}')
    assert s.feed('{"name": "Lyon", "kind": ')
    assert not s.accepts('"cit"') and not s.accepts('"capital"') and s.accepts('"town"')
    assert s.feed('"village", "size": 5')
    assert not s.accepts(".5") and not s.accepts("e3")
    assert s.feed(', "location": {"') and s.accepts('lat": 1.5e3') and not s.accepts('lon')
    assert s.feed('lat": -1.25, "lon": 2}')
    assert s.feed(', "tags": [') and not s.accepts("]") and not s.accepts("1") and s.accepts('"a"')
    assert s.feed('"a", "b", "c"') and not s.accepts(",") and s.accepts("]")
    assert s.feed('], "mayor": ') and not s.accepts('"x"') and s.accepts("null") and s.accepts("{")
    assert s.feed('{"first": "Ann", "age": 40, "langs": [1.5, "fr", null') and not s.accepts(', "de"')
    assert s.feed(']}, "rank": ') and not s.accepts("4") and s.accepts("3")
    assert s.feed('3, "ratio": ') and s.accepts("null") and s.accepts("0.5") and not s.accepts('"')
    assert s.feed("0.5") and s.accepts("}") and s.completion() == "}"


def test_an_object_that_requires_itself_has_no_completion():
    loop = {"type": "object", "required": ["next"], "properties": {"next": {"$ref": "#"}}}
    with pytest.raises(ValueError, match="no instance"):
        SchemaState(loop).completion()
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    assert SchemaState(tree).completion() == '{"kids":[]}'
