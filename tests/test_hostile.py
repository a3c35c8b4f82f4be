"""Hostile and faulty inputs (issues 14 and 32): every case ends with its exit code (2 bad input, 1 an I/O
failure, 130 interrupted) and one line of message, never a traceback or a hang; nothing is left behind and no
bystander file is touched. The damaged folders, flags and streams come from tests/hostile_cases.py."""
import errno
import fcntl
import io
import os
import re
import shutil
import signal
import sys

import pytest

import hostile_cases as hc
import ktjax
from ktjax.weights import convert as conversion
from ktjax.runtime import tokenizer as tokenizer_module
from ktjax.weights.checkpoint import CheckpointWriter
from ktjax.weights.convert import main as convert_main
from ktjax.errors import KtjaxError
from ktjax.cli.generate import main as generate_main

SENTINEL = "not yours to delete"
LEFTOVER_MARKS = (".partial-", ".old-", ".lock")


@pytest.fixture(autouse=True)
def signal_handlers():
    """The handlers these tests rely on, whatever the process started with (SIGINT begins ignored in a job
    started in the background, `nohup ... &`), and the previous ones put back afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """tmp_path, with the current folder moved into it and a bystander file there; `finish` checks the outcome."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text(SENTINEL)
    monkeypatch.chdir(cwd)
    return tmp_path


def finish(world, capsys, rc, code, pattern):
    """The exit code, one message line (the last line of stderr) matching `pattern`, no traceback, no leftovers
    anywhere under `world`, and the bystander file intact."""
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    messages = [line for line in err.splitlines() if line.startswith(("error:", "interrupted"))]
    assert len(messages) == 1 and messages[0] == err.strip().splitlines()[-1], err
    assert re.search(pattern, messages[0]), err
    leftovers = [os.path.join(r, n) for r, ds, fs in os.walk(world) for n in ds + fs
                 if any(mark in n for mark in LEFTOVER_MARKS)]
    assert not leftovers, leftovers
    assert (world / "cwd" / "keep.txt").read_text() == SENTINEL


def run_cli(folder, *flags):
    return generate_main(["--model", str(folder), "--max-new-tokens", "1", "--no-progress", *flags])


def run_api(folder, pattern):
    with pytest.raises(KtjaxError) as refused:
        ktjax.load(str(folder))
    assert re.search(pattern, str(refused.value)) and "\n" not in str(refused.value), refused.value


def convert(hf_dir, out, *flags):
    return convert_main(["--hf-dir", str(hf_dir), "--out", str(out), "--quiet", *flags])


# ---- model folders: the CLI, ktjax.load and the converter on each damage ------------------------------------

FOLDER_CASES = {**{f"header: {n}": hc.header_case(n) for n in hc.HEADERS},
                **{f"file: {n}": f for n, f in hc.SHARD_FILES.items()},
                **{f"weights: {n}": f for n, f in hc.NON_FINITE.items()},
                **{f"config: {n}": f for n, f in hc.CONFIGS.items()}}
GENERATION_CASES = {f"generation config: {n}": f for n, f in hc.GENERATION_CONFIGS.items()}
TOKENIZER_CASES = {**{f"tokenizer config: {n}": f for n, f in hc.TOKENIZER_CONFIGS.items()},
                   **{f"chat template: {n}": hc.chat_template(n) for n in hc.CHAT_TEMPLATES}}


@pytest.fixture
def model(world):
    return hc.model_copy(str(world / "model"))


@pytest.mark.parametrize("damage", {**FOLDER_CASES, **GENERATION_CASES, **TOKENIZER_CASES})
def test_cli_refuses_a_damaged_model_folder(world, model, capsys, monkeypatch, damage):
    monkeypatch.setattr(tokenizer_module, "TEMPLATE_SECONDS", 1.0)
    damage = {**FOLDER_CASES, **GENERATION_CASES, **TOKENIZER_CASES}[damage]
    pattern = damage(model)
    finish(world, capsys, run_cli(model, "--chat"), 2, pattern)


