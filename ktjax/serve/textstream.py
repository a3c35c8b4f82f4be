"""Token ids -> text increments for one completion: incremental detokenization that never emits half a UTF-8
character, and stops (token ids, and strings matched on the text, which is cut before the stop)."""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what the decoder gives for an incomplete UTF-8 sequence


class TextStream:
    def __init__(self, tokenizer, stop_strings=(), stop_ids=()):
        self.decode = tokenizer.decode
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_ids = frozenset(stop_ids)
        self.ids: list[int] = []
        # Each push decodes ids[prefix:] and compares with ids[prefix:read] (decoded before): the decode costs a
        # few tokens, not the whole completion, and a multi-byte character split over tokens is never cut.
        self.prefix = self.read = 0
        self.pending = ""       # text decoded but held back: its end may begin a stop string
        self.stopped = False    # a stop id or stop string was seen; later tokens are ignored
        self.ended = False      # finish() was called
        self.tokens = 0         # tokens consumed, the stopping one included

    def push(self, token_id: int) -> str:
        """One generated token -> the text it releases (often "", while a character or a stop is incomplete)."""
        if self.stopped or self.ended:
            return ""
        self.tokens += 1
        if token_id in self.stop_ids:  # a stop token's own text is never part of the completion
            return self._finish_text()
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(text[len(before):])

    def finish(self) -> str:
        """The generation ended: what is left (an incomplete character's replacement included)."""
        if self.stopped or self.ended:
            return ""
        self.ended = True
        return self._finish_text(by_stop=False)

    def _finish_text(self, by_stop: bool = True) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        out = self._release(self.decode(self.ids[self.prefix:])[len(before):], final=True)
        self.prefix = self.read = len(self.ids)
        self.stopped = self.stopped or by_stop
        return out

    def _release(self, new: str, final: bool = False) -> str:
        text = self.pending + new
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            self.stopped, self.pending = True, ""
            return text[:min(cuts)]
        hold = 0 if final else self._stop_prefix_len(text)
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold]

    def _stop_prefix_len(self, text: str) -> int:
        """The longest end of `text` that begins some stop string (that text may still become a stop)."""
        best = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
