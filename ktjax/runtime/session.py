"""A conversation that keeps its latent cache across turns (Engine.session): a turn prefills only the tokens the
cache does not hold yet, then decodes with the Engine's compiled programs.

The cache holds positions [0, cached) of `tokens`, the conversation so far. After a turn it holds the prompt and
every generated token but the last one (the decode loop feeds a token only while the sequence goes on), so the next
turn feeds that token along with its own. A turn may also pass the whole conversation again (`generate`, as the
chat template renders it): the cache keeps its longest common prefix with the cached tokens, and the rest is
prefilled over the stale positions, which the lengths mask until they are overwritten. A template that re-renders
the history as the cache holds it (the demo model's does, tests/test_chat.py) reuses every cached token.

The cache grows with the conversation (unless max_len or cache_lens fixes it): a turn that needs more positions
than it has plans a larger one (with cache_lens unset, the power-of-two bucket of twice what it needs) and reads
the whole conversation into it again, a few times per conversation, with a note in the stats. Past max_len or
the model's window a turn is refused with the numbers; `reset` starts over. An interrupted or failed turn leaves
no cache (its buffers were donated to the interrupted call): the next turn reads the conversation again. A turn
decodes one token per pass (Engine._turn), also where the engine is set for speculative decoding.
"""
from __future__ import annotations

import jax

