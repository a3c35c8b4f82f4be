"""Bad model folders: each gives one KtjaxError that names the file or tensor at fault."""
import json
import os
import shutil

import numpy as np
import pytest

import ktjax
from folder_edits import corrupt_header, edit_json, shards, truncate_shard
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
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)},
              os.path.join(folder, "extra.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors.index.json"))  # so the loader scans the files
    with pytest.raises(KtjaxError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        ktjax.load(folder)


def test_missing_tensor(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        raw = json.load(f)
    del raw["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    with open(index, "w") as f:
        json.dump(raw, f)
    with pytest.raises(KtjaxError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*missing"):
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
