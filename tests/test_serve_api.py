"""The OpenAI-compatible Ray Serve app, over HTTP against a real local Serve instance on the tiny pair.

Two applications share one Serve instance on a free port: the main one (route /) and a keyed one (route /keyed,
API key required, a 50 ms timeout) for the 401/504 paths. Completions tokenize the raw prompt (like
`radar generate --raw`); chat renders the plain template (the tiny tokenizer has no chat template).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from serve_helpers import two_apps

pytestmark = pytest.mark.slow

KEY = "test-secret"
PROMPT = "Question: What is the capital of France?\nAnswer:"
N = 24  # max tokens in most requests: the tiny model is fast, the point is equality


@dataclass
class Server:
    url: str
    target: Path
    draft: Path
    controller: Path

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)


@pytest.fixture(scope="module")
def server(tiny_pair, ray_session, tmp_path_factory):
    keyed = dict(api_key=KEY, timeout_s=0.05)  # the side app: a key, and a timeout too short for any decode
    with two_apps(tiny_pair, tmp_path_factory.mktemp("serve"), dict(api_key="", timeout_s=60), keyed,
                  "/keyed") as (url, _, controller):
        yield Server(url, *tiny_pair, controller)


def complete(server: Server, **body) -> dict:
    r = server.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(response: httpx.Response) -> list:
    """The JSON chunks of an SSE response; asserts it ends with [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    """An OpenAI-style error with `status`, a message containing `words`, and no stack trace."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    for w in words:
        assert w in err["message"], err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return err


# ---- equality with the CLI and across methods ----------------------------------------------------------------


def test_completion_equals_radar_generate_raw_json(server):
    result = CliRunner().invoke(
        __import__("radar.cli.app", fromlist=["app"]).app,
        ["generate", "--prompt", PROMPT, "--model", str(server.target), "--draft", str(server.draft),
         "--method", "radar", "--controller", str(server.controller), "--max-new-tokens", str(N), "--raw", "--json"],
    )
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    body = complete(server, speculation="radar")
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == cli["text"]
    assert body["usage"] == {"prompt_tokens": cli["prompt_tokens"], "completion_tokens": len(cli["token_ids"]),
                             "total_tokens": cli["prompt_tokens"] + len(cli["token_ids"])}
    spec = body["speculation"]
    assert spec["method"] == "radar" and spec["tau"] == pytest.approx(cli["tau"], abs=1e-3)
    assert spec["draft_calls_per_cycle"] == pytest.approx(cli["mean_draft_calls"], abs=1e-3)
    assert spec["accept_lengths"]["cycles"] == len(cli["accept_lengths"]) == spec["target_calls"]


def test_greedy_text_is_the_same_with_speculation_off_tree_and_radar(server):
    bodies = {s: complete(server, speculation=s) for s in ("off", "tree:2", "radar")}
    texts = {s: b["choices"][0]["text"] for s, b in bodies.items()}
    assert len(set(texts.values())) == 1, texts
    off = bodies["off"]["speculation"]
    assert off["method"] == "off" and off["tau"] == 1.0 and off["draft_calls_per_cycle"] == 0
    assert bodies["tree:2"]["speculation"]["draft_calls_per_cycle"] == 2.0
    assert complete(server)["speculation"]["method"] == "radar"  # the server's default


def test_streaming_text_equals_non_streaming_text(server):
    plain = complete(server)
    events = stream_events(server.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == plain["choices"][0]["text"]
    finals = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert [c["finish_reason"] for c in finals] == [plain["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["text"]) > 1  # really in pieces

    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": N,
            "temperature": 0}
    r = server.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    events = stream_events(server.post("/v1/chat/completions", json={**chat, "stream": True}))
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == r.json()["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == r.json()["choices"][0]["finish_reason"]


def test_stop_string_truncates_streamed_and_not(server):
    full = complete(server)["choices"][0]["text"]
    stop = full[6:9]
    cut = full.find(stop)
    assert stop and cut > 0
    body = complete(server, stop=[stop, "never-in-the-output"])
    assert body["choices"][0] == {"index": 0, "text": full[:cut], "logprobs": None, "finish_reason": "stop"}
    assert 0 < body["usage"]["completion_tokens"] < N
    # Not streamed either, the decode stops at the stop string (within a cycle) instead of running to max_tokens.
    assert body["usage"]["completion_tokens"] <= body["speculation"]["generated_tokens"] < N
    events = stream_events(server.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stop": stop, "stream": True}))
    assert "".join(c["text"] for e in events for c in e["choices"]) == full[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # A stream stops decoding at the stop string (within a cycle or two), instead of running to max_tokens.
    assert events[-1]["speculation"]["generated_tokens"] < N


def test_streamed_chunks_arrive_while_decoding(server):
    events = stream_events(server.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True, "speculation": "off"}))
    text_chunks = [c["text"] for e in events for c in e["choices"] if c["text"]]
    assert len(text_chunks) > 1


def test_chat_uses_the_plain_template_and_completions_the_raw_prompt(server):
    from radar.decoding.chat import PLAIN_TEMPLATE
    from radar.decoding.verify import Sampling
    from radar.ops.models import attach_controller, load_pair

    pair = attach_controller(load_pair(server.target, server.draft, device="cpu"), server.controller)
    question = "What is the capital of France?"
    ids = pair.chat_ids(question)
    expected = pair.decode(pair.generate(ids, "radar", Sampling(0.0), N, 0).token_ids)
    r = server.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": N, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(ids)
    # The same question sent raw to /v1/completions is a different prompt (no template).
    assert complete(server, prompt=question)["usage"]["prompt_tokens"] == len(pair.encode(question))

    # Multi-turn without a template: system text, then Question/Answer blocks.
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": question}]
    r = server.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 4, "temperature": 0})
    rendered = "Be brief.\n\n" + PLAIN_TEMPLATE.format(question="Hi?") + " Hello.\n" + PLAIN_TEMPLATE.format(
        question=question)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(pair.encode(rendered))
    r = server.post("/v1/chat/completions", json={"messages": turns[:3], "max_tokens": 4})
    assert_error(r, 400, "no chat template", "ending with a user message")


def test_concurrent_requests_queue_and_all_agree(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "speculation": "radar"}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    metrics = server.get("/metrics").text
    assert "radar_in_flight 0.0" in metrics and "radar_queue_depth 0.0" in metrics


# ---- the other routes ----------------------------------------------------------------------------------------


def test_models_health_and_metrics(server):
    assert server.get("/health").json() == {"status": "ok", "model": "tiny"}
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["context_length"] == 1024
    assert models["data"][0]["speculation"]["default"] == "radar"
    complete(server, speculation="tree:2")
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ('radar_requests_total{route="/v1/completions",status="200"}', "radar_prompt_tokens_total",
                 'radar_completion_tokens_total{speculation="tree:2"}', 'radar_tau_bucket{le="2.0",speculation=',
                 "radar_draft_calls_per_cycle_count", "radar_time_per_token_seconds_sum",
                 "radar_request_latency_seconds_count", "radar_queue_depth", "radar_in_flight"):
        assert name in text, name


def test_response_shapes_match_openai(server):
    """With the openai package, through its client; without it, the same calls checked against our schemas."""
    try:
        import openai
    except ImportError:
        openai = None
    from radar.serve.protocol import ChatCompletionResponse, CompletionResponse

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    if openai is not None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert completion.choices[0].text == complete(server, max_tokens=8)["choices"][0]["text"]
        reply = client.chat.completions.create(**chat)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 8
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True)
                  if c.choices]
        assert "".join(pieces) == reply.choices[0].message.content
        return
    CompletionResponse.model_validate(complete(server, model="tiny", max_tokens=8))
    r = server.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200
    ChatCompletionResponse.model_validate(r.json())


# ---- mistakes ------------------------------------------------------------------------------------------------

BAD = [
    ("bad JSON", b'{"prompt": "x", ', 400, ["not valid JSON"]),
    ("not an object", b'["x"]', 400, ["JSON object"]),
    ("missing prompt", {"max_tokens": 4}, 400, ["prompt", "required"]),
    ("prompt wrong type", {"prompt": 123}, 400, ["prompt", "string"]),
    ("prompt empty", {"prompt": ""}, 400, ["prompt"]),
    ("prompt blank", {"prompt": "   "}, 400, ["empty"]),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -5}, 400, ["max_tokens", "greater than or equal to 1"]),
    ("max_tokens past the context", {"prompt": "x", "max_tokens": 10**9}, 400, ["max_tokens", "context is 1024",
                                                                                 "at most 1022"]),
    ("max_tokens as string", {"prompt": "x", "max_tokens": "10"}, 400, ["max_tokens", "integer"]),
    ("temperature too high", {"prompt": "x", "temperature": 2.5}, 400, ["temperature"]),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 400, ["top_p", "greater than 0"]),
    ("n > 1", {"prompt": "x", "n": 2}, 400, ["n:"]),
    ("too many stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop", "at most 4"]),
    ("bad speculation", {"prompt": "x", "speculation": "eagle"}, 400, ["speculation", "radar", "tree:D"]),
    ("tree too deep", {"prompt": "x", "speculation": "tree:99"}, 400, ["speculation", "16"]),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, 404, ["gpt-4", "tiny"]),
    ("stop too long", {"prompt": "x", "stop": ["y" * 257]}, 400, ["stop", "at most 256 characters"]),
    ("penalty", {"prompt": "x", "presence_penalty": 0.5}, 400, ["presence_penalty", "not supported"]),
    ("logit_bias", {"prompt": "x", "logit_bias": {"5": 10}}, 400, ["logit_bias", "not supported"]),
    ("suffix", {"prompt": "x", "suffix": "end"}, 400, ["suffix", "not supported"]),
    ("best_of", {"prompt": "x", "best_of": 3}, 400, ["best_of"]),
    ("logprobs too many", {"prompt": "x", "logprobs": 21}, 400, ["logprobs", "20"]),
    ("logprobs streamed", {"prompt": "x", "logprobs": 2, "stream": True}, 400, ["logprobs", "stream"]),
    ("echo with logprobs", {"prompt": "x", "logprobs": 1, "echo": True}, 400, ["echo", "logprobs"]),
    ("unknown field", {"prompt": "x", "frobnicate": 1}, 400, ["frobnicate"]),
]


@pytest.mark.parametrize("name,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests_get_a_4xx_naming_the_problem(server, name, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = assert_error(server.post("/v1/completions", **kw), status, *words)
    if status == 404:
        assert err["code"] == "model_not_found"


def test_bad_chat_and_routes_and_sizes(server):
    assert_error(server.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert_error(server.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
                 400, "role")
    assert_error(server.post("/v1/chat/completions", json={"messages": [{"role": "user"}]}), 400, "content")
    assert_error(server.get("/v1/nothing"), 404, "no route")
    assert_error(server.get("/v1/completions"), 405)
    assert_error(server.post("/v1/completions", content=b'{"prompt": "' + b"x" * 1_100_000 + b'"}'), 413, "exceeds")
    chunked = iter([b'{"prompt": "', b"x" * 600_000, b"x" * 600_000, b'"}'])  # no Content-Length: counted as read
    assert_error(server.post("/v1/completions", content=chunked), 413, "exceeds")
    err = assert_error(server.post("/v1/completions", json={"prompt": "fox " * 1500, "max_tokens": 4}), 400,
                       "context")
    assert err["code"] == "context_length_exceeded"


def test_api_key_is_required_except_for_health_and_timeouts_are_504(server):
    keyed = server.url + "/keyed"
    assert httpx.get(keyed + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        err = assert_error(httpx.get(keyed + "/v1/models", headers=headers), 401, "API key")
        assert err["type"] == "authentication_error"
    assert_error(httpx.post(keyed + "/v1/completions", json={"prompt": "x"}), 401)
    assert_error(httpx.get(keyed + "/metrics"), 401)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(keyed + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
    # The scheme is case-insensitive (RFC 9110): "bearer" works as well as "Bearer".
    assert httpx.get(keyed + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    # 50 ms is far too little for 1000 tokens: 504, and the decode is abandoned.
    r = httpx.post(keyed + "/v1/completions", headers=auth, timeout=60,
                   json={"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "speculation": "off"})
    assert assert_error(r, 504, "timeout")["code"] == "timeout"
    assert "radar_timeouts_total 1.0" in httpx.get(keyed + "/metrics", headers=auth).text