from ktjax.errors import KtjaxError
from ktjax.kv.cache import cache_bytes
from ktjax.runtime import memory
from ktjax.runtime.settings import CallSettings
from ktjax.util.units import format_bytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """Build one with engine.session(max_len=None) (max_len: at most the model's window). One sequence; not
    thread-safe."""

    def __init__(self, engine, max_len: int | None = None):
        window = engine.cfg.max_position_embeddings
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
            raise KtjaxError(f"max_len must be an integer of at least 2 tokens, got {max_len!r}")
        self.engine = engine
        self.max_len = None if max_len is None else min(max_len, window)
        self._cache = self._plan = None  # the LatentCache and its CachePlan, made by the first turn
        self._ran = False                # whether the current turn got past its checks
        self.reset()

    def reset(self):
        """Forget the conversation; the cache's buffers (and the compiled programs) stay for the next one."""
        self.tokens: list[int] = []     # the conversation so far
        self.messages: list[dict] = []  # the chat so far, when turns go through chat()
        self.cached = 0                 # leading positions of `tokens` the cache holds
        self.notes: list[str] = []      # what happened to the cache (it grew, a turn was stopped)
        self.last_turn: dict = {}
        self.turns = 0

    @property
    def limit(self) -> int:
        """The most tokens the conversation may hold: max_len, else the model's window."""
        return self.max_len or self.engine.cfg.max_position_embeddings

    # -- turns ----------------------------------------------------------------------------------------------
    def send(self, prompt, *, on_tokens=None, **settings):
        """Append `prompt` (token ids, or text when the engine has a tokenizer: encoded as it is, without BOS
        after the first turn) to the conversation and generate a reply -> Generation (as Engine.generate for a
        batch of one; on_tokens streams). The reply joins the conversation."""
        ids = self._ids(prompt, first=not self.tokens)
        return self.generate(self.tokens + ids, on_tokens=on_tokens, **settings)

    def chat(self, text: str, *, on_tokens=None, **settings):
        """A user message through the model's chat template: the template renders the whole chat again, and
        the cache keeps what it holds of that rendering. The reply (its text) joins `messages`."""
        tokenizer = self._tokenizer()
        messages = self.messages + [{"role": "user", "content": text}]
        ids = tokenizer.encode_chat(messages)
        self._ran = False
        try:
            result = self.generate(ids, on_tokens=on_tokens, **settings)
        except BaseException:  # noqa: B036 - an interrupted reply stays in the chat as far as it was shown
            if self._ran:
                self.messages = messages + [{"role": "assistant",
                                             "content": tokenizer.decode(self.tokens[len(ids):])}]
            raise
        self.messages = messages + [{"role": "assistant", "content": result.texts[0]}]
        return result

    def generate(self, conversation, *, on_tokens=None, **settings):
        """Generate after `conversation`, the whole conversation so far (token ids or text): the cache keeps
        what it holds of it, the rest is prefilled. The conversation and the reply become `tokens`."""
        engine = self.engine
        call = CallSettings.from_overrides(engine.defaults, **settings)
        conversation = engine._check_ids([engine._encode(conversation)])[0]
        needed = len(conversation) + call.max_new_tokens
        if needed > self.limit:
            what = (f"max_len {self.max_len}" if self.max_len and self.max_len < engine.cfg.max_position_embeddings
                    else f"the model's window of {self.limit} positions (max_position_embeddings)")
            raise KtjaxError(f"the conversation of {len(conversation)} tokens + max_new_tokens {call.max_new_tokens} "
                             f"= {needed} exceeds {what}; reset the conversation or lower max_new_tokens")
        notes = self._fit_cache(needed)
        held = self.cached
        reuse = min(common_prefix(conversation, self.tokens[:self.cached]), len(conversation) - 1)
        new = conversation[reuse:]
        self._ran, streamed = True, []

        def stream(tokens):
            streamed.extend(tokens[0])
            if on_tokens is not None:
                on_tokens(tokens)

        cache, self._cache = self._cache, None  # donated to the programs: gone if the turn does not finish
        self.tokens, self.cached = conversation, 0
        try:
            result, cache, self.cached = engine._turn(cache, new, reuse, call, stream)
        except BaseException:  # noqa: B036 - Ctrl-C included: what was shown stays in the conversation
            self.tokens = conversation + streamed
            self.notes.append(f"turn {self.turns + 1} stopped: the cache was dropped, the next turn reads the "
                              f"conversation ({len(self.tokens)} tokens) again")
            raise
        self._cache = cache
        self.tokens = conversation + result.tokens[0]
        self.turns += 1
        # dropped: cached tokens the conversation no longer starts with (a template that renders the history
        # otherwise than it was generated), prefilled again
        result.stats.update(reused_tokens=reuse, dropped_tokens=held - reuse, notes=notes)
        self.last_turn = result.stats
        return result

    # -- the cache ------------------------------------------------------------------------------------------
    def _fit_cache(self, needed: int) -> list[str]:
        """A cache of at least `needed` positions: the one held, else a larger one (the conversation is then
        read into it again) -> notes saying what changed."""
        if self._cache is not None and self._plan.cache_lens >= needed:
            return []
        engine = self.engine
        old = None if self._plan is None else self._plan.cache_lens
        # Twice what is needed where the cache follows the conversation (cache_lens unset): it is read again
        # and recompiled for at most log2(window) sizes. An explicit or auto cache_lens decides the size itself.
        grow = min(2 * needed, self.limit) if engine.runtime.cache_lens is None else needed
        plan = engine.plan_cache(1, self.max_len or grow)
        if plan.cache_lens < needed:  # an explicit cache_lens setting fixes the size
            raise KtjaxError(f"the conversation needs {needed} positions (its tokens + max_new_tokens) and the cache "
                             f"holds {plan.cache_lens} (cache_lens); raise --cache-lens or reset the conversation")
        notes = [plan.note] if plan.note else []
        if old is not None and plan.cache_lens > old and self.cached:
            notes.append(f"the cache grew from {old} to {plan.cache_lens} tokens: the conversation "
                         f"({self.cached} cached tokens) was read into it again")
        self._cache, self._plan, self.cached = None, plan, 0  # the old cache's buffers go first
        try:
            self._cache = engine.new_cache(1, plan, notes)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            fmt = engine.runtime.cache_dtype
            raise KtjaxError(f"out of memory for a {fmt.name} cache of {plan.cache_lens} tokens "
                             f"({format_bytes(cache_bytes(engine.cfg, fmt, 1, plan.cache_lens))}); reset the "
                             "conversation, or use a narrower --cache-dtype (int8, int4)") from None
        self.notes += notes
        return notes

    @property
    def stats(self) -> dict:
        """What the session holds now, and its last turn's figures (prefill and decode speed, tokens reused)."""
        plan, fmt, cfg = self._plan, self.engine.runtime.cache_dtype, self.engine.cfg
        cache_lens = 0 if plan is None else plan.cache_lens
        return {
            "turns": self.turns, "conversation_tokens": len(self.tokens), "cached_tokens": self.cached,
            "cache_lens": cache_lens, "cache_fill": self.cached / cache_lens if cache_lens else 0.0,
            "cache_dtype": fmt.name, "cache_bytes": cache_bytes(cfg, fmt, 1, cache_lens) if cache_lens else 0,
            "cache_bytes_per_token": fmt.bytes_per_token(cfg), "weight_bytes": self.engine.weight_bytes,
            "peak_memory_bytes": memory.peak_memory_bytes(), "limit": self.limit,
            "last_turn": dict(self.last_turn), "notes": list(self.notes),
        }

    # -- helpers --------------------------------------------------------------------------------------------
    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise KtjaxError("this engine has no tokenizer (the model folder has no tokenizer.json); send token ids")
        return self.engine.tokenizer

    def _ids(self, prompt, first: bool) -> list[int]:
        if not isinstance(prompt, str):
            return self.engine._check_ids([prompt])[0]
        ids = self._tokenizer().encode(prompt)
        bos = self.engine.tokenizer.bos_id
        if not first and self.engine.tokenizer.add_bos_token and ids[:1] == [bos]:
            ids = ids[1:]  # BOS opens a conversation, not each of its turns
        if not ids:
            raise KtjaxError("the prompt is empty")
        return ids
