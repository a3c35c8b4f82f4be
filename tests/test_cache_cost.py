"""Per-step cost follows the cache's fill, not its capacity: the compiled decode and prefill programs never copy
or convert a cache-sized buffer (the cache is updated in place), for every cache format."""
import re

import pytest

import ktjax

CAPACITY = 4096  # no other dimension of the tiny model is this large


def _cache_sized_ops(hlo: str) -> list[str]:
    """Instructions that make a new cache-sized array other than the in-place update itself."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\S+\[[^\]]*\b" + str(CAPACITY) + r"\b[^\]]*\])\S* (copy|convert|transpose|concatenate|pad|"
                      r"broadcast|gather|dynamic-slice|slice)\(", line)
        if m:
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4", "float32"])
def test_decode_and_prefill_never_copy_the_cache(hf_folder, fmt):
    folder, _ = hf_folder("v3")
    engine = ktjax.load(folder, cache_dtype=fmt, cache_lens=CAPACITY, max_new_tokens=2, ignore_eos=True,
                        chunk_size=16)
    engine.generate([[5, 6, 7, 8, 9]])
    programs = {key[0]: program for key, program in engine._compiled.items()}
    assert set(programs) == {"prefill", "decode"}
    for name, program in programs.items():
        assert _cache_sized_ops(program.as_text()) == [], name