@pytest.mark.parametrize("damage", {**FOLDER_CASES, **GENERATION_CASES})
def test_load_refuses_a_damaged_model_folder(world, model, damage):
    run_api(model, {**FOLDER_CASES, **GENERATION_CASES}[damage](model))


@pytest.mark.parametrize("damage", FOLDER_CASES)
def test_converter_refuses_a_damaged_model_folder(world, model, capsys, damage):
    pattern = FOLDER_CASES[damage](model)
    out = world / "out" / "ckpt"
    finish(world, capsys, convert(model, out), 2, pattern)
    assert not out.exists()


# ---- converted checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "ckpt"
    assert convert(hc.DEMO_MODEL_DIR, out) == 0
    return out


@pytest.fixture
def checkpoint(world, demo_checkpoint):
    return shutil.copytree(demo_checkpoint, world / "ckpt")


CHECKPOINT_CASES = {**hc.CHECKPOINTS, **hc.CHECKPOINT_LIMITS}


@pytest.mark.parametrize("damage", CHECKPOINT_CASES)
def test_cli_refuses_a_damaged_checkpoint(world, checkpoint, capsys, damage):
    pattern = CHECKPOINT_CASES[damage](str(checkpoint))
    finish(world, capsys, run_cli(checkpoint), 2, pattern)


@pytest.mark.parametrize("damage", CHECKPOINT_CASES)
def test_load_refuses_a_damaged_checkpoint(world, checkpoint, damage):
    run_api(checkpoint, CHECKPOINT_CASES[damage](str(checkpoint)))


def test_an_intact_checkpoint_still_loads(checkpoint):
    assert ktjax.load(str(checkpoint)).logits([[1, 2, 3]]).shape == (1, 3, 2048)


# ---- the converter: where it writes ----------------------------------------------------------------------------

def _folder_with_sentinel(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "keep.txt").write_text(SENTINEL)
    return path


OUT_REFUSED = {
    "empty --out": (lambda w, m: "", "--out is empty"),
    "--out .": (lambda w, m: ".", "current folder or one of its parents"),
    "--out ..": (lambda w, m: "..", "current folder or one of its parents"),
    "--out the cwd by path": (lambda w, m: str(w / "cwd"), "current folder or one of its parents"),
    "--out /": (lambda w, m: "/", "current folder or one of its parents"),
    "--out inside --hf-dir": (lambda w, m: os.path.join(m, "ckpt"), "must lie outside --hf-dir"),
    "--out is --hf-dir": (lambda w, m: m, "must lie outside --hf-dir"),
    "--out exists": (lambda w, m: str(_folder_with_sentinel(w / "taken")), "already exists.*--overwrite"),
}


@pytest.mark.parametrize("case", OUT_REFUSED)
def test_converter_refuses_an_out_that_would_lose_data(world, model, capsys, case):
    where, pattern = OUT_REFUSED[case]
    finish(world, capsys, convert(model, where(world, model)), 2, pattern)
    assert sorted(os.listdir(model)) == sorted(os.listdir(hc.DEMO_MODEL_DIR))
    if case == "--out exists":
        assert (world / "taken" / "keep.txt").read_text() == SENTINEL


def test_converter_refuses_an_out_that_holds_hf_dir(world, capsys):
    outer = world / "outer"
    model = hc.model_copy(str(outer / "model"))
    finish(world, capsys, convert(model, outer, "--overwrite"), 2, "must lie outside --hf-dir")
    assert sorted(os.listdir(model)) == sorted(os.listdir(hc.DEMO_MODEL_DIR))


OVERWRITE_REFUSED = {
    "a folder that is not a checkpoint": (lambda w: _folder_with_sentinel(w / "docs"), "not a ktjax checkpoint"),
    "a file": (lambda w: (w / "notes.txt").write_text(SENTINEL) and w / "notes.txt", "not a folder"),
}


