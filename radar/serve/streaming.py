"""Token ids to text for streaming, and stop strings.

A stream sends text as soon as it is decoded: `Detokenizer` holds back an incomplete UTF-8 tail (the tokenizer's
own `DecodeStream` does that) and any suffix that could be the start of a stop string, so the streamed pieces add
up to exactly the text a non-streamed request returns. A non-streamed decode runs to max_tokens or EOS and its text
is then cut at the first stop string (finish_reason "stop"); a streamed one stops decoding there.
`usage.completion_tokens` counts the tokens up to the cut, `speculation.generated_tokens` all decoded tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers.decoders import DecodeStream


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def tokens_covering(decode: Callable[[list[int]], str], ids: list[int], text: str) -> int:
    """The fewest leading tokens whose text starts with `text` (binary search; len(ids) if none shorter does)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(ids[:mid]).startswith(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


class Detokenizer:
    """Token ids in, text deltas out, for one stream of a transformers fast tokenizer (special tokens skipped,
    as `ModelPair.decode` does), cut at the first of `stops`."""

    def __init__(self, tokenizer, stops: list[str]):
        self.backend = tokenizer.backend_tokenizer  # the `tokenizers.Tokenizer` behind it
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the newly releasable text."""
        for t in ids:
            self.ids.append(t)
            self.text += self.stream.step(self.backend, t) or ""
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back (the decode has ended): DecodeStream keeps an incomplete UTF-8 tail forever,
        the full text ends it with a replacement character."""
        self.text += self.backend.decode(self.ids, skip_special_tokens=True)[len(self.text):]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = cut_at_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            end = max(cut, self.sent)
        elif final:
            end = len(self.text)
        else:  # keep back the longest tail that a stop string starts with
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out
