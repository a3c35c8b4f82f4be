"""Property-based fuzzing of the two parsers every model folder goes through: the safetensors header and
config.json. Whatever the bytes or values, the answer is a result or a KtjaxError, at once: never another
exception, never a hang. Bounded in the default run; the `slow` run tries many more examples."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktjax.model.config import ModelConfig
from ktjax.demo import DEMO_MODEL_DIR
from ktjax.errors import KtjaxError
from ktjax.weights.safetensors_io import DTYPES, parse_header

QUICK = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=5000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)

sizes = st.integers(-3, 2**33) | st.sampled_from([0, 1, 2, 4, 8])
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from([*DTYPES, "F7", "", "f32"]) | json_values,
     "shape": st.lists(sizes, max_size=3) | json_values,
     "data_offsets": st.lists(sizes, min_size=2, max_size=2) | json_values})
headers = st.dictionaries(st.text(max_size=8), entries | json_values, max_size=5)


def _check_header(raw: bytes, data_size: int):
    try:
        parsed = parse_header(raw, data_size)
    except KtjaxError:
        return
    # Accepted: the tensors tile the data section exactly, each of its shape's size.
    spans = sorted((begin, begin + dtype.itemsize * _count(shape)) for dtype, shape, begin in parsed.values())
    end = 0
    for begin, stop in spans:
        assert begin == end
        end = stop
    assert end == data_size


def _count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _headers_property(header, data_size, junk):
    raw = json.dumps(header).encode() if not junk else json.dumps(header).encode()[: len(junk)] + junk
    _check_header(raw, data_size)


@QUICK
@given(headers, st.integers(0, 64), st.binary(max_size=8))
def test_safetensors_header_structures(header, data_size, junk):
    _headers_property(header, data_size, junk)


@QUICK
@given(st.binary(max_size=300), st.integers(0, 2**40))
def test_safetensors_header_bytes(raw, data_size):
    _check_header(raw, data_size)


def _valid_header(shapes):
    header, offset = {}, 0
    for i, shape in enumerate(shapes):
        size = 4 * _count(shape)
        header[f"t{i}"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


@QUICK
@given(st.lists(st.lists(st.integers(0, 5), max_size=3), max_size=5))
def test_valid_headers_are_accepted(shapes):
    header, data_size = _valid_header(shapes)
    assert set(parse_header(json.dumps(header).encode(), data_size)) == set(header)


with open(f"{DEMO_MODEL_DIR}/config.json") as _f:
    DEMO_CONFIG = json.load(_f)

config_changes = st.dictionaries(st.sampled_from(sorted(DEMO_CONFIG) + ["rope_scaling", "moe_layer_freq"]),
                                 json_values | st.integers(-2, 2**40), max_size=4)


def _config_property(changes):
    try:
        cfg = ModelConfig.from_hf_dict({**DEMO_CONFIG, **changes})
    except KtjaxError:
        return
    assert 1 <= cfg.num_hidden_layers <= 4096 and 1 <= cfg.vocab_size <= 2**24


@QUICK
@given(config_changes)
def test_config_fields(changes):
    _config_property(changes)


@QUICK
@given(json_values)
def test_config_of_any_json(raw):
    try:
        ModelConfig.from_hf_dict(raw)
    except KtjaxError:
        pass


@pytest.mark.slow
@LONG
@given(headers, st.integers(0, 64), st.binary(max_size=8))
def test_safetensors_header_structures_long(header, data_size, junk):
    _headers_property(header, data_size, junk)


@pytest.mark.slow
@LONG
@given(config_changes)
def test_config_fields_long(changes):
    _config_property(changes)
