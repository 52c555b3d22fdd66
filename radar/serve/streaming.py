"""Token ids to text for streaming, and stop strings.

A stream sends text as soon as it is decoded: `Detokenizer` holds back an incomplete UTF-8 tail (the tokenizer's
own `DecodeStream` does that) and any suffix that could be the start of a stop string, so the streamed pieces add
up to exactly the text a non-streamed request returns. Either kind stops decoding at the first stop string (the
non-streamed one watches its commits on the decode thread) and its text is cut there (finish_reason "stop").
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
        # Only the unreleased text can hold a stop string: what was released never ended with a stop string's
        # start. So each push scans what is new plus a tail shorter than the longest stop string (stop strings
        # are bounded in length), never the whole text.
        cut = cut_at_stop(self.text[self.sent:], self.stops)
        if cut is not None:
            self.stopped = True
            end = self.sent + cut
        elif final:
            end = len(self.text)
        else:  # keep back the longest tail that a stop string starts with
            hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1)
                        if self.text.endswith(s[:k])), default=0)
            end = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def push_stops(self, ids: list[int]) -> bool:
        """`push` for a decode that streams nothing (non-streamed with stop strings): True while no stop string
        has appeared."""
        self.push(ids)
        return not self.stopped
