"""Bad model folders: each gives one KtjaxError that names the file or tensor at fault."""
import os

import pytest

import ktjax
from folder_edits import BAD_INPUTS, edit_json
from ktjax.errors import KtjaxError


@pytest.fixture
def folder(v2_lite_copy):
    return v2_lite_copy


@pytest.mark.parametrize("damage", BAD_INPUTS)
def test_broken_folder_is_refused_with_a_message_naming_the_fault(folder, damage):
    pattern = BAD_INPUTS[damage](folder)
    with pytest.raises(KtjaxError, match=pattern):
        ktjax.load(folder)


def test_unsupported_field_value(folder):
    edit_json(os.path.join(folder, "config.json"), moe_layer_freq=2)
    with pytest.raises(KtjaxError, match="moe_layer_freq=2"):
        ktjax.load(folder)


def test_bad_overrides(folder):
    with pytest.raises(KtjaxError, match="cache_dtyp"):
        ktjax.load(folder, cache_dtyp="int8")
    with pytest.raises(KtjaxError, match="dtype='float16'"):
        ktjax.load(folder, dtype="float16")


def test_bad_token_ids(hf_folder):
    engine = ktjax.load(hf_folder("v2_lite")[0])
    with pytest.raises(KtjaxError, match="rectangular"):
        engine.logits([[1, 2, 3], [1, 2]])
    with pytest.raises(KtjaxError, match=r"\[0, 97\)"):
        engine.logits([[1, 2, 97]])
