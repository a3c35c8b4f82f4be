"""Models by their Hugging Face Hub id (ktjax/weights/hub.py), against a hub cache built here in huggingface_hub's
layout (models--org--name/{blobs, snapshots/<commit>, refs}) from the demo model. Nothing here touches the network:
HF_HUB_OFFLINE is set, and the Hub's address is a closed local port, so a leak would be refused, not sent."""
import argparse
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import ktjax
from ktjax.cli import generate, serve
from ktjax.demo import DEMO_MODEL_DIR
from ktjax.errors import KtjaxError
from ktjax.weights import convert
from ktjax.weights.checkpoint import read_manifest
from ktjax.weights.hub import IGNORED, MODEL_FILES, resolve_model

REPO = "ktjax-test/demo"
MAIN, TAGGED = "a" * 40, "b" * 40  # commits: main, and the tag v1
IDS = [[1, 5, 9, 2, 7, 3]]
PROMPT = "The for statement"


def _add_snapshot(root, repo, commit, files, refs=("main",)):
    """One snapshot as huggingface_hub writes it: each file a blob named by its hash, linked from snapshots/."""
    storage = os.path.join(root, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    for sub in ("blobs", "refs", snapshot):
        os.makedirs(os.path.join(storage, sub), exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(storage, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(storage, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache root, {name: snapshot folder}): the demo model at main and at tag v1, and three broken snapshots."""
    root = str(tmp_path_factory.mktemp("hub"))
    demo = {}
    for f in os.listdir(DEMO_MODEL_DIR):
        with open(os.path.join(DEMO_MODEL_DIR, f), "rb") as fh:
            demo[f] = fh.read()
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    sharded = {"config.json": demo["config.json"], "model.safetensors.index.json": json.dumps(index).encode(),
               "model-00001-of-00002.safetensors": demo["model.safetensors"]}  # the second shard never arrived
    snapshots = {"main": _add_snapshot(root, REPO, MAIN, demo),
                 "v1": _add_snapshot(root, REPO, TAGGED, demo, refs=("v1",)),
                 "partial": _add_snapshot(root, "ktjax-test/partial", MAIN,
                                          {k: v for k, v in demo.items() if k != "model.safetensors"}),
                 "sharded": _add_snapshot(root, "ktjax-test/sharded", MAIN, sharded),
                 "dangling": _add_snapshot(root, "ktjax-test/dangling", MAIN, demo)}
    os.remove(os.path.realpath(os.path.join(snapshots["dangling"], "model.safetensors")))  # its blob was deleted
    return root, snapshots


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """A look-up of any host but this machine is refused and fails the test: nothing here may reach the network."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            asked.append(host)
            raise OSError(f"test_hub: no network (asked for {host})")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not asked, f"the network was asked for {asked}"


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: connecting to it is refused, locally
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _use_cache(monkeypatch, root, offline=True):
    """huggingface_hub reads its environment once, at import: the variables are set and its constants patched."""
    from huggingface_hub import constants

    endpoint = _closed_port_url()
    for var, value in (("HF_HUB_CACHE", root), ("HF_HUB_OFFLINE", "1" if offline else "0"), ("HF_ENDPOINT", endpoint)):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", root)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)


@pytest.fixture
def offline_hub(hub, monkeypatch):
    _use_cache(monkeypatch, hub[0])
    return hub[1]


@pytest.fixture(scope="module")
def folder_logits():
    return ktjax.load(DEMO_MODEL_DIR).logits(IDS)


def test_names_and_revisions_resolve_to_their_snapshots(offline_hub):
    assert resolve_model(REPO) == offline_hub["main"]
    assert resolve_model(REPO + "@main") == offline_hub["main"]
    assert resolve_model(REPO + "@v1") == offline_hub["v1"]
    assert resolve_model(f"{REPO}@{TAGGED}") == offline_hub["v1"]  # a commit needs no ref
    args = argparse.Namespace(served_model_name=None, model=offline_hub["v1"])
    assert serve.served_name(args) == REPO


def test_a_local_path_of_that_name_wins(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("ktjax-test/demo")
    assert resolve_model(REPO) == REPO
    with open("ktjax-test/file", "w") as f:
        f.write("not a model")
    assert resolve_model("ktjax-test/file") == "ktjax-test/file"  # the caller's checks refuse it


def test_generate_by_name_gives_the_local_folders_tokens(offline_hub, capsys):
    def completion(model):
        argv = ["--model", model, "--prompt", PROMPT, "--max-new-tokens", "8", "--json"]
        assert generate.main(argv) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    by_name, by_folder = completion(REPO), completion(DEMO_MODEL_DIR)
    assert by_name["completion_ids"] == by_folder["completion_ids"]
    assert by_name["completion"] == by_folder["completion"] and by_name["completion"]


def test_chat_by_name_gives_the_local_folders_replies(offline_hub, capsys, monkeypatch):
    """The README's path for a new user: a chat with a model named by its hub id (from a prepared cache)."""
    from ktjax.cli import chat

    def replies(model):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello there\nAnd again?\n/stats\n")))
        assert chat.main(["--model", model, "--max-new-tokens", "8", "--temperature", "0"]) == 0
        return capsys.readouterr().out

    by_name, by_folder = replies(REPO), replies(DEMO_MODEL_DIR)
    talk, stats = by_name.split("conversation:")
    assert talk.strip() and talk == by_folder.split("conversation:")[0]  # the same replies (speeds differ)
    assert "2 turns" in stats


def test_load_by_name_gives_the_local_folders_logits(offline_hub, folder_logits):
    engine = ktjax.load(REPO + "@v1")
    assert engine.tokenizer is not None
    np.testing.assert_array_equal(engine.logits(IDS), folder_logits)


def test_converter_reads_a_hub_id(offline_hub, folder_logits, tmp_path):
    out = str(tmp_path / "converted")
    assert convert.main(["--hf-dir", REPO, "--out", out, "--quiet"]) == 0
    assert read_manifest(out)["source"] == offline_hub["main"]
    np.testing.assert_array_equal(ktjax.load(out).logits(IDS), folder_logits)


BAD_NAMES = [  # (name, pattern of the one message); offline, with the cache above
    ("ktjax-test/unknown", "not in the Hugging Face cache .*HF_HUB_OFFLINE is set"),
    (REPO + "@no-such-branch", "not in the Hugging Face cache"),
    ("", "is empty"),
    ("../x", "no such folder, nor a Hugging Face model id"),
    ("a/b/c", "no such folder, nor a Hugging Face model id"),
    ("ktjax-test/demo@../../refs/main", "nor a Hugging Face model id"),  # a revision may not leave refs/
    ("ktjax-test/demo@", "nor a Hugging Face model id"),
    ("org--x/y", "nor a Hugging Face model id"),
    ("x./y", "nor a Hugging Face model id"),
    ("ktjax-test/partial", r"lacks weights \(\*\.safetensors\): an interrupted download"),
    ("ktjax-test/dangling", r"lacks weights \(\*\.safetensors\)"),
    ("ktjax-test/sharded", "lacks model-00002-of-00002.safetensors: an interrupted download"),
]


def _one_error_line(err: str, pattern: str):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("name,pattern", BAD_NAMES)
def test_bad_names_are_one_message_everywhere(offline_hub, tmp_path, capsys, monkeypatch, name, pattern):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative names ("../x") resolve inside tmp_path, whatever lies beside the run
    for main, argv in ((generate.main, ["--model", name]), (serve.main, ["--model", name]),
                       (convert.main, ["--hf-dir", name, "--out", str(tmp_path / "out")])):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == ""
        _one_error_line(err, pattern)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(KtjaxError, match=pattern):
        ktjax.load(name)


def test_without_network_a_cached_model_runs_and_an_unknown_one_says_so(hub, monkeypatch, capsys):
    _use_cache(monkeypatch, hub[0], offline=False)  # the Hub's address refuses connections: no network
    assert resolve_model(REPO) == hub[1]["main"]
    assert generate.main(["--model", "ktjax-test/unknown"]) == 2
    _one_error_line(capsys.readouterr().err, r"not in the Hugging Face cache .*cannot be reached; check the network")


def test_hf_home_is_read_from_the_environment(hub, tmp_path):
    home = tmp_path / "hf_home"
    home.mkdir()
    os.symlink(hub[0], home / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_ENDPOINT=_closed_port_url())
    code = f"from ktjax.weights.hub import resolve_model; print(resolve_model({REPO!r}))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert os.path.realpath(run.stdout.strip()) == os.path.realpath(hub[1]["main"])


def test_downloads_only_what_ktjax_reads():
    from huggingface_hub.utils import filter_repo_objects

    shards = [f"model-0000{i}-of-000004.safetensors" for i in range(1, 5)]
    read = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", *shards]
    repo = read + [".gitattributes", "LICENSE", "README.md", "configuration_deepseek.py", "modeling_deepseek.py",
                   "pytorch_model.bin", "original/consolidated.safetensors", "figures/badge.png"]
    assert sorted(filter_repo_objects(repo, allow_patterns=MODEL_FILES, ignore_patterns=IGNORED)) == sorted(read)
