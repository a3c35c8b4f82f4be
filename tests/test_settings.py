"""Settings resolved once: the CLI, YAML and ktjax.load accept and refuse the same values (one validator),
per-call settings never recompile (docs/settings.md's table is checked by tests/test_docs.py)."""
import dataclasses

import jax
import numpy as np
import pytest

import ktjax
from ktjax.runtime import settings as runtime
from ktjax.errors import KtjaxError
from ktjax.cli.generate import main, parse

# (key, value as a user types it, what the engine sees, or None where it must be refused)
CASES = [
    ("cache_dtype", "int8", "int8"), ("cache_dtype", "BF16", "bf16"), ("cache_dtype", "bfloat16", "bf16"),
    ("cache_dtype", "fp32", "float32"), ("cache_dtype", "e4m3", "fp8"), ("cache_dtype", "int3", None),
    ("dtype", "bf16", "bfloat16"), ("dtype", "float32", "float32"), ("dtype", "float64", None),
    ("cache_lens", "auto", "auto"), ("cache_lens", "4096", 4096), ("cache_lens", "true", None),
    ("cache_lens", "0", None), ("cache_lens", "1.5", None),
    ("chunk_size", "64", 64), ("chunk_size", "-3", None),
    ("memory_budget", "512MiB", 512 * 2**20), ("memory_budget", "1e999", None), ("memory_budget", "lots", None),
    ("absorb_for_prefill", "yes", True), ("absorb_for_prefill", "maybe", None),
    ("attention", "XLA", "xla"), ("attention", "cuda", None),
    ("moe_impl", "gather", "gather"), ("moe_impl", "fast", None),
    ("weight_layout", "out-in", "out-in"), ("weight_layout", "sideways", None),
    ("cpu_kernels", "OFF", "off"), ("cpu_kernels", "on", "on"), ("cpu_kernels", "fast", None),
    ("mesh", "2x4", (2, 4)), ("mesh", "2x", None),
    ("max_new_tokens", "7", 7), ("max_new_tokens", "0", None),
    ("temperature", "0.7", 0.7), ("temperature", "nan", None), ("temperature", "hot", None),
    ("temperature", "-1", None), ("top_k", "5", 5), ("top_k", "1000000000000", None),
    ("top_p", "0.9", 0.9), ("top_p", "7", None), ("top_p", "0", None),
    ("seed", "3", 3), ("seed", str(10**23), None),
    ("ignore_eos", "[1]", None), ("absorb_for_prefill", "{}", None),
]


def _seen(key, value):
    return value.name if key == "cache_dtype" else value


def _value(key, resolved):
    load, call = resolved
    return getattr(load if key in runtime.LOAD_KEYS else call, key)


def _via_cli(key, value):
    return _value(key, parse(["--" + key.replace("_", "-"), value])[1])


