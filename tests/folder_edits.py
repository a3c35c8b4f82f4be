"""Ways to break a saved model folder, shared by the loader's and the converter's bad-input tests. Each
breaker returns the pattern that the resulting error message must match."""
import json
import os


def shards(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def edit_json(path, **changes):
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def truncate_shard(folder):
    victim = os.path.join(folder, shards(folder)[0])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 100)
    return rf"{shards(folder)[0]}.*truncated"


def corrupt_header(folder):
    with open(os.path.join(folder, shards(folder)[0]), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    return rf"{shards(folder)[0]}.*corrupt safetensors header"


def unexpected_tensor(folder):
    """A shard with a tensor no config accounts for (the index removed, so the files are scanned)."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)},
              os.path.join(folder, "extra.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors.index.json"))
    return r"model\.layers\.0\.self_attn\.extra\.weight"


def missing_tensor(folder):
    """The index forgets one expert's tensor."""
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        raw = json.load(f)
    del raw["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    with open(index, "w") as f:
        json.dump(raw, f)
    return r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*missing"


def index_names_missing_file(folder):
    victim = shards(folder)[2]
    os.remove(os.path.join(folder, victim))
    return rf"index.json names shard\(s\) that are not in .*{victim}"


def shape_disagrees(folder):
    """For the v2_lite test model (hidden 48, intermediate 64)."""
    edit_json(os.path.join(folder, "config.json"), intermediate_size=72)
    return r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape \(64, 48\).*\(72, 48\)"


def unsupported_architecture(folder):
    edit_json(os.path.join(folder, "config.json"), architectures=["MixtralForCausalLM"])
    return r"config\.json.*MixtralForCausalLM.*not supported"


BAD_INPUTS = {"truncated shard": truncate_shard, "corrupt header": corrupt_header,
              "index names a missing file": index_names_missing_file, "shape disagrees": shape_disagrees,
              "unsupported architecture": unsupported_architecture, "unexpected tensor": unexpected_tensor,
              "missing tensor": missing_tensor}
