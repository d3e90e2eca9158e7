"""Token ids to streamed text: incremental detokenization and stop strings.

Text is released only once it is final: a token that ends mid-character (byte
fallback, byte-level BPE) waits for the rest of the character, and the tail that
could still grow into a stop string waits until it cannot.
"""

from __future__ import annotations

from modserve.engine.base import FinishReason

PROMPT_CONTEXT = 6  # prompt tokens decoded with the output, so leading spaces come out right


class TextStream:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded completion so far
        self.released = 0  # characters of `text` already handed out
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def advance(
        self, token_id: int, stop_ids: frozenset[int], length_reached: bool, may_stop: bool = True
    ) -> tuple[str, FinishReason | None]:
        """One generated token: the text it releases and the finish reason it causes, if any —
        a stop id (its text is dropped), a stop string (the text is cut before it), or the
        length limit; before min_tokens (`may_stop` false) neither stop ids nor stop strings
        end the text. Both backends decide a choice's text and its end here, token by token."""
        if token_id in stop_ids:
            return self.finish(), "stop"
        text, hit_stop = self.push(token_id, may_stop)
        if hit_stop:
            return text, "stop"
        if length_reached:
            return text + self.finish(), "length"
        return text, None

    def push(self, token_id: int, find_stops: bool = True) -> tuple[str, bool]:
        """Add one token; return (text now final, hit a stop string)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False, find_stops=find_stops)

    def finish(self) -> str:
        """The rest of the text once generation ended (incomplete characters included)."""
        pending = self._decode(self.ids[self.prefix_offset :])
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        self.text += pending[len(before) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)[0]

    def _release(self, final: bool, find_stops: bool = True) -> tuple[str, bool]:
        if self.stop and find_stops:
            start = max(0, self.released - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                out = self.text[self.released :]
                self.released = len(self.text)
                return out, True
        end = len(self.text) if final else max(self.released, len(self.text) - self.hold)
        out = self.text[self.released : end]
        self.released = end
        return out, False
