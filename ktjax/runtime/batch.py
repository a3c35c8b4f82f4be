"""The one runtime: a batch of sequences over one cache, run step by step (Engine.generate's and the server's).

A `Batch` holds its sequences, the cache they share and the compiled step programs (runtime/programs.py). Each
step runs at most one prefill chunk (of the oldest sequence still prefilling, with chunks of the next ones while
the step's budget lasts) and decode steps of every sequence that has a token to feed: one while a prompt is being
prefilled, else a burst of up to MAX_STEPS in one dispatch (runtime/decode.py's `decode_steps`, each sequence
stopping on the device). With speculative mtp a decode step is a draft-verify-accept pass instead. Each sampled
token goes through `_emit`: the stop rules (a stop id, max_tokens, non-finite logits) are applied there, once.

Two caches, one driver:
- over a page pool (the server's scheduler, serve/scheduler.py, a subclass adding admission, the prefix cache and a
  thread), sequences come and go, rows are packed in order and a page table says where each one's positions lie;
- over a dense cache (Engine.generate's, `cache.dense`: one page per row), sequence i is row i for the whole run and
  every step runs every row, the others padded (their writes go past the cache and are dropped).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.kv.cache import LatentCache
from ktjax.runtime.decode import MAX_STEPS, RowSampling, StepOutput, stop_matrix
from ktjax.runtime.programs import Programs, bucket_of


@dataclasses.dataclass(eq=False, kw_only=True)
class Sequence:
    prompt: list[int]
    max_tokens: int
    sampling: tuple[float, int, float]   # temperature, top_k, top_p
    seed: int
    stops: frozenset
    logprobs: int = 0         # top log-probabilities wanted per token (0: none)
    row: int = 0              # over a dense cache: its row (page) for the whole run
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    pages: list[int] = dataclasses.field(default_factory=list)   # over a pool: its pages, in order
    length: int = 0           # tokens in the cache
    pending: int | None = None  # sampled token not yet fed through the model
    generated: list[int] = dataclasses.field(default_factory=list)
    ttft: float = 0.0
    cancelled: bool = False
    # speculative mtp: the MTP slice holds positions [0, mtp_length); hidden [k+1, H] / after [k+1]: the model's
    # hidden states at mtp_length .. length-1 and the token after each (what the next draft extends it with)
    mtp_length: int = 0
    hidden: np.ndarray | None = None
    after: np.ndarray | None = None
    passes: int = 0      # verifying passes
    accepted: int = 0    # drafts accepted (and emitted)

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt)

    @property
    def n_gen(self) -> int:
        return len(self.generated)


class Batch:
    """Sequences over one cache (`pool`: a page pool, or a dense cache of one page per row) and its Programs.
    Subclasses say what a token and an end mean to their callers (_deliver, _finish) and whether anyone waits
    to join (_burst)."""

    log_compiles = False  # say so when a step compiles its program (the server: a shape the warmup skipped)

    def __init__(self, engine, pool: LatentCache, programs: Programs, draft_tokens: int = 0):
        self.engine, self.pool, self.programs = engine, pool, programs
        self.draft_tokens = draft_tokens
        self._lock = threading.Condition()
        self._running: list[Sequence] = []
        self._step_s: float | None = None  # the last decode dispatch's seconds per step (sizes the next burst)
        self._counts = dict(prefill_tokens_total=0, decode_tokens_total=0, steps_total=0)
        if draft_tokens:
            self._counts.update(speculative_drafted_total=0, speculative_accepted_total=0,
                                speculative_verify_passes_total=0)

    # -- what subclasses say ------------------------------------------------------------------------------------
    def _deliver(self, req: Sequence, out: StepOutput, i: int) -> bool:
        """Hand out req's new token (row i of out). -> whether its consumer still wants the rest."""
        return True

    def _finish(self, req: Sequence, reason: str, error: str | None = None) -> None:
        """req ends: "stop" (a stop id), "length", "cancelled" or "error"."""
        with self._lock:
            if req in self._running:
                self._running.remove(req)

    def _publish_full_pages(self, req: Sequence) -> None:
        """The prefix cache's hook: req's cache now holds more of its tokens (nothing to do without one)."""

    def _burst(self) -> int:
        """Decode steps for the next dispatch once no prompt is being prefilled: nobody waits to join, so all."""
        return MAX_STEPS

    # -- steps --------------------------------------------------------------------------------------------------
    def _step(self) -> None:
        with self._lock:
            running = list(self._running)
        prefilling = [r for r in running if r.prefilling and not r.cancelled]
        # the rows decoding as the step begins: one whose prompt ends in this step has its first token already
        # and decodes from the next step on (so that a prefill's time ends at its first token)
        decoding = [r for r in running if not r.prefilling and r.pending is not None and not r.cancelled]
        if prefilling:
            self._prefill(prefilling)
        decoding = [r for r in decoding if not r.cancelled]
        steps = 1 if prefilling else 0
        if decoding:
            run = self._speculate if self.draft_tokens else self._decode
            steps = max(steps, run(decoding, 1 if prefilling else self._burst()))
        self._counts["steps_total"] += steps

    def _table(self, reqs: list[Sequence], b: int, width: int) -> np.ndarray:
        table = np.zeros((b, width), np.int32)
        for i, r in enumerate(reqs):
            n = min(len(r.pages), width)
            table[i, :n] = r.pages[:n]
        return table

    @staticmethod
    def _rows(reqs: list[Sequence], b: int, slots: list[int]) -> RowSampling:
        """Each request's sampling at its row (slots), the other rows greedy."""
        at = dict(zip(slots, reqs))
        order = [at.get(i) for i in range(max(slots) + 1)]

        def col(get, pad):
            return [pad if r is None else get(r) for r in order]

        return RowSampling.of(b, col(lambda r: r.sampling[0], 0.0), col(lambda r: r.sampling[1], 0),
                              col(lambda r: r.sampling[2], 1.0), col(lambda r: r.seed, 0), col(lambda r: r.n_gen, 0),
                              col(lambda r: r.logprobs > 0, False))

    def _run(self, reqs, chunk: int, last: int, args: list, positions: tuple[int, ...] = (),
             stops: int | None = None, tail: tuple = ()) -> tuple:
        """The step program for this batch on args (one row per request; `last`: the positions the step reaches,
        which size a pool's table; the args at `positions` are cache positions, whose -1s and padding go past the
        cache, where writes are dropped; `stops`: a decode program's stop-id bucket, `tail`: its arguments after
        the rows) -> (each request's row in the outputs, the outputs after the cache, on the host). Over a pool
        the requests take the first rows of a batch bucket; over a dense cache each its own row of every row."""
        programs = self.programs
        if programs.dense:
            b, width, slots, pad_pos = programs.batches[0], None, [r.row for r in reqs], self.pool.cache_lens
        else:
            b, slots = bucket_of(len(reqs), programs.batches), list(range(len(reqs)))
            width = bucket_of(-(-last // self.pool.page_size), programs.widths)
            pad_pos = width * self.pool.page_size
        program = programs.get(b, chunk, width, *(() if stops is None else (stops,)), log_compile=self.log_compiles)
        padded = []
        for i, x in enumerate(args):
            x = np.asarray(x)
            dtype = np.int32 if x.dtype.kind in "iu" else x.dtype  # the programs' integers are int32
            full = np.full((b,) + x.shape[1:], pad_pos if i in positions else 0, dtype)
            full[slots] = np.where(x < 0, pad_pos, x) if i in positions else x
            padded.append(jnp.asarray(full))
        cache = self.pool if width is None else self.pool.with_table(jnp.asarray(self._table(reqs, b, width)))
        cache, *out = program(self.engine.state, cache, *padded, self._rows(reqs, b, slots), *tail)
        self.pool = cache
        return slots, jax.device_get(tuple(out))

    def _prefill(self, reqs: list[Sequence]) -> None:
        """One prefill chunk of the oldest prefilling request, sized to what it has left (a bucket), plus chunks
        of that size for the next ones while the step's budget of chunk_size tokens lasts (a dense cache: every
        prefilling request, at its one chunk)."""
        left = len(reqs[0].prompt) - reqs[0].length
        chunk = bucket_of(min(left, self.programs.chunks[-1]), self.programs.chunks)
        rows = reqs[:self.programs.prefill_rows(chunk)]
        starts = [r.length for r in rows]
        counts = [min(len(r.prompt) - r.length, chunk) for r in rows]
        tok = np.zeros((len(rows), chunk), np.int32)
        pos = np.full((len(rows), chunk), -1, np.int32)
        for i, (r, start, n) in enumerate(zip(rows, starts, counts)):
            tok[i, :n] = r.prompt[start:start + n]
            pos[i, :n] = start + np.arange(n)
        ends = np.add(starts, counts)
        args = [tok, pos, ends, np.subtract(counts, 1)]
        if self.draft_tokens:  # the MTP module over the chunk: position p with the prompt's token p + 1
            follow = np.zeros((len(rows), chunk), np.int32)
            mtp_pos = np.full((len(rows), chunk), -1, np.int32)
            for i, (r, start, n) in enumerate(zip(rows, starts, counts)):
                nxt = r.prompt[start + 1:start + n + 1]  # the prompt's last position waits for its next token
                follow[i, :len(nxt)] = nxt
                mtp_pos[i, :len(nxt)] = start + np.arange(len(nxt))
            mtp_ends = np.array([min(end, len(r.prompt) - 1) for r, end in zip(rows, ends)], np.int32)
            args += [follow, mtp_pos, mtp_ends]
        slots, (out, *last) = self._run(rows, chunk, int(ends.max()), args,
                                        positions=(1, 5) if self.draft_tokens else (1,))
        for i, (r, end, slot) in enumerate(zip(rows, ends, slots)):
            r.length = int(end)
            if self.draft_tokens:
                r.mtp_length = int(mtp_ends[i])
            self._publish_full_pages(r)
            if not r.prefilling and self._emit(r, out, slot) and self.draft_tokens:
                self._start_speculating(r, last[0][slot])
        self._counts["prefill_tokens_total"] += sum(counts)

    def _start_speculating(self, req: Sequence, last_hidden) -> None:
        """After the prompt: the MTP slice waits for the prompt's last position, from its hidden state and the
        first token."""
        k = self.draft_tokens
        req.hidden = np.zeros((k + 1,) + last_hidden.shape, last_hidden.dtype)
        req.hidden[0] = last_hidden
        req.after = np.zeros((k + 1,), np.int32)
        req.after[0] = req.pending

    def _decode(self, reqs: list[Sequence], n_steps: int) -> int:
        """Up to n_steps decode steps of every request in one dispatch (decode_steps), each request's tokens
        emitted in order until one ends it. -> the steps run."""
        lengths = np.array([r.length for r in reqs], np.int32)
        remaining = np.array([r.max_tokens - r.n_gen for r in reqs], np.int32)
        stop_ids = stop_matrix([r.stops for r in reqs], len(reqs))
        args = [np.array([r.pending for r in reqs], np.int32), lengths, remaining, stop_ids]
        last = int((lengths + np.minimum(remaining, n_steps)).max())  # the last position a burst writes
        t0 = time.perf_counter()
        slots, (out,) = self._run(reqs, 1, last, args, stops=stop_ids.shape[1], tail=(np.int32(n_steps),))
        ran = int((out.token >= 0).any(axis=1).sum())
        self._step_s = (time.perf_counter() - t0) / max(ran, 1)
        for req, slot in zip(reqs, slots):
            for j in range(ran):
                if out.token[j, slot] < 0:
                    break
                req.length += 1
                req.pending = None
                self._counts["decode_tokens_total"] += 1
                if not self._emit(req, jax.tree.map(lambda x, j=j: x[j], out), slot):
                    break
        return ran

    def _speculate(self, reqs: list[Sequence], n_passes: int) -> int:
        """Up to n_passes verifying passes (speculative mtp) of every request in one dispatch: each pass its
        pending token and k drafts through the model; the accepted drafts and the token after them emitted one by
        one, until one ends the request. -> the passes run."""
        k = self.draft_tokens
        lengths = np.array([r.length for r in reqs], np.int32)
        remaining = np.array([r.max_tokens - r.n_gen for r in reqs], np.int32)
        stop_ids = stop_matrix([r.stops for r in reqs], len(reqs))
        args = [np.array([r.pending for r in reqs], np.int32), lengths, [r.mtp_length for r in reqs],
                np.stack([r.hidden for r in reqs]), np.stack([r.after for r in reqs]), remaining, stop_ids]
        last = int((lengths + np.minimum(remaining, n_passes * (k + 1)) + k).max())  # the last position written
        t0 = time.perf_counter()
        slots, (out, accepted, state) = self._run(reqs, 1, last, args, stops=stop_ids.shape[1],
                                                  tail=(np.int32(n_passes),))
        ran = int((out.token >= 0).any(axis=(1, 2)).sum())
        self._step_s = (time.perf_counter() - t0) / max(ran, 1)
        for req, slot in zip(reqs, slots):
            if self._take_passes(req, out, accepted, slot, ran):  # runs on: where the next step's MTP starts
                req.hidden, req.after, req.mtp_length = state.hidden[slot], state.after[slot], int(state.base[slot])
        return ran

    def _take_passes(self, req: Sequence, out: StepOutput, accepted, slot: int, ran: int) -> bool:
        """Emit row `slot`'s tokens of each pass in order (out [passes, b, k+1]), until one ends the request.
        -> whether it runs on."""
        k, counts = self.draft_tokens, self._counts
        for p in range(ran):
            given = int((out.token[p, slot] >= 0).sum())
            if not given:  # done on the device
                break
            n, start, before = int(accepted[p, slot]), req.length, req.n_gen
            req.mtp_length = start  # the draft extended the MTP slice over the positions accepted before
            req.pending = None
            req.passes += 1  # counted before the tokens: the last one may finish the request
            counts["speculative_drafted_total"] += k
            counts["speculative_verify_passes_total"] += 1
            runs_on = True
            for j in range(given):
                req.length = start + j + 1  # the pending token and d_1..d_j are in the cache
                at = jax.tree.map(lambda x, p=p, j=j: x[p, :, j], out)
                req.accepted += j < n and bool(at.finite[slot])  # an accepted draft, emitted below
                if not self._emit(req, at, slot):
                    runs_on = False
                    break
            emitted = req.n_gen - before
            counts["decode_tokens_total"] += emitted
            counts["speculative_accepted_total"] += min(n, emitted)
            if not runs_on:
                return False
        return True

    def _emit(self, req: Sequence, out: StepOutput, i: int) -> bool:
        """Deliver row i's sampled token, then finish the request or leave the token to feed next step.
        -> whether the request runs on."""
        if not out.finite[i]:
            self._finish(req, "error", f"the model produced non-finite logits (NaN or Inf) at generation step "
                                       f"{req.n_gen}; check the checkpoint or try --dtype float32")
            return False
        token = int(out.token[i])
        if req.n_gen == 0:
            req.ttft = time.perf_counter() - req.submitted
        req.generated.append(token)
        if not self._deliver(req, out, i) or req.cancelled:
            self._finish(req, "cancelled")
        elif token in req.stops:
            self._finish(req, "stop")
        elif req.n_gen >= req.max_tokens:
            self._finish(req, "length")
        else:
            req.pending = token
            return True
        return False
