"""The Serve app under load and with a real OpenAI client: continuous batching, admission (429), disconnects,
slow uploads, the OpenAI fields it honours, and the spec-decode metrics under vLLM's names.

Two applications on one Serve instance: "main" (route /, the default batch of 16) and "small" (route /small,
2 decoding and 2 waiting at most, a 1 s body deadline) for the overload paths.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass

import httpx
import pytest

from serve_helpers import two_apps

pytestmark = pytest.mark.slow

PROMPT = "Question: What is the capital of France?\nAnswer:"
PROMPTS = [PROMPT, "Question: Name a colour.\nAnswer:", "Once upon a time", "The fox jumps", "1 2 3 4",
           "Question: Why is the sky blue?\nAnswer:"]


@dataclass
class Apps:
    url: str
    port: int

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def metric(self, name: str, app: str = "") -> float:
        """A metric's value (the sum over its label sets) from /metrics of `app`."""
        text = httpx.get(f"{self.url}{app}/metrics", timeout=30).text
        values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        return sum(values)


@pytest.fixture(scope="module")
def apps(tiny_pair, ray_session, tmp_path_factory):
    small = dict(api_key="", max_batch_size=2, max_queue=2, body_timeout_s=1.0)
    with two_apps(tiny_pair, tmp_path_factory.mktemp("serve-batch"), dict(api_key="", timeout_s=60), small,
                  "/small") as (url, port, _):
        yield Apps(url, port)


def greedy(apps: Apps, prompt: str, app: str = "", **body) -> dict:
    r = apps.post(f"{app}/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.1)


# ---- batching -------------------------------------------------------------------------------------------------


def test_concurrent_greedy_requests_each_equal_their_single_request_output(apps):
    methods = ["radar", "tree:2", "off"]
    alone = {(p, m): greedy(apps, p, speculation=m)["choices"][0]["text"] for p in PROMPTS for m in methods}

    async def all_at_once():
        async with httpx.AsyncClient(timeout=60) as client:
            jobs = [client.post(apps.url + "/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0,
                                                                     "speculation": m})
                    for p in PROMPTS for m in methods]
            return await asyncio.gather(*jobs)

    responses = asyncio.run(all_at_once())
    assert all(r.status_code == 200 for r in responses)
    together = {(p, m): r.json()["choices"][0]["text"] for (p, m), r in zip(alone, responses)}
    assert together == alone
    assert apps.metric("radar_batch_size") == 0 and apps.metric("radar_in_flight") == 0


def test_a_hundred_concurrent_requests_get_answers_or_a_prompt_429(apps):
    async def flood():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            async def one(i):
                start = time.perf_counter()
                r = await client.post(apps.url + "/small/v1/completions",
                                      json={"prompt": PROMPTS[i % 6], "max_tokens": 300, "temperature": 0,
                                            "speculation": "off"})
                return r, time.perf_counter() - start
            return await asyncio.gather(*(one(i) for i in range(100)))

    results = asyncio.run(flood())
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 4 and codes.count(429) >= 50
    for r, seconds in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
            assert seconds < 10  # refused at once, not after waiting into a timeout
    wait_for(lambda: apps.metric("radar_in_flight", "/small") == 0 and apps.metric("radar_queue_depth", "/small") == 0)
    assert apps.metric("radar_rejected_total", "/small") == codes.count(429)


# ---- clients that leave ---------------------------------------------------------------------------------------


def test_a_stream_left_after_its_first_chunk_stops_decoding(apps):
    before = apps.metric("radar_abandoned_generated_tokens_total")
    with httpx.stream("POST", apps.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True,
                            "speculation": "off"}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    wait_for(lambda: apps.metric("radar_in_flight") == 0 and apps.metric("radar_batch_size") == 0)
    assert apps.metric("radar_abandoned_total") >= 1
    assert apps.metric("radar_abandoned_generated_tokens_total") - before < 900


