"""An OpenAI-compatible completions server (FastAPI) over one :class:`~catkit.serve.engine.Engine`.

One background thread steps the engine while there is work, so concurrent HTTP requests batch
together. Handlers talk to it through the engine's lock-protected ``add_request`` / ``abort`` and
per-request token callbacks that hand tokens to the handler's asyncio queue.

Endpoints: ``POST /v1/completions`` (model, prompt, max_tokens, temperature, top_p, top_k,
seed, stop, stream), ``POST /v1/chat/completions`` (the same with ``messages`` instead of
``prompt``; see :func:`apply_chat_template`), ``GET /v1/models``, ``GET /health``. Every bad
request is an HTTP 400 with a message; a client that disconnects mid-stream has its request aborted and its KV blocks freed.
"""


import asyncio
import codecs
import json
import threading
import time
import uuid

from catkit.serve.engine import Engine, SamplingParams

_MAX_STOP = 4  # OpenAI allows up to 4 stop strings


class BadRequest(ValueError):
    pass


class EngineLoop:
    """The background thread that steps ``engine`` while it has work."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="catkit-engine", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            if not self.engine.has_work():
                self.wake.wait(0.05)  # bounded wait: a missed wake-up costs at most 50 ms
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # never leave handlers hanging on a broken step
                self.engine.fail_all("error")

    def stop(self):
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)


def _opt_number(body, name, kind, default):
    val = body.get(name, default)
    if val is None:
        return default
    if isinstance(val, bool) or not isinstance(val, kind):
        raise BadRequest(f"{name}: expected a number, got {val!r}")
    return val


def _check_model(body, model_name: str) -> None:
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    model = body.get("model", model_name)
    if model != model_name:
        raise BadRequest(f"model: unknown model {model!r}; this server has {model_name!r}")


def _parse_params(body, ids, engine: Engine, extra_stops=()):
    """The sampling fields shared by both endpoints; returns (SamplingParams, stop bytes, stream)."""
    if not ids:
        raise BadRequest("prompt: empty")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
    temperature = float(_opt_number(body, "temperature", (int, float), 1.0))
    top_p = _opt_number(body, "top_p", (int, float), None)
    top_k = _opt_number(body, "top_k", int, None)
    seed = _opt_number(body, "seed", int, None)
    if temperature < 0:
        raise BadRequest(f"temperature: expected >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise BadRequest(f"top_p: expected in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise BadRequest(f"top_k: expected >= 1, got {top_k}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > _MAX_STOP:
        raise BadRequest(f"stop: expected a non-empty string or a list of up to {_MAX_STOP} of them")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected true or false")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=None if top_p is None else float(top_p), seed=seed)
    try:
        engine.check_request(ids, params)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return params, [s.encode("utf-8") for s in list(stop) + list(extra_stops)], stream


def parse_completion(body, engine: Engine, tokenizer, model_name: str):
    """Validate a /v1/completions body; returns (prompt ids, SamplingParams, stop strings, stream)."""
    _check_model(body, model_name)
    if "prompt" not in body:
        raise BadRequest("prompt: missing")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt: expected a string")
    ids = tokenizer.encode(prompt)
    return (ids, *_parse_params(body, ids, engine))


CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOP = "\n<|"  # the start of the next turn marker ends an assistant turn


def apply_chat_template(messages) -> str:
    """The chat template of catkit byte models: plain-text turn markers, one per message.

    Each message becomes ``<|role|>\n{content}\n``; the prompt ends with ``<|assistant|>\n``
    so the model writes the assistant's turn, which ends at the next ``\n<|`` (a stop string the
    server always adds). ``messages``: a non-empty list of ``{"role": "system" | "user" |
    "assistant", "content": str}``. Example::

        apply_chat_template([{"role": "user", "content": "hi"}])
        # '<|user|>\nhi\n<|assistant|>\n'
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content} objects")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise BadRequest(f"messages[{i}].role: expected one of {CHAT_ROLES}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: only text parts are meaningful here
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected a string")
        parts.append(f"<|{role}|>\n{content}\n")
    return "".join(parts) + "<|assistant|>\n"


def parse_chat(body, engine: Engine, tokenizer, model_name: str):
    """Validate a /v1/chat/completions body; returns (prompt ids, SamplingParams, stop strings, stream)."""
    _check_model(body, model_name)
    if "messages" not in body:
        raise BadRequest("messages: missing")
    ids = tokenizer.encode(apply_chat_template(body["messages"]))
    return (ids, *_parse_params(body, ids, engine, extra_stops=(CHAT_STOP,)))