def _via_yaml(key, value, tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(f"{key}: {value}\n")
    return _value(key, parse(["--config", str(path)])[1])


def _via_api(key, value):
    return _value(key, runtime.resolve(**{key: value}))


@pytest.mark.parametrize("key,value,expected", CASES)
def test_cli_yaml_and_api_agree(key, value, expected, tmp_path):
    results = []
    for way in (lambda: _via_cli(key, value), lambda: _via_yaml(key, value, tmp_path), lambda: _via_api(key, value)):
        try:
            results.append(_seen(key, way()))
        except KtjaxError as e:
            assert key in str(e) or value in str(e), str(e)
            results.append(None)
    assert results == [expected] * 3


def test_yaml_types_are_checked_like_strings(tmp_path):
    """YAML gives typed values (true, 1.5); they go through the same parsers as the CLI's strings."""
    for text in ("cache_lens: true", "temperature: hot", "chunk_size: 1.5", "mesh: [2, 4]"):
        path = tmp_path / "p.yaml"
        path.write_text(text + "\n")
        with pytest.raises(KtjaxError, match=text.split(":")[0]):
            parse(["--config", str(path)])


def test_a_setting_in_the_wrong_place_is_named():
    with pytest.raises(KtjaxError, match="per-call setting"):
        runtime.RuntimeConfig.from_overrides(temperature=0.5)
    with pytest.raises(KtjaxError, match="load-time setting"):
        runtime.CallSettings.from_overrides(cache_dtype="int8")


def test_cache_dtype_is_resolved_once_from_flag_to_kernel(capsys, monkeypatch):
    """Following --cache-dtype: one call of the format resolver, then the same CacheFormat object everywhere."""
    from ktjax.kv import formats
    from ktjax.kv.cache import LatentCache

    calls, created = [], []
    resolve_format = formats.resolve_format
    monkeypatch.setattr(formats, "resolve_format", lambda name: calls.append(name) or resolve_format(name))
    original_create = LatentCache.create.__func__
    monkeypatch.setattr(LatentCache, "create", classmethod(
        lambda cls, cfg, fmt, *a, **kw: created.append(fmt) or original_create(cls, cfg, fmt, *a, **kw)))
    assert main(["--cache-dtype", "int8", "--max-new-tokens", "2", "--json"]) == 0
    assert calls == ["int8"]
    assert created and all(fmt is formats.FORMATS["int8"] for fmt in created)
    capsys.readouterr()


def test_per_call_settings_reuse_the_compiled_programs(hf_folder, rng):
    folder, _ = hf_folder("v2_lite")
    engine = ktjax.load(folder, max_new_tokens=4, cache_lens=64)
    prompt = rng.integers(0, 97, size=9).tolist()
    first = engine.generate([prompt]).tokens[0]
    programs = engine.compile_count
    compiles = []
    listener = lambda name, *_, **__: compiles.append(name) if name.endswith("backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        sampled = engine.generate([prompt], temperature=0.7, seed=3, top_k=5, top_p=0.9, max_new_tokens=3,
                                  ignore_eos=True)
        again = engine.generate([prompt])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert engine.compile_count == programs and compiles == []
    assert again.tokens[0] == first and len(sampled.tokens[0]) == 3


def test_generate_text_round_trip():
    from ktjax.demo import DEMO_MODEL_DIR

    engine = ktjax.load(DEMO_MODEL_DIR, max_new_tokens=8)
    texts = engine.generate_text(["The for statement", "A list"], chat=False)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    ids = [engine.tokenizer.encode(p) for p in ("The for statement", "A list")]
    assert texts == [engine.tokenizer.decode(t) for t in engine.generate(ids).tokens]
    assert engine.generate_text(["Hello"], chat=True)[0] == engine.generate(
        [engine.encode_chat("Hello")]).texts[0]
    # One string is one prompt; a numpy batch of ids is a batch.
    assert engine.generate("The for statement").texts == texts[:1]
    batch = np.array([ids[0][:3], ids[1][:3]])
    assert engine.generate(batch).tokens == engine.generate(batch.tolist()).tokens


def test_prompt_past_the_model_window_is_refused_before_prefill(hf_folder):
    folder, _ = hf_folder("v2_lite")
    engine = ktjax.load(folder, max_new_tokens=8)
    window = engine.cfg.max_position_embeddings
    with pytest.raises(KtjaxError, match=f"exceeds the model's window of {window}"):
        engine.generate([[3] * window])
    out = engine.generate([[3] * window], truncate_left=True, max_new_tokens=2)
    assert out.stats["prompt_tokens"] == window - 2


def test_help_derives_from_the_table(capsys, monkeypatch):
    """Every flag, its help text as written (a % included: argparse %-formats help strings) and its choices."""
    seed = runtime.SETTINGS["seed"]
    monkeypatch.setitem(runtime.SETTINGS, "seed", dataclasses.replace(seed, help=seed.help + " (100% reproducible)"))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    words = " ".join(out.split())
    for key, setting in runtime.SETTINGS.items():
        assert "--" + key.replace("_", "-") in out
        assert " ".join(setting.help.split()) in words, key
        for choice in setting.choices:
            assert choice in out
    assert "(default: None)" not in out and "completion_ids" in out and "option_strings" not in out

