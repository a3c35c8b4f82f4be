"""Checkpoint integrity (issue 32): chunks carry crc32c, the manifest one digest per array, old checkpoints load
with a note; and the converter's --overwrite leaves nothing named `.old-*` that does not hold the old checkpoint.
The damage cases themselves are rows of tests/hostile_cases.py (CHECKPOINTS), run by tests/test_hostile.py."""
import json
import os
import shutil
import stat

import numpy as np
import pytest
import tensorstore as ts

from ktjax.demo import DEMO_MODEL_DIR
from ktjax.errors import KtjaxError
from ktjax.weights import checkpoint as ck
from ktjax.weights import convert as conversion


def _convert(out, *flags):
    return conversion.main(["--hf-dir", DEMO_MODEL_DIR, "--out", str(out), "--quiet", *flags])


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "ckpt"
    assert _convert(out) == 0
    return out


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: the check value of b"123456789" is
    0xE3069283 (RFC 3720, B.4)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_each_chunk_ends_with_the_crc32c_of_its_bytes(demo_ckpt):
    assert _crc32c(b"123456789") == 0xE3069283
    chunk = demo_ckpt / "params" / "norm.weight" / "c" / "0"
    raw = chunk.read_bytes()
    values = ck.read_tensor(str(demo_ckpt), "norm.weight")
    assert raw[:-4] == values.astype(values.dtype.newbyteorder("<")).tobytes()  # little-endian values, then crc
    assert int.from_bytes(raw[-4:], "little") == _crc32c(raw[:-4])


def test_the_manifest_holds_one_digest_per_array(demo_ckpt):
    manifest = ck.read_manifest(str(demo_ckpt))
    assert manifest["digests"] == ck.DIGESTS
    digests = [t["digest"] for t in manifest["tensors"].values()]
    assert len(set(digests)) == len(digests) == manifest["tensor_count"]
    for key, entry in manifest["tensors"].items():
        ck.verify_array(str(demo_ckpt), key, entry)


def test_a_writer_used_layer_by_layer_seals_every_array(tmp_path):
    """CheckpointWriter's public use (benchmarks write large random checkpoints so): create + slice writes."""
    writer = ck.CheckpointWriter(str(tmp_path))
    experts = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)
    store = writer.create("layers/000/mlp.w_up", experts.shape, np.float32)
    for j in range(4):
        store[j].write(experts[j]).result()
    writer.write("norm.weight", np.ones(5, np.float32))
    writer.write_manifest(note="test")
    manifest = ck.read_manifest(str(tmp_path))
    for key, entry in manifest["tensors"].items():
        ck.verify_array(str(tmp_path), key, entry)
    assert np.array_equal(ck.read_tensor(str(tmp_path), "layers/000/mlp.w_up"), experts)


def test_a_chunk_never_written_fails_the_manifest_naming_the_array(tmp_path):
    writer = ck.CheckpointWriter(str(tmp_path))
    store = writer.create("layers/000/mlp.w_up", (4, 3, 5), np.float32)
    store[0].write(np.ones((3, 5), np.float32)).result()  # experts 1..3 never written
    with pytest.raises(KtjaxError, match=r"'layers/000/mlp.w_up': chunk params/layers/000/mlp.w_up/c/1/0/0 is "
                                         "missing"):
        writer.write_manifest()
    assert not os.path.exists(tmp_path / ck.MANIFEST)