class _TextAssembler:
    """Turns generated byte ids into text deltas, cutting at the first stop string.

    Text that could still be the start of a stop string is held back until it can't be.
    """

    def __init__(self, tokenizer, stops: list[bytes]):
        self.tok, self.stops = tokenizer, stops
        self.buf = bytearray()
        self.sent = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopped = False

    def push(self, token: int | None) -> str:
        """Add one token (None = generation ended); returns the new text that is safe to send."""
        if self.stopped:
            return ""
        final = token is None
        if token is not None:
            self.buf += self.tok.decode_bytes([token])
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0:
                del self.buf[i:]
                self.stopped = final = True
        hold = 0 if final else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.buf) - hold)
        out = self.decoder.decode(bytes(self.buf[self.sent:end]), final=final)
        self.sent = end
        return out


def create_app(engine: Engine, tokenizer, model_name: str):
    """A FastAPI app serving ``engine``; the engine thread starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        app.state.loop = EngineLoop(engine)
        try:
            yield
        finally:
            app.state.loop.stop()

    app = FastAPI(title="catkit", lifespan=lifespan)
    app.state.engine = engine

    def error(msg: str, status: int = 400):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": engine.num_waiting,
                "free_blocks": engine.cache.num_free}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "catkit",
                                            "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request, parse_chat, chat=True)

    async def _handle(request, parse, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(f"body: malformed JSON ({e})")
        try:
            ids, params, stops, stream = parse(body, engine, tokenizer, model_name)
        except BadRequest as e:
            return error(str(e))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(req, token):  # runs on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, token)

        try:
            rid = engine.add_request(ids, params, on_token=on_token)
        except ValueError as e:
            return error(str(e))
        app.state.loop.wake.set()
        req = engine.requests[rid]
        cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        text = _TextAssembler(tokenizer, stops)

        def finish_reason():
            if text.stopped:
                return "stop"
            return {"length": "length", "stop": "stop"}.get(req.finish_reason, req.finish_reason)

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(req.output),
                    "total_tokens": len(ids) + len(req.output)}

        def chunk(delta, reason):
            """One response object: a stream chunk (delta: str or dict for chat) or the final body."""
            head = {"id": cid, "created": created, "model": model_name}
            if not chat:
                return {**head, "object": "text_completion",
                        "choices": [{"text": delta, "index": 0, "logprobs": None, "finish_reason": reason}]}
            if isinstance(delta, dict):  # streaming chat chunk
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": delta},
                                 "logprobs": None, "finish_reason": reason}]}

        async def tokens(poll_disconnect: bool = False):
            """Text deltas until the request ends or a stop string shows up; aborts on early exit.

            Streaming responses are cancelled by Starlette when the client leaves; a plain response
            polls ``is_disconnected`` while it waits, so an abandoned request stops too.
            """
            next_poll = time.monotonic() + 0.25
            try:
                while True:
                    if poll_disconnect:
                        if time.monotonic() >= next_poll:  # by the clock: tokens may never pause
                            next_poll = time.monotonic() + 0.25
                            if await request.is_disconnected():
                                return
                        try:
                            token = await asyncio.wait_for(queue.get(), 0.25)
                        except asyncio.TimeoutError:
                            continue
                    else:
                        token = await queue.get()
                    delta = text.push(token)
                    if text.stopped and not req.finished:
                        engine.abort(rid)
                        app.state.loop.wake.set()
                    yield delta
                    if token is None or text.stopped:
                        return
            finally:
                if not req.finished:  # client gone or stop string: free the KV blocks now
                    engine.abort(rid)
                    app.state.loop.wake.set()

        if stream:
            async def sse():
                if chat:  # OpenAI sends the role first, then content deltas
                    yield f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}, None))}\n\n"
                async for delta in tokens():
                    if delta:
                        yield f"data: {json.dumps(chunk({'content': delta} if chat else delta, None))}\n\n"
                final = chunk({} if chat else "", finish_reason())
                final["usage"] = usage()
                yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts = [d async for d in tokens(poll_disconnect=True)]
        if req.finish_reason == "error":
            return error("engine: the request failed", 500)
        out = chunk("".join(parts), finish_reason())
        out["usage"] = usage()
        return out

    return app


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, tokenizer, model_name), host=host, port=port, log_level="info")
