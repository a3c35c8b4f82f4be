"""runtime/chunks.py: the prefill chunks of a batch of prompts, checked position by position against the
definition (each prompt token i of row r goes at position start[r] + i, in chunk i // chunk)."""
import numpy as np
import pytest

from ktjax.runtime.chunks import chunks

PAD = 99


@pytest.mark.parametrize("lens,chunk,start", [
    ([5, 3], 4, None),
    ([5, 3], 4, [10, 0]),
    ([1], 8, [2]),
    ([8, 9, 1], 4, [0, 1, 2]),
])
def test_chunks_place_every_prompt_token_once(lens, chunk, start):
    prompts = [list(range(100 * (r + 1), 100 * (r + 1) + n)) for r, n in enumerate(lens)]
    s = np.zeros(len(lens), int) if start is None else np.array(start)
    got = list(chunks(prompts, chunk, PAD, start))
    assert len(got) == -(-max(lens) // chunk)
    for r, p in enumerate(prompts):
        placed = {}
        for c in got:
            for j in range(chunk):
                if c.positions[r, j] != PAD:
                    placed[int(c.positions[r, j])] = int(c.tokens[r, j])
                    if c.next_positions[r, j] != PAD:  # the MTP input: the token after this one
                        assert c.next_tokens[r, j] == p[c.positions[r, j] - s[r] + 1]
        assert placed == {s[r] + i: t for i, t in enumerate(p)}
        ends = [c for c in got if c.ends_here[r]]
        assert len(ends) == 1 and ends[0].index == (len(p) - 1) // chunk
        assert ends[0].tokens[r, ends[0].logits_index[r]] == p[-1]
        assert got[-1].lengths[r] == s[r] + len(p)
        assert got[-1].next_lengths[r] == s[r] + len(p) - 1
    assert [c.done for c in got] == [sum(min(n, (i + 1) * chunk) for n in lens) for i in range(len(got))]
