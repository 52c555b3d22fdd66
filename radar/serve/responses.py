"""A finished decode as the OpenAI answer reports it: the text cut at a stop string, usage, logprobs and the
`speculation` extension."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from radar.serve.protocol import (
    AcceptLengths,
    ChatLogprobs,
    CompletionLogprobs,
    Speculation,
    TokenLogprob,
    TopLogprob,
    Usage,
    speculation_name,
)
from radar.serve.streaming import cut_at_stop, tokens_covering

if TYPE_CHECKING:
    from radar.decoding.session import GenerationResult
    from radar.serve.worker import Job


@dataclass
class Outcome:
    """A finished request: the text to return and everything the response reports."""

    text: str
    finish_reason: str
    usage: Usage
    speculation: Speculation
    tokens: int  # completion tokens (up to the stop-string cut)


def outcome(decode: Callable[[list[int]], str], stops: list[str], job: Job, result: GenerationResult) -> Outcome:
    """The text of `result` cut at the first of `stops`, with usage and speculation statistics."""
    s, ids = result.stats, result.token_ids
    text = decode(ids)
    cut = cut_at_stop(text, stops)
    if cut is not None:
        text, reason = text[:cut], "stop"
        completion_tokens = tokens_covering(decode, ids, text)
    else:
        reason, completion_tokens = ("stop" if s.finish_reason in ("eos", "stop") else "length"), len(ids)
    lengths = s.accept_lengths or [1] * s.target_calls  # off: one token per target call
    accept = AcceptLengths(mean=round(sum(lengths) / max(len(lengths), 1), 4), min=min(lengths, default=0),
                           max=max(lengths, default=0), cycles=len(lengths))
    spec = Speculation(method=speculation_name(job.method), tau=round(s.tau, 4),
                       draft_calls_per_cycle=round(s.mean_draft_calls, 4), accept_lengths=accept,
                       target_calls=s.target_calls, generated_tokens=s.new_tokens, decode_s=round(s.wall_s, 4),
                       queue_s=round(job.started - job.enqueued, 4))
    prompt_tokens = len(job.prompt_ids)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    return Outcome(text, reason, usage, spec, completion_tokens)


def _pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    return [decode([t]) for t in ids]


def completion_logprobs(decode: Callable[[list[int]], str], result: GenerationResult, n: int,
                        offset: int = 0) -> CompletionLogprobs:
    """The completions API's logprobs of the first `n` new tokens; text offsets start at `offset`."""
    ids, rows = result.token_ids[:n], (result.logprobs or [])[:n]
    tokens, offsets, at = _pieces(decode, ids), [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{decode([a]): lp for a, lp in alts} for _, alts in rows]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp for lp, _ in rows],
                              top_logprobs=top if any(top) else None, text_offset=offsets)


def chat_logprobs(decode: Callable[[list[int]], str], result: GenerationResult, n: int) -> ChatLogprobs:
    """The chat API's logprobs of the first `n` new tokens."""
    def entry(token: str, lp: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=lp, bytes=list(token.encode()))

    content = []
    for t, (lp, alts) in zip(result.token_ids[:n], (result.logprobs or [])[:n]):
        token = decode([t])
        content.append(TokenLogprob(token=token, logprob=lp, bytes=list(token.encode()),
                                    top_logprobs=[entry(decode([a]), alp) for a, alp in alts]))
    return ChatLogprobs(content=content)