def test_a_non_streamed_client_that_leaves_stops_its_decode_and_counts_as_499(apps):
    before = apps.metric("radar_abandoned_generated_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(apps.url + "/v1/completions", timeout=0.5,
                   json={"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "speculation": "off"})
    wait_for(lambda: apps.metric("radar_in_flight") == 0 and apps.metric("radar_batch_size") == 0)
    assert apps.metric("radar_abandoned_generated_tokens_total") - before < 900
    wait_for(lambda: 'route="/v1/completions",status="499"' in httpx.get(apps.url + "/metrics").text)
    assert 'status="500"' not in httpx.get(apps.url + "/metrics").text


def test_a_stream_left_before_its_first_token_never_decodes(apps):
    # Two long decodes fill the small app's batch, so the stream waits in the queue; its client leaves there.
    long = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "speculation": "off"}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            busy = [asyncio.ensure_future(client.post(apps.url + "/small/v1/completions", json=long))
                    for _ in range(2)]
            await asyncio.sleep(0.5)
            stream = asyncio.ensure_future(client.post(apps.url + "/small/v1/completions",
                                                       json={**long, "stream": True}))
            await asyncio.sleep(0.3)
            stream.cancel()  # the client goes away before any token
            return [r.status_code for r in await asyncio.gather(*busy)]

    before = apps.metric("radar_abandoned_total", "/small")
    assert asyncio.run(scenario()) == [200, 200]
    wait_for(lambda: apps.metric("radar_in_flight", "/small") == 0 and apps.metric("radar_queue_depth", "/small") == 0)
    assert apps.metric("radar_abandoned_total", "/small") - before <= 1  # cancelled in the queue or at its start


def test_a_body_uploaded_too_slowly_gets_408_and_frees_its_slot(apps):
    with socket.create_connection(("127.0.0.1", apps.port), timeout=10) as s:
        s.sendall(b"POST /small/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        answer = b""
        while chunk := s.recv(4096):  # the server closes the connection after its answer
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer
    assert greedy(apps, PROMPT, "/small")["choices"][0]["text"]


# ---- OpenAI fields --------------------------------------------------------------------------------------------


def test_null_means_default_for_every_optional_field(apps):
    body = {"prompt": PROMPT, "max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None,
            "seed": None, "stream": None, "user": None, "logprobs": None, "echo": None, "presence_penalty": None}
    r = apps.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


def test_tiny_temperatures_are_greedy_and_tiny_top_p_keeps_the_likeliest_token(apps):
    want = greedy(apps, PROMPT)["choices"][0]["text"]
    assert greedy(apps, PROMPT, temperature=1e-39)["choices"][0]["text"] == want
    assert greedy(apps, PROMPT, temperature=1.0, top_p=1e-300)["choices"][0]["text"] == want


def test_echo_returns_the_prompt_before_the_completion(apps):
    plain = greedy(apps, PROMPT)["choices"][0]["text"]
    assert greedy(apps, PROMPT, echo=True)["choices"][0]["text"] == PROMPT + plain


def test_max_completion_tokens_is_honoured_in_chat(apps):
    r = apps.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                                                "max_completion_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5


def test_response_id_is_serves_request_id(apps):
    r = apps.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, headers={"X-Request-Id": "abc-123"})
    assert r.json()["id"] == "cmpl-" + r.headers["x-request-id"]


def test_completion_logprobs_come_from_the_target(apps):
    body = greedy(apps, PROMPT, logprobs=2, max_tokens=8)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and len(top) <= 2 and max(top.values()) == pytest.approx(logprob, abs=1e-5)


# ---- the real OpenAI client -----------------------------------------------------------------------------------


@pytest.fixture
def client(apps):
    import openai

    return openai.OpenAI(base_url=apps.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_completions(client, apps):
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert done.choices[0].text == greedy(apps, PROMPT)["choices"][0]["text"]
    assert done.usage.completion_tokens > 0 and done.choices[0].finish_reason in ("stop", "length")


def test_openai_client_chat_with_logprobs(client):
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = done.choices[0].logprobs.content
    assert "".join(t.token for t in content) == done.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_openai_client_streaming_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20,
                                                                        temperature=0, stream=True))
    assert text == client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text


def test_openai_client_sees_refused_fields_as_bad_requests(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, frequency_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


# ---- metrics --------------------------------------------------------------------------------------------------


def test_spec_decode_metrics_carry_vllms_names(apps):
    before = apps.metric("vllm:spec_decode_num_drafts_total")
    body = greedy(apps, PROMPT, speculation="tree:2")
    cycles = body["speculation"]["accept_lengths"]["cycles"]
    assert apps.metric("vllm:spec_decode_num_drafts_total") - before == cycles
    accepted = apps.metric("vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= apps.metric("vllm:spec_decode_num_draft_tokens_total")
    assert apps.metric("vllm:spec_decode_num_accepted_tokens_per_pos_total") == accepted
