"""HTTP tests against a real uvicorn server thread on 127.0.0.1 (httpx client, bounded timeouts)."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from catkit.data import ByteTokenizer
from catkit.models import CatModel, ModelConfig
from catkit.serve import Engine
from catkit.serve.server import CHAT_STOP, BadRequest, _TextAssembler, apply_chat_template, create_app

NAME = "tiny-test"
BLOCKS = 64
TIMEOUT = httpx.Timeout(20.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = CatModel(ModelConfig(vocab_size=259, d_model=32, n_heads=4, n_kv_heads=2, pattern="AA",
                                 max_seq_len=256, init_std=0.5)).eval()
    engine = Engine(model, max_batch_size=4, num_blocks=BLOCKS, block_size=8)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, ByteTokenizer(), NAME), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        pytest.fail("server did not start")
    yield url, engine, model
    srv.should_exit = True
    th.join(timeout=10)


def _wait_idle(engine, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if engine.cache.num_free == BLOCKS and not engine.has_work():
            return True
        time.sleep(0.02)
    return False


def _greedy_text(model, prompt, n):
    tok = ByteTokenizer()
    ids = model.generate(torch.tensor([tok.encode(prompt)]), n)[0, len(tok.encode(prompt)):].tolist()
    return tok.decode_bytes(ids)


def test_health_and_models(server):
    url, engine, _ = server
    r = httpx.get(url + "/health", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(url + "/v1/models", timeout=TIMEOUT)
    assert r.json()["data"][0]["id"] == NAME


def test_completion_greedy(server):
    url, engine, model = server
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 12,
                                                  "temperature": 0}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    expect = _greedy_text(model, "hello", 12).decode("utf-8", errors="replace")
    assert choice["text"] == expect
    assert _wait_idle(engine)


def test_stop_string(server):
    url, engine, model = server
    # find a prompt whose greedy continuation has two printable ASCII bytes to use as the stop string
    for i in range(50):
        prompt = f"abc{i}"
        full = _greedy_text(model, prompt, 30)
        spots = [j for j in range(4, 28) if all(32 <= c < 127 for c in full[j:j + 2])]
        if spots:
            break
    else:
        pytest.fail("no printable stop string found")
    stop = full[spots[0]:spots[0] + 2]
    cut = full.find(stop)
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0,
                                                  "stop": ["zzzzzz", stop.decode()]}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[:cut].decode("utf-8", "replace")
    assert _wait_idle(engine)


def test_text_assembler_holds_back_stop_prefix_and_split_utf8():
    tok = ByteTokenizer()
    a = _TextAssembler(tok, [b"END"])
    ids = tok.encode("h\u00e9 EN") + tok.encode("Dx")
    out = [a.push(t) for t in ids]
    # "é" is two bytes: nothing is sent for its first byte; "EN" is held back (could start "END")
    assert "".join(out) == "h\u00e9 " and a.stopped and out[-1] == "" and out[1] == ""
    b = _TextAssembler(tok, [])
    assert "".join(b.push(t) for t in tok.encode("ok\u00e9")) + b.push(None) == "ok\u00e9"


def _sse_events(lines):
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_streaming_matches_non_streaming(server):
    url, engine, _ = server
    req = {"prompt": "stream me", "max_tokens": 20, "temperature": 0.8, "seed": 7}
    plain = httpx.post(url + "/v1/completions", json=req, timeout=TIMEOUT).json()["choices"][0]["text"]
    with httpx.stream("POST", url + "/v1/completions", json={**req, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3  # tokens arrive as several events, not one blob
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 20
    assert _wait_idle(engine)


def test_concurrent_requests_batch_together(server):
    url, engine, model = server
    prompts = [f"request number {i}" for i in range(6)]
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(len(engine.running))
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()

    def call(p):
        return httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 40, "temperature": 0},
                          timeout=TIMEOUT)

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(call, prompts))
    stop.set()
    w.join()
    for p, r in zip(prompts, results):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _greedy_text(model, p, 40).decode("utf-8", errors="replace")
    assert max(peak) >= 2  # several requests were decoded in the same batch
    assert _wait_idle(engine)


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2]",
    json.dumps({"max_tokens": 5}).encode(),
    json.dumps({"prompt": ""}).encode(),
    json.dumps({"prompt": 5}).encode(),
    json.dumps({"prompt": "x", "max_tokens": -1}).encode(),
    json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(),
    json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(),
    json.dumps({"prompt": "x" * 250, "max_tokens": 10}).encode(),
    json.dumps({"prompt": "x", "model": "gpt-17"}).encode(),
    json.dumps({"prompt": "x", "temperature": -0.5}).encode(),
    json.dumps({"prompt": "x", "top_p": 0}).encode(),
    json.dumps({"prompt": "x", "top_p": 1.5}).encode(),
    json.dumps({"prompt": "x", "top_k": 0}).encode(),
    json.dumps({"prompt": "x", "stop": 3}).encode(),
    json.dumps({"prompt": "x", "stream": "yes"}).encode(),
], ids=lambda b: b[:40].decode())
def test_bad_requests_are_400(server, body):
    url, engine, _ = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert _wait_idle(engine, 1.0)


def test_disconnect_mid_stream_frees_blocks(server, monkeypatch):
    url, engine, _ = server
    orig = engine.step

    def slow_step():  # slow decoding so the request is still running when the client leaves
        time.sleep(0.01)
        return orig()

    monkeypatch.setattr(engine, "step", slow_step)
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", url + "/v1/completions",
                           json={"prompt": "long", "max_tokens": 240, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            got = [l for l in (next(lines) for _ in range(4)) if l.startswith("data: ")]
            assert got
            assert engine.cache.num_free < BLOCKS
            rid = max(engine.requests)
        # leaving the block closes the connection mid-stream
    assert _wait_idle(engine, 5.0), "blocks were not freed after the client disconnected"
    req = engine.requests[rid]
    assert req.finish_reason == "abort" and len(req.output) < 240


def test_engine_failure_does_not_hang(server, monkeypatch):
    url, engine, _ = server

    def boom(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine, "_forward", boom)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=TIMEOUT)
    assert r.status_code == 500 and "failed" in r.json()["error"]["message"]
    assert _wait_idle(engine, 5.0)
    monkeypatch.undo()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=TIMEOUT)
    assert r.status_code == 200  # the engine thread survived


def test_disconnect_non_streaming_frees_blocks(server, monkeypatch):
    url, engine, _ = server
    orig = engine.step

    def slow_step():
        time.sleep(0.02)
        return orig()

    monkeypatch.setattr(engine, "step", slow_step)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 240 slow tokens
        httpx.post(url + "/v1/completions", json={"prompt": "long", "max_tokens": 240, "temperature": 0},
                   timeout=httpx.Timeout(20.0, read=0.5))
    rid = max(engine.requests)
    assert _wait_idle(engine, 5.0), "blocks were not freed after the client went away"
    req = engine.requests[rid]
    assert req.finish_reason == "abort" and len(req.output) < 240


# ---- /v1/chat/completions ----
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_template():
    assert apply_chat_template(MSGS) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert apply_chat_template(parts) == "<|user|>\nab\n<|assistant|>\n"
    for bad in ([], "hi", [{"role": "bot", "content": "x"}], [{"role": "user"}], [3],
                [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(BadRequest):
            apply_chat_template(bad)


def _expected(model, n):
    full = _greedy_text(model, apply_chat_template(MSGS), n)
    cut = full.find(CHAT_STOP.encode())
    return (full if cut < 0 else full[:cut]).decode("utf-8", "replace"), cut >= 0


def test_chat_greedy_and_stream(server):
    url, engine, model = server
    req = {"model": NAME, "messages": MSGS, "max_tokens": 20, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=req, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    text, stopped = _expected(model, 20)
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == ("stop" if stopped else "length")
    n_prompt = len(apply_chat_template(MSGS).encode())
    assert body["usage"]["prompt_tokens"] == n_prompt
    # streaming: role first, then content deltas that add up to the same text, then finish + [DONE]
    chunks = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**req, "stream": True}, timeout=TIMEOUT) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    objs = [json.loads(c) for c in chunks[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs) == text
    assert objs[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] and "usage" in objs[-1]
    assert _wait_idle(engine)


@pytest.mark.parametrize("body", [
    {"max_tokens": 5},
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": MSGS, "max_tokens": 0},
    {"messages": MSGS, "temperature": -1},
    {"messages": MSGS, "model": "gpt-17"},
    {"messages": [{"role": "user", "content": "x" * 300}]},
], ids=lambda b: json.dumps(b)[:40])
def test_chat_bad_requests_are_400(server, body):
    url, engine, _ = server
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert _wait_idle(engine, 1.0)
