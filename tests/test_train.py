"""ktjax/demo/train.py: a few steps of a fresh model on a little text, exported in Hugging Face format, read
back by ktjax with the same logits; bad stage specifications and an --out that would replace a folder stop
with a message."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ktjax
from ktjax.demo import train
from ktjax.model.decoder import RunOptions


def test_trains_and_exports_a_folder_ktjax_reads_back(tmp_path, capsys):
    from ktjax.demo.passkey import HELDOUT_TEXT

    (tmp_path / "text").mkdir()
    shutil.copy(HELDOUT_TEXT, tmp_path / "text" / "docs.txt")
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("replaced by --overwrite")
    model, raw = train.main(["--out", str(out), "--overwrite", "--text-dir", str(tmp_path / "text"),
                             "--vocab-size", "300", "--stages", "48:2:2:0.5,64:2:1:1.0", "--eval-every", "1",
                             "--dtype", "float32"])
    log = capsys.readouterr().out
    assert "step 3/3" in log and "pass-key@64" in log and "cut its answer off" in log  # 300 tokens: long keys
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["model", "text"]  # no temporary or old folder left beside it
    assert raw["max_position_embeddings"] == 4 * 64 and raw["vocab_size"] == 300
    ids = np.random.default_rng(0).integers(0, 300, (2, 16))
    ref = np.asarray(model(ids, RunOptions(absorb=False)))
    got = ktjax.load(str(out)).logits(ids)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("spec", ["64:8:10", "64:8:ten:0.5", "64x8x10x0.5", "64:8:10:1.5", "64:0:10:0.5"])
def test_bad_stages_stop_with_a_message(spec):
    with pytest.raises(SystemExit, match="--stages"):
        train.parse_stages(spec)


def test_out_is_required_and_a_folder_is_only_replaced_with_overwrite(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main([])
    assert stop.value.code == 2 and "--out" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_module_entry_point_names_itself():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "ktjax.train", "--help"], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m ktjax.train ")
