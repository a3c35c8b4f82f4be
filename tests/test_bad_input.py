"""Bad model folders: each gives one KtjaxError that names the file or tensor at fault."""
import os
import shutil

import pytest

import ktjax
from folder_edits import corrupt_header, edit_json, missing_tensor, shards, truncate_shard, unexpected_tensor
from ktjax.errors import KtjaxError


@pytest.fixture
def folder(hf_folder, tmp_path):
    src, _ = hf_folder("v2_lite")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(folder, **changes):
    edit_json(os.path.join(folder, "config.json"), **changes)


def test_missing_shard(folder):
    victim = shards(folder)[1]
    os.remove(os.path.join(folder, victim))
    with pytest.raises(KtjaxError, match=victim):
        ktjax.load(folder)


def test_shape_disagrees_with_config(folder):
    _edit_config(folder, intermediate_size=72)
    with pytest.raises(KtjaxError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape.*config"):
        ktjax.load(folder)


def test_unsupported_architecture(folder):
    _edit_config(folder, architectures=["MixtralForCausalLM"])
    with pytest.raises(KtjaxError, match="config.json.*MixtralForCausalLM"):
        ktjax.load(folder)


def test_unsupported_field_value(folder):
    _edit_config(folder, moe_layer_freq=2)
    with pytest.raises(KtjaxError, match="moe_layer_freq=2"):
        ktjax.load(folder)


def test_truncated_shard(folder):
    with pytest.raises(KtjaxError, match=truncate_shard(folder)):
        ktjax.load(folder)


def test_corrupt_header(folder):
    with pytest.raises(KtjaxError, match=corrupt_header(folder)):
        ktjax.load(folder)


def test_unexpected_tensor(folder):
    with pytest.raises(KtjaxError, match=unexpected_tensor(folder)):
        ktjax.load(folder)


def test_missing_tensor(folder):
    with pytest.raises(KtjaxError, match=missing_tensor(folder)):
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