@pytest.mark.parametrize("case", OVERWRITE_REFUSED)
def test_overwrite_replaces_only_a_checkpoint(world, model, capsys, case):
    make, pattern = OVERWRITE_REFUSED[case]
    out = make(world)
    finish(world, capsys, convert(model, out, "--overwrite"), 2, pattern)
    assert SENTINEL in (out.read_text() if out.is_file() else (out / "keep.txt").read_text())


@pytest.mark.parametrize("hf_dir,flags,pattern", [
    ("nowhere", [], "no such folder"), ("keep.txt", [], "no such folder"),
    (None, ["--weights", "fp8"], "no FP8 weights"), (None, ["--weights", "int3"], "invalid choice"),
    (None, ["--int4-group", "7"], "invalid choice"), (None, ["--int4-group", "x"], "invalid int value"),
])
def test_converter_refuses_bad_flags(world, model, capsys, hf_dir, flags, pattern):
    finish(world, capsys, convert(hf_dir or model, world / "ckpt", *flags), 2, pattern)
    assert not (world / "ckpt").exists()


def test_a_second_converter_on_one_out_exits_2(world, model, capsys):
    lock = os.open(world / ".ckpt.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running conversion holds it
    try:
        rc = convert(model, world / "ckpt")
    finally:
        os.close(lock)
        os.remove(world / ".ckpt.lock")
    finish(world, capsys, rc, 2, "another conversion is writing it now")
    assert not (world / "ckpt").exists()


# ---- the converter: failures and signals while writing -----------------------------------------------------------

def _fail_on_first_write(monkeypatch, action):
    def write(self, key, array, dtype=None):
        action()
        raise AssertionError("the failure above should have stopped the conversion")
    monkeypatch.setattr(CheckpointWriter, "write", write)


def _raise(error):
    def action(*args):
        raise error
    return action


def _signal(*signums):
    def action():
        for s in signums:
            os.kill(os.getpid(), s)
    return action


WRITE_FAILURES = {
    "disk full (tensorstore)": (_raise(ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left")),
                                1, "writing .* failed: RESOURCE_EXHAUSTED"),
    "disk full (OSError)": (_raise(OSError(errno.ENOSPC, "No space left on device")), 1, "No space left"),
    "permission denied": (_raise(PermissionError(errno.EACCES, "Permission denied")), 1, "Permission denied"),
    "read-only file system": (_raise(OSError(errno.EROFS, "Read-only file system")), 1, "Read-only"),
    "Ctrl-C": (_raise(KeyboardInterrupt()), 130, "interrupted: nothing written"),
    "SIGTERM": (_signal(signal.SIGTERM), 130, "interrupted: nothing written"),
    "SIGINT": (_signal(signal.SIGINT), 130, "interrupted: nothing written"),
}


@pytest.mark.parametrize("failure", WRITE_FAILURES)
def test_failure_while_writing_leaves_nothing(world, model, capsys, monkeypatch, failure):
    action, code, pattern = WRITE_FAILURES[failure]
    _fail_on_first_write(monkeypatch, action)
    finish(world, capsys, convert(model, world / "ckpt"), code, pattern)
    assert not (world / "ckpt").exists()


def test_signals_during_clean_up_wait_for_it(world, model, capsys, monkeypatch):
    """Two more signals while the partial folder is removed (a double Ctrl-C): it is still removed in full."""
    real_rmtree = shutil.rmtree

    def rmtree_under_fire(path, *args, **kwargs):
        _signal(signal.SIGTERM, signal.SIGINT)()
        return real_rmtree(path, *args, **kwargs)

    _fail_on_first_write(monkeypatch, _signal(signal.SIGINT))
    monkeypatch.setattr(conversion.shutil, "rmtree", rmtree_under_fire)
    finish(world, capsys, convert(model, world / "ckpt"), 130, "interrupted: nothing written")


def _fake_checkpoint(plan, folder, quiet):
    """Stands in for the writing, where a test is about the move that follows."""
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write("{}")


@pytest.mark.parametrize("appears", [_folder_with_sentinel, os.mkdir])  # an empty folder: rename(2) would replace it
def test_out_that_appears_while_converting_is_left_alone(world, model, capsys, monkeypatch, appears):
    def write_then_someone_creates_out(plan, folder, quiet):
        _fake_checkpoint(plan, folder, quiet)
        appears(world / "ckpt")

    monkeypatch.setattr(conversion, "_write_checkpoint", write_then_someone_creates_out)
    finish(world, capsys, convert(model, world / "ckpt"), 2, "appeared while converting")
    assert os.listdir(world / "ckpt") == (["keep.txt"] if appears is _folder_with_sentinel else [])


def test_out_replaced_by_a_file_during_overwrite_is_left_alone(world, model, capsys, monkeypatch, demo_checkpoint):
    shutil.copytree(demo_checkpoint, world / "ckpt")

    def write_then_out_becomes_a_file(plan, folder, quiet):
        _fake_checkpoint(plan, folder, quiet)
        shutil.rmtree(world / "ckpt")
        (world / "ckpt").write_text(SENTINEL)

    monkeypatch.setattr(conversion, "_write_checkpoint", write_then_out_becomes_a_file)
    finish(world, capsys, convert(model, world / "ckpt", "--overwrite"), 2, "no longer a ktjax checkpoint")
    assert (world / "ckpt").read_text() == SENTINEL


def test_user_data_put_at_out_during_overwrite_is_left_alone(world, model, capsys, monkeypatch, demo_checkpoint):
    shutil.copytree(demo_checkpoint, world / "ckpt")

    def write_then_out_becomes_user_data(plan, folder, quiet):
        _fake_checkpoint(plan, folder, quiet)
        shutil.rmtree(world / "ckpt")
        _folder_with_sentinel(world / "ckpt")

    monkeypatch.setattr(conversion, "_write_checkpoint", write_then_out_becomes_user_data)
    finish(world, capsys, convert(model, world / "ckpt", "--overwrite"), 2, "no longer a ktjax checkpoint")
    assert os.listdir(world / "ckpt") == ["keep.txt"]


def test_a_failed_overwrite_puts_the_old_checkpoint_back(world, model, capsys, monkeypatch, demo_checkpoint):
    shutil.copytree(demo_checkpoint, world / "ckpt")
    (world / "ckpt" / "keep.txt").write_text(SENTINEL)
    monkeypatch.setattr(conversion, "_write_checkpoint", _fake_checkpoint)
    monkeypatch.setattr(conversion, "_rename_noreplace", _raise(OSError(errno.EIO, "Input/output error")))
    finish(world, capsys, convert(model, world / "ckpt", "--overwrite"), 1, "Input/output error")
    assert (world / "ckpt" / "keep.txt").read_text() == SENTINEL


def test_a_signal_during_the_final_move_says_the_checkpoint_is_complete(world, model, capsys, monkeypatch):
    real_move = conversion._move_into_place

    def move_under_fire(*args):
        os.kill(os.getpid(), signal.SIGINT)
        real_move(*args)

    monkeypatch.setattr(conversion, "_write_checkpoint", _fake_checkpoint)
    monkeypatch.setattr(conversion, "_move_into_place", move_under_fire)
    finish(world, capsys, convert(model, world / "ckpt"), 130, "interrupted after .* was written in full")
    assert (world / "ckpt" / "manifest.json").exists()


def test_an_interrupted_overwrite_is_recovered_by_the_next_run(world, model, capsys):
    """Killed between its two renames: the old checkpoint sits in its backup and --out is missing."""
    _folder_with_sentinel(world / ".ckpt.old-abc123")
    finish(world, capsys, convert(model, world / "ckpt"), 2, "restored from .*old-abc123.*--overwrite")
    assert (world / "ckpt" / "keep.txt").read_text() == SENTINEL


def test_a_killed_conversion_s_partial_folder_is_removed_by_the_next(world, model, capsys, monkeypatch):
    _folder_with_sentinel(world / ".ckpt.partial-xyz")
    monkeypatch.setattr(conversion, "_write_checkpoint", _fake_checkpoint)
    assert convert(model, world / "ckpt") == 0
    assert "removed" in capsys.readouterr().err
    assert not (world / ".ckpt.partial-xyz").exists() and (world / "ckpt" / "manifest.json").exists()


# ---- the CLI's own inputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,pattern", [
    (["--model", "nowhere"], "no such folder"),
    (["--model", "keep.txt"], "no such folder"),
    (["--model", "."], "neither a Hugging Face folder"),
    (["--prompt-file", "nowhere.txt"], "--prompt-file nowhere.txt"),
    (["--prompt", ""], "a prompt is empty"),
    (["--cache-dtype", "int3"], "int3"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_refuses_bad_arguments(world, capsys, argv, pattern):
    finish(world, capsys, generate_main(argv), 2, pattern)


def _yaml(text):
    def make(world):
        (world / "preset.yaml").write_text(text)
        return ["--config", str(world / "preset.yaml")]
    return make


def _fifo(world):
    os.mkfifo(world / "prompt.fifo")
    return ["--prompt-file", str(world / "prompt.fifo")]


def _no_tokenizer(world):
    folder = hc.model_copy(str(world / "model"))
    os.remove(os.path.join(folder, "tokenizer.json"))
    return ["--model", folder]


SETTING_CASES = {  # each: world -> argv, and the message's pattern
    "temperature nan": (lambda w: ["--temperature", "nan"], "temperature='nan'"),
    "temperature inf": (lambda w: ["--temperature", "inf"], "temperature='inf'"),
    "top-k 1e12": (lambda w: ["--top-k", "1000000000000"], "top_k="),
    "seed 10**23": (lambda w: ["--seed", str(10**23)], "seed="),
    "memory budget 1e999": (lambda w: ["--memory-budget", "1e999"], "memory size '1e999'"),
    "memory budget 0": (lambda w: ["--memory-budget", "0GB"], "memory size '0GB'"),
    "cache lens -1": (lambda w: ["--cache-lens", "-1"], "cache_lens='-1'"),
    "mesh 0x2": (lambda w: ["--mesh", "0x2"], "mesh='0x2'"),
    "config is a folder": (lambda w: ["--config", str(w)], "a folder, not a YAML config file"),
    "config missing": (lambda w: ["--config", str(w / "none.yaml")], "config file not found"),
    "yaml temperature hot": (_yaml("temperature: hot\n"), "temperature='hot'"),
    "yaml cache_lens true": (_yaml("cache_lens: true\n"), "cache_lens=True"),
    "yaml a list": (_yaml("- 1\n- 2\n"), "expected a mapping"),
    "yaml unknown key": (_yaml("flash: true\n"), "unknown setting"),
    "yaml broken": (_yaml("a: [1,\n"), "not valid YAML"),
    "yaml model a number": (_yaml("model: 3\n"), "model must be a folder path"),
    "prompt file a FIFO": (_fifo, "not a regular file"),
    "model without tokenizer.json": (_no_tokenizer, "no tokenizer.json"),
    "prompt past the window": (lambda w: ["--prompt", "ab " * 2000, "--max-new-tokens", "1"],
                               r"exceeds the model's window of 1024 positions"),
}


@pytest.mark.parametrize("case", SETTING_CASES)
def test_cli_refuses_bad_settings_and_prompts(world, capsys, case):
    """Settings are refused by their one parser (flags and YAML alike), prompts before any prefill."""
    make, pattern = SETTING_CASES[case]
    finish(world, capsys, generate_main(make(world)), 2, pattern)


# ---- the command lines' flags, presets, text, stdout and signals (issue 32) --------------------------------------

@pytest.mark.parametrize("case", hc.GENERATE_ARGS)
def test_generate_refuses_flags_presets_and_prompts_past_a_bound(world, capsys, case):
    """Structured input past a limit, text that cannot be UTF-8, a prompt that cannot fit: one line, exit 2."""
    make, pattern = hc.GENERATE_ARGS[case]
    argv = make(world)
    argv += [] if "--max-new-tokens" in argv else ["--max-new-tokens", "1"]
    finish(world, capsys, generate_main([*argv, "--no-progress"]), 2, pattern)


@pytest.mark.parametrize("case", hc.SERVE_ARGS)
def test_serve_refuses_flags_and_presets_past_a_bound(world, capsys, case):
    from ktjax.cli.serve import main as serve_main

    make, pattern = hc.SERVE_ARGS[case]
    finish(world, capsys, serve_main(make(world)), 2, pattern)


@pytest.mark.parametrize("case", hc.CONVERT_ARGS)
def test_converter_refuses_paths_that_are_not_utf8(world, capsys, case):
    where, pattern = hc.CONVERT_ARGS[case]
    hf_dir, out = where(str(world))
    finish(world, capsys, convert(hf_dir, out), 2, pattern)
    assert os.listdir(world) == ["cwd"]


def _with_stdout(monkeypatch, make):
    stream = make()
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


@pytest.mark.parametrize("command", ["generate", "convert --dry-run"])
@pytest.mark.parametrize("case", hc.STDOUTS)
def test_a_stdout_that_fails_ends_with_one_line_and_exit_1(world, model, capsys, monkeypatch, case, command):
    make, code, pattern = hc.STDOUTS[case]
    stream = _with_stdout(monkeypatch, make)
    try:
        rc = (generate_main(["--max-new-tokens", "2", "--no-progress"]) if command == "generate" else
              convert(model, world / "ckpt", "--dry-run"))
    finally:
        if stream is not None:
            stream.close()  # the failed bytes now go to /dev/null: closing raises nothing
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if pattern is None:  # a broken pipe: the reader took what it wanted, nothing to say
        assert errors == [], err
    else:
        assert len(errors) == 1 and re.search(pattern, errors[0]) and err.strip().endswith(errors[0]), err
    assert not (world / "ckpt").exists()


@pytest.fixture(scope="module")
def engine():
    return ktjax.load(hc.DEMO_MODEL_DIR, max_new_tokens=2)


@pytest.mark.parametrize("case", hc.TOKEN_IDS)
def test_token_ids_must_be_integers(engine, case):
    prompts, pattern = hc.TOKEN_IDS[case]
    with pytest.raises(KtjaxError, match=pattern):
        if prompts is None:  # the chat template's path
            engine.generate_text(["a\ud800b"], chat=True)
        else:
            engine.generate(prompts)


def test_whole_integer_ids_of_any_integer_type_are_the_same_prompt(engine):
    import numpy as np

    expected = engine.generate([[1, 2, 3]]).tokens
    assert engine.generate(np.array([[1, 2, 3]], np.int32)).tokens == expected
    assert engine.generate([(np.int64(1), 2, 3)]).tokens == expected


# ---- prompts: stdin, and only what the window can hold read and tokenized ----------------------------------------

def test_prompt_file_dash_reads_stdin_with_a_cap(monkeypatch):
    from ktjax.cli import generate as cli

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("piped prompt é".encode())))
    assert cli.read_prompt_file("-") == "piped prompt é"
    monkeypatch.setattr(cli, "MAX_PROMPT_BYTES", 10)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x" * 11)))
    with pytest.raises(KtjaxError, match="more than 0 MiB on stdin"):
        cli.read_prompt_file("-")


def test_truncate_left_reads_a_file_s_end_from_a_whole_character(tmp_path, monkeypatch):
    from ktjax.cli import generate as cli

    path = tmp_path / "prompt.txt"
    path.write_text("a" + "é" * 2500)  # 5001 bytes; the last 999 begin inside an "é"
    monkeypatch.setattr(cli, "MAX_PROMPT_BYTES", 999)
    assert cli.read_prompt_file(str(path), tail=True) == "é" * 499
    with pytest.raises(KtjaxError, match="5001 bytes, more than any model's window holds"):
        cli.read_prompt_file(str(path))


def test_truncate_left_tokenizes_only_the_end_and_keeps_the_same_tokens(monkeypatch):
    """The window keeps the last tokens; tokenizing only the end (window x the longest token's bytes, and a
    margin) gives those same tokens as tokenizing the whole text does."""
    from ktjax.cli.generate import encode_prompt, max_token_bytes

    engine = ktjax.load(hc.DEMO_MODEL_DIR, max_new_tokens=24, truncate_left=True)
    with open(__file__, encoding="utf-8") as f:
        text = f.read() * 20  # hundreds of kilobytes of code and prose: over 100,000 tokens
    whole = engine.tokenizer.encode(text)
    seen = []
    real_encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda t: seen.append(len(t.encode())) or real_encode(t))
    ids = encode_prompt(engine, text, "--prompt-file README.md")
    room = engine.cfg.max_position_embeddings - 24
    assert seen and seen[0] <= (room + 64) * max_token_bytes(engine.tokenizer) < len(text.encode()) // 10
    assert ids[-room:] == whole[-room:]


