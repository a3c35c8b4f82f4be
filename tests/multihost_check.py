"""One process of a two-process run on one machine (tests/test_sharding.py, slow): 4 forced CPU devices per
process, joined by ktjax.weights.sharding.initialize_multihost into one mesh of 8 that spans both processes.

usage: python tests/multihost_check.py PROCESS_ID PORT MODEL_FOLDER OUT.json
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402

import jax  # noqa: E402

from ktjax.weights.sharding import initialize_multihost  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 8, 9]]


def main(process_id, port, folder, out_path):
    initialize_multihost(f"localhost:{port}", 2, int(process_id))
    import ktjax

    engine = ktjax.load(folder, mesh="8", cache_dtype="bf16", chunk_size=8, max_new_tokens=6, ignore_eos=True)
    result = engine.generate(PROMPTS)
    with open(out_path, "w") as f:
        json.dump({"prompts": PROMPTS, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                   "tokens": result.tokens, "stats": result.stats}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
