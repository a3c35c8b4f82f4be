"""python -m ktjax.generate, run in-process through main(argv): the demo, --json, a model folder with a
real-format tokenizer, the chat template, and bad input (exit code 2, one message)."""
import json
import os
import shutil

import pytest

from ktjax.cli.generate import main
from tokenizer_fixture import write_tokenizer

STATS_KEYS = {"prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
              "time_to_first_token_s", "compile_s", "cache_dtype", "cache_lens", "cache_bytes",
              "cache_bytes_per_token", "cache_bytes_per_device", "weight_bytes", "peak_memory_bytes", "devices",
              "backend"}


@pytest.fixture(scope="module")
def model_dir(hf_folder, tmp_path_factory):
    src, _ = hf_folder("v2_lite")
    dst = str(tmp_path_factory.mktemp("cli") / "model")
    shutil.copytree(src, dst)
    write_tokenizer(dst)
    return dst


def _run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_runs_with_no_arguments(capsys):
    rc, out, err = _run(capsys, ["--max-new-tokens", "6"])
    assert rc == 0
    assert out.startswith("The key to reading a long document is")
    assert "demo model" in err and "decode" in err and "B/token" in err


def test_json_schema_and_values(capsys, model_dir):
    rc, out, err = _run(capsys, ["--model", model_dir, "--prompt", "the quick brown fox", "--json",
                                 "--max-new-tokens", "7", "--ignore-eos", "--cache-dtype", "int8"])
    assert rc == 0
    line = out.strip().splitlines()[-1]
    assert " " not in line.split('"completion"')[0]  # compact
    data = json.loads(line)
    assert set(data) == {"completion", "completion_ids", "stats"}
    stats = data["stats"]
    assert STATS_KEYS <= set(stats)
    assert isinstance(data["completion"], str) and len(data["completion_ids"]) == 7
    assert stats["generated_tokens"] == 7 and stats["prompt_tokens"] >= 5
    assert stats["cache_dtype"] == "int8" and stats["cache_lens"] >= stats["prompt_tokens"] + 7
    assert stats["cache_bytes"] == stats["cache_lens"] * stats["cache_bytes_per_token"]
    assert stats["cache_bytes_per_device"] == stats["cache_bytes"] and stats["devices"] >= 1
    assert stats["weight_bytes"] > 0 and stats["peak_memory_bytes"] > stats["weight_bytes"]
    assert stats["decode_tokens_per_s"] > 0 and stats["time_to_first_token_s"] > 0 and stats["backend"] == "cpu"


def test_several_prompts_give_lists(capsys, model_dir):
    rc, out, _ = _run(capsys, ["--model", model_dir, "--prompt", "hello there", "--prompt", "the lazy dog and",
                               "--json", "--max-new-tokens", "3", "--ignore-eos"])
    data = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and len(data["completion"]) == 2 and [len(x) for x in data["completion_ids"]] == [3, 3]


def test_chat_prompt_matches_transformers_template(model_dir):
    from transformers import AutoTokenizer

    from ktjax.runtime.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "Reading a long document, the quick fox"}]
    ref = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    ours = Tokenizer.from_folder(model_dir)
    assert ours.encode_chat(messages) == list(ref)
    assert ours.encode("hello there")[0] == ours.bos_id  # add_bos_token: a plain prompt starts with BOS


def test_chat_flag_runs(capsys, model_dir):
    rc, out, _ = _run(capsys, ["--model", model_dir, "--chat", "--prompt", "hello", "--max-new-tokens", "3",
                               "--json"])
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["stats"]["prompt_tokens"] > 3


def test_yaml_preset_and_flags_win(capsys, model_dir, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"model: {model_dir}\ncache_dtype: int4\nchunk_size: 8\nmax_new_tokens: 2\n")
    rc, out, _ = _run(capsys, ["--config", str(preset), "--cache-dtype", "fp8", "--json", "--ignore-eos"])
    stats = json.loads(out.strip().splitlines()[-1])["stats"]
    assert rc == 0 and stats["cache_dtype"] == "fp8" and stats["generated_tokens"] == 2


def test_shipped_presets_are_valid():
    from ktjax.runtime.settings import load_yaml, resolve

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = sorted(os.listdir(root))
    assert names
    for name in names:
        settings = load_yaml(os.path.join(root, name))
        settings.pop("model", None)
        resolve(**settings)


@pytest.mark.parametrize("argv,message", [
    (["--cache-dtype", "int3"], "cache_dtype='int3'"),
    (["--model", "/nonexistent/model"], "no such folder"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt.txt"),
    (["--memory-budget", "lots"], "memory size 'lots'"),
    (["--temperature", "-1"], "temperature"),
    (["--cache-lens", "zero"], "cache_lens='zero'"),
    (["--chunk-size", "0"], "chunk_size='0'"),
])
def test_bad_input_exits_2_with_one_message(capsys, argv, message):
    rc, out, err = _run(capsys, argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_yaml_key(capsys, tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("cache_dtype: int8\nflash: true\n")
    rc, _, err = _run(capsys, ["--config", str(preset)])
    assert rc == 2 and "flash" in err and err.count("\n") == 1


def test_prompt_longer_than_cache_is_refused_before_work(capsys, model_dir):
    rc, out, err = _run(capsys, ["--model", model_dir, "--prompt", "the quick brown fox " * 20,
                                 "--cache-lens", "32", "--max-new-tokens", "4", "--json"])
    assert rc == 2 and "exceeds the cache of 32" in err and err.count("\n") == 1
    assert "{" not in out


def test_every_setting_is_documented_in_the_settings_doc():
    from ktjax.runtime.settings import SETTINGS

    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "settings.md")).read()
    for key in SETTINGS:
        assert f"`{key}`" in readme and f"`--{key.replace('_', '-')}`" in readme