def test_a_prompt_past_the_window_is_refused_before_it_is_tokenized(monkeypatch):
    from ktjax.cli.generate import encode_prompt

    engine = ktjax.load(hc.DEMO_MODEL_DIR, max_new_tokens=8)
    monkeypatch.setattr(engine.tokenizer, "encode", lambda t: pytest.fail("tokenized a prompt that cannot fit"))
    with pytest.raises(KtjaxError, match=r"2000000 bytes are at least 55556 tokens"):
        encode_prompt(engine, "ab " * 666_666 + "ab", "--prompt-file big.txt")


# ---- signals: from the first import to the last byte ------------------------------------------------------------

@pytest.mark.parametrize("signum,line", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted by SIGTERM")])
def test_a_signal_while_generating_stops_with_one_line_and_130(world, capsys, monkeypatch, signum, line):
    from ktjax.runtime.engine import Engine

    real_generate = Engine.generate

    def generate_under_fire(self, prompts, **kwargs):
        start = kwargs.get("on_start")

        def on_start():
            os.kill(os.getpid(), signum)  # raises here, in the main thread, through generate's own handler
            start()
        return real_generate(self, prompts, **{**kwargs, "on_start": on_start})

    monkeypatch.setattr(Engine, "generate", generate_under_fire)
    before = signal.getsignal(signal.SIGTERM)
    finish(world, capsys, generate_main(["--max-new-tokens", "2", "--no-progress"]), 130, f"^{line}$")
    assert signal.getsignal(signal.SIGTERM) is before  # main() put the handlers back


SELF_SIGNALLING = '''
import os, signal
os.kill(os.getpid(), signal.{sig})  # as Ctrl-C or a SIGTERM while the command's modules are imported
def main():
    return 0
'''


@pytest.mark.parametrize("sig,line", [("SIGINT", "interrupted"), ("SIGTERM", "interrupted by SIGTERM")])
def test_a_signal_during_imports_stops_with_one_line_and_130(world, capsys, monkeypatch, sig, line):
    from ktjax.util.process import run_main

    (world / f"signals_at_import_{sig}.py").write_text(SELF_SIGNALLING.format(sig=sig))
    monkeypatch.syspath_prepend(str(world))
    finish(world, capsys, run_main(f"signals_at_import_{sig}"), 130, f"^{line}$")
    # and after main() has its code, a late signal changes nothing (Python restores the default handlers while
    # it exits: a SIGTERM there would turn exit 0 into 143)
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_an_ignored_sigint_stays_ignored(world, monkeypatch):
    """A job started with `&` by a script, or under nohup, begins with SIGINT ignored: the command keeps it so."""
    from ktjax.util.process import run_main

    (world / "ignored_sigint.py").write_text(SELF_SIGNALLING.format(sig="SIGINT"))
    monkeypatch.syspath_prepend(str(world))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert run_main("ignored_sigint") == 0
