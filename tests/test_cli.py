"""python -m ktjax.generate, run in-process through main(argv): the demo, --json, a model folder with a
real-format tokenizer, the chat template, and bad input (exit code 2, one message)."""
import json
import os
import shutil

import pytest

from ktjax.cli.generate import main
from ktjax.errors import KtjaxError
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
    assert "weights 18.4 MiB (float32 copy of a 9.2 MiB bfloat16 checkpoint; --dtype sets it)" in err


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


def test_help_groups_common_flags_first_with_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    order = [out.index(f"\n{title}:\n") for title in ("options", "settings", "sampling", "memory", "advanced",
                                                     "examples")]
    assert order == sorted(order), order
    common = out[order[0]:order[1]]
    for flag in ("--model", "--prompt TEXT", "--prompt-file FILE", "--json", "--version"):
        assert flag in common, flag
    assert out.index("--temperature") > order[2] and out.index("--cache-lens") > order[3]
    assert out.index("--cpu-kernels") > order[4] and "--prompt-file report.txt" in out[order[5]:]


def test_version_names_ktjax_and_jax(capsys):
    from importlib import metadata

    import ktjax
    from ktjax.weights.convert import main as convert_main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert out == f"ktjax {ktjax.__version__} (jax {metadata.version('jax')}, jaxlib {metadata.version('jaxlib')})\n"
    assert convert_main(["--version"]) == 0 and capsys.readouterr().out == out


def test_an_instruction_and_a_file_make_one_prompt(capsys, model_dir, tmp_path):
    """--prompt with --prompt-file: one prompt, the instruction, a blank line, then the file; two files: two."""
    from ktjax.runtime.tokenizer import Tokenizer

    report, notes = tmp_path / "report.txt", tmp_path / "notes.txt"
    report.write_text("the quick brown fox jumps over the lazy dog")
    notes.write_text("a long document needs a small cache")
    argv = ["--model", model_dir, "--prompt", "Summarise this", "--prompt-file", str(report), "--json",
            "--max-new-tokens", "2", "--ignore-eos"]
    rc, out, _ = _run(capsys, argv)
    data = json.loads(out.strip().splitlines()[-1])
    encode = Tokenizer.from_folder(model_dir).encode
    assert rc == 0 and isinstance(data["completion"], str) and len(data["completion_ids"]) == 2
    assert data["stats"]["prompt_tokens"] == len(encode("Summarise this\n\n" + report.read_text()))
    rc, out, _ = _run(capsys, argv + ["--prompt-file", str(notes)])
    data = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and len(data["completion"]) == 2
    assert data["stats"]["prompt_tokens"] == sum(len(encode("Summarise this\n\n" + f.read_text()))
                                                 for f in (report, notes))
    rc, out, err = _run(capsys, ["--prompt", "a", "--prompt", "b", "--prompt-file", str(report)])
    assert rc == 2 and out == "" and "one --prompt" in err and err.count("\n") == 1


def test_truncate_left_cuts_the_file_and_keeps_the_instruction():
    import ktjax
    from ktjax.cli.generate import encode_prompt
    from ktjax.demo import DEMO_MODEL_DIR

    engine = ktjax.load(DEMO_MODEL_DIR, max_new_tokens=24, truncate_left=True)
    room = engine.cfg.max_position_embeddings - 24
    text = " ".join(f"line {i}." for i in range(3000))  # several windows long
    for chat in (False, True):
        encode = engine.encode_chat if chat else engine.tokenizer.encode
        ids = encode_prompt(engine, text, "--prompt-file f", chat, instruction="Summarise this")
        whole = encode("Summarise this\n\n" + text)
        read = engine.tokenizer.decode(ids)
        assert len(ids) == room and ids[-50:] == whole[-50:]  # the file's end, as the whole prompt has it
        assert "Summarise this\n\n" in read and "line 0." not in read and "line 2999." in read
        assert ids[:3] == whole[:3]  # the start (BOS, a chat template's opening) kept too
    with pytest.raises(KtjaxError, match="the instruction takes"):
        encode_prompt(engine, text, "--prompt-file f", instruction="word " * room)


def test_stats_say_why_the_weights_take_more_than_the_checkpoint():
    from ktjax.demo import DEMO_MODEL_DIR
    from ktjax.runtime.memory import stored_weights, weights_note
    from ktjax.util.units import format_bytes

    stored, _, _ = stored_weights(DEMO_MODEL_DIR)
    note = weights_note(DEMO_MODEL_DIR, "float32")
    assert note == f"float32 copy of a {format_bytes(stored)} bfloat16 checkpoint; --dtype sets it"
    assert weights_note(DEMO_MODEL_DIR, "bfloat16") is None  # held as stored (its float32 norms aside)
    assert weights_note(None, "float32") is None  # the random-weights demo: no folder
    # test_runs_with_no_arguments checks the line the command prints


def test_cpu_preset_runs_the_cpu_kernels(capsys):
    """configs/cpu.yaml picks what is fastest on a CPU: decode attention in the C++ kernel where it builds."""
    from ktjax.cpu.build import available

    preset = os.path.join(os.path.dirname(__file__), "..", "configs", "cpu.yaml")
    rc, out, _ = _run(capsys, ["--config", preset, "--json", "--max-new-tokens", "2"])
    stats = json.loads(out.strip().splitlines()[-1])["stats"]
    assert rc == 0 and stats["attention"] == ("cpu" if available() is None else "xla")
    assert stats["cache_dtype"] == "bf16" and stats["chunk_size"] == 512
