"""config.json reading: both rope spellings, YaRN's two scales, and clear errors for what ktjax does not run
or cannot read."""
import math

import pytest

from ktjax.model.config import ModelConfig, yarn_mscale
from ktjax.errors import KtjaxError
from hf_models import CONFIGS, YARN


def _raw(name="v3", **changes):
    kind, kwargs = CONFIGS[name]
    raw = dict(kwargs, architectures=["DeepseekV3ForCausalLM" if kind == "v3" else "DeepseekV2ForCausalLM"])
    raw.update(changes)
    return raw


def test_old_and_new_rope_spellings_agree():
    new = ModelConfig.from_hf_dict(_raw(rope_parameters=dict(YARN)))
    old_scaling = {("type" if k == "rope_type" else k): v for k, v in YARN.items() if k != "rope_theta"}
    raw_old = _raw(rope_scaling=old_scaling, rope_theta=YARN["rope_theta"])
    del raw_old["rope_parameters"]
    assert ModelConfig.from_hf_dict(raw_old) == new


def test_yarn_scales():
    cfg = ModelConfig.from_hf_dict(_raw(rope_parameters=dict(YARN, factor=40.0, mscale=0.707, mscale_all_dim=1.0)))
    assert cfg.rope.attention_factor == pytest.approx(yarn_mscale(40, 0.707) / yarn_mscale(40, 1.0))
    m = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx((12 + 8) ** -0.5 * m * m)
    plain = ModelConfig.from_hf_dict(_raw(rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    assert plain.softmax_scale == pytest.approx(20 ** -0.5) and plain.rope.attention_factor == 1.0


def test_dense_and_moe_stacks():
    cfg = ModelConfig.from_hf_dict(_raw(first_k_dense_replace=1, num_hidden_layers=3))
    assert (cfg.num_dense_layers, cfg.num_moe_layers) == (1, 2)


@pytest.mark.parametrize("change,named", [
    (dict(architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "dynamic"),
    (dict(n_group=3), "n_group"),
    (dict(kv_lora_rank=None), "kv_lora_rank"),
    (dict(num_experts_per_tok=99), "num_experts_per_tok"),
])
def test_unsupported_values_name_the_field(change, named):
    with pytest.raises(KtjaxError, match=named):
        ModelConfig.from_hf_dict(_raw(**change))


@pytest.mark.parametrize("content,fault", [
    (None, r"no such file \(the model config\); point at"),
    (b'{"vocab_size": 10,', "not valid JSON"),
    (b'{"name": "caf\xe9"}', "not UTF-8 text"),
    (b"[1, 2]", "must hold a JSON object, not a JSON list"),
])
def test_a_broken_config_file_is_one_message_naming_it(tmp_path, content, fault):
    """Every JSON file a folder holds is read by ktjax.util.jsonio.read_json: these faults read alike in all."""
    path = tmp_path / "config.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KtjaxError, match=rf"config\.json: .*{fault}"):
        ModelConfig.from_file(str(path))
