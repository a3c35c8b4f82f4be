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