def test_orbax_restores_the_arrays_ktjax_loads(demo_ckpt):
    """params/ is an Orbax PyTree checkpoint (issue 27): Orbax's own API restores every stored array, and
    stacked by layer and cast as ktjax.load does, they are the loaded model's parameters."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from ktjax.weights import params

    restored = ocp.PyTreeCheckpointer().restore(str(demo_ckpt / "params"))
    tensors = ck.read_manifest(str(demo_ckpt))["tensors"]
    assert set(restored) == set(tensors)
    for key, entry in tensors.items():
        assert restored[key].dtype.name == entry["dtype"] and list(restored[key].shape) == entry["shape"], key
    cfg, model = ck.load_checkpoint(str(demo_ckpt))
    used = set()
    for path, loaded in jax.tree_util.tree_leaves_with_path(nnx.state(model).to_pure_dict()):
        stack, keys = ck._param_keys(cfg, params.key_names(path))
        parts = [np.asarray(restored[k]).astype(loaded.dtype) for k in keys]
        assert np.array_equal(np.stack(parts) if stack else parts[0], np.asarray(loaded)), keys[0]
        used |= set(keys)
    assert used == set(tensors)  # every stored array is compared


def _as_written_before_digests(src, dst):
    """The checkpoint as ktjax wrote it before issue 32: arrays without the crc32c codec, no digests."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("params"))
    manifest = json.loads((src / ck.MANIFEST).read_text())
    del manifest["digests"]
    for key, entry in manifest["tensors"].items():
        entry.pop("digest")
        values = ck.read_tensor(str(src), key)
        chunks = json.loads((src / "params" / key / "zarr.json").read_text())["chunk_grid"]["configuration"]
        store = ts.open(ck._spec(str(dst), key), create=True, dtype=ts.dtype(values.dtype.name), shape=values.shape,
                        chunk_layout=ts.ChunkLayout(write_chunk_shape=chunks["chunk_shape"])).result()
        store.write(values).result()
        assert [c["name"] for c in json.loads((dst / "params" / key / "zarr.json").read_text())["codecs"]] == \
            ["bytes"]
    (dst / ck.MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_a_checkpoint_written_before_digests_loads_with_a_note(demo_ckpt, tmp_path, capsys):
    old = _as_written_before_digests(demo_ckpt, tmp_path / "old")
    _, new_model = ck.load_checkpoint(str(demo_ckpt))
    assert "not verified" not in capsys.readouterr().err
    _, old_model = ck.load_checkpoint(str(old))
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"note: {old} ") and "not verified" in note[0], note
    import jax
    from flax import nnx
    for a, b in zip(jax.tree.leaves(nnx.state(new_model)), jax.tree.leaves(nnx.state(old_model))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_an_old_checkpoint_s_chunks_must_still_be_regular_files(demo_ckpt, tmp_path):
    old = _as_written_before_digests(demo_ckpt, tmp_path / "old")
    chunk = old / "params" / "layers" / "002" / "mlp.w_gate" / "c" / "3" / "0" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(KtjaxError, match=r"'layers/002/mlp.w_gate': .*c/3/0/0 is a FIFO, not a regular file"):
        ck.load_checkpoint(str(old))


# ---- the converter's folders ----------------------------------------------------------------------------

def _named(root, mark):
    return [os.path.join(r, n) for r, ds, fs in os.walk(root) for n in ds + fs if mark in n]


def _fake_checkpoint(plan, folder, quiet):
    """Stands in for the writing where a test is about the folders around it."""
    with open(os.path.join(folder, ck.MANIFEST), "w") as f:
        json.dump({"format": ck.FORMAT, "written_by": "this test"}, f)


def test_overwrite_through_a_symlinked_out_replaces_its_target(demo_ckpt, tmp_path, monkeypatch):
    target = shutil.copytree(demo_ckpt, tmp_path / "disk" / "ckpt")
    (tmp_path / "link").symlink_to(target)
    monkeypatch.setattr(conversion, "_write_checkpoint", _fake_checkpoint)
    assert _convert(tmp_path / "link", "--overwrite") == 0
    assert os.readlink(tmp_path / "link") == str(target)
    assert json.loads((target / ck.MANIFEST).read_text())["written_by"] == "this test"  # replaced in the target
    assert _named(tmp_path, ".old-") == [] and _named(tmp_path, ".partial-") == []


def test_overwrite_interrupted_before_its_first_rename_leaves_no_old_folder(demo_ckpt, tmp_path, capsys,
                                                                            monkeypatch):
    out = shutil.copytree(demo_ckpt, tmp_path / "ckpt")
    before = (out / ck.MANIFEST).read_text()
    monkeypatch.setattr(conversion, "_write_checkpoint", _fake_checkpoint)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "_rename_noreplace", interrupted)
    assert _convert(out, "--overwrite") == 130
    assert (out / ck.MANIFEST).read_text() == before
    assert _named(tmp_path, ".old-") == [] and _named(tmp_path, ".partial-") == []


def test_leftover_old_folders_are_named_by_what_they_hold(demo_ckpt, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(demo_ckpt, tmp_path / "ckpt")
    monkeypatch.setattr(conversion, "_write_checkpoint", _fake_checkpoint)
    (tmp_path / ".ckpt.old-empty").mkdir()  # reserved by an older ktjax killed before its first rename
    shutil.copytree(demo_ckpt, tmp_path / ".ckpt.old-full")  # killed after: the old checkpoint, kept
    assert _convert(out, "--overwrite") == 0
    err = capsys.readouterr().err
    assert not (tmp_path / ".ckpt.old-empty").exists()
    assert "removed" in err and "old-empty, an empty folder" in err, err
    assert ck.is_checkpoint(str(tmp_path / ".ckpt.old-full"))
    source = ck.read_manifest(str(demo_ckpt))["source"]
    assert "old-full holds a ktjax checkpoint (source weights, converted " in err and source in err, err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_checkpoint_folder_is_as_readable_as_the_umask_allows(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert _convert(tmp_path / "ckpt") == 0
    finally:
        os.umask(previous)
    for path in [tmp_path / "ckpt", tmp_path / "ckpt" / "params", tmp_path / "ckpt" / ck.MANIFEST]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))
