"""Serve a model over HTTP: OpenAI's chat and completions API, answered with continuous
batching, and a chat page.

    python serve.py                                   # out/ruby_002 at http://127.0.0.1:8000/
    python serve.py --init_from=gpt2 --port=8080      # any model sample.py loads
    GRAFITO_API_KEY=secret python serve.py --host=0.0.0.0 --max_batch=32   # open to the network: set a key

Endpoints: GET / (the chat page), GET /health (503 while the model loads, then 200),
GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Requests and replies have
OpenAI's shapes, so its clients work unchanged; errors too: {"error": {"message", "type",
"param", "code"}}. Every request becomes an engine.Job; one engine.Batcher thread answers
them all together. Slow or stalled requests are closed, open connections are bounded, and
SIGTERM lets running answers finish before it stops (docs/serve.md says more).
"""

import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

import checkpoint
import engine
import quantize
import tokenizer
from common import GrafitoError, resolve_device, run_cli
from configurator import check_options, integer, load_config, number

DEFAULTS = dict(
    init_from="resume",  # resume (the run in out_dir) | gpt2, gpt2-medium, ... | hub repo id | model folder
    out_dir="out/ruby_002",
    model_name="",  # the id /v1/models reports; '' names it after init_from (or out_dir)
    device="auto",
    dtype="auto",  # weights are cast to this: bfloat16 halves the memory traffic
    compile=False,  # torch.compile the decode step (one graph per power-of-two count of busy slots)
    quantize="",  # int8 | w8a8: 8-bit weights on a CPU, about half the bytes a token reads (quantize.py)
    **engine.CHAT_DEFAULTS,  # a request's defaults: max_new_tokens (its max_tokens), temperature, top_k, top_p, ...
    host="127.0.0.1",  # 0.0.0.0 opens the server to the network: set an api_key
    port=8000,
    api_key="",  # required as 'Authorization: Bearer <key>' on /v1/*; or set GRAFITO_API_KEY
    cors_origins="",  # comma-separated origins whose pages may call the API ('*' for any); none by default
    max_batch=16,  # requests decoded together (KV-cache slots)
    max_queue=64,  # requests waiting for a slot; beyond that, 503
    max_tokens_limit=4096,  # the largest max_tokens a request may ask for
    max_messages=500,  # messages per request
    max_message_chars=8000,  # characters per message (or completion prompt)
    max_conversation_chars=32000,  # characters of all messages together
    max_body_bytes=1_000_000,  # request body size
    max_stop_chars=200,  # characters per stop string (a request gives at most 4)
    request_timeout=10.0,  # seconds a request's headers and body have to arrive; then the connection is closed
    max_connections=1000,  # open connections; past it a new one replaces the oldest idle one, or is refused
    drain_seconds=20.0,  # on SIGTERM or SIGINT: time running answers get to finish before they end with an error
    log_level="info",  # uvicorn's: debug, info, warning, error
)
RULES = {
    "port": integer(1, 65535), "max_batch": integer(1, 1024), "max_queue": integer(0), "max_new_tokens": integer(1),
    "max_tokens_limit": integer(1), "max_messages": integer(1), "max_message_chars": integer(1),
    "max_conversation_chars": integer(1), "max_body_bytes": integer(1024), "max_stop_chars": integer(1),
    "request_timeout": number(0.1, 3600.0), "max_connections": integer(16), "drain_seconds": number(0.0, 3600.0),
    "log_level": (lambda v: v in ("critical", "error", "warning", "info", "debug", "trace"),
                  "one of critical, error, warning, info, debug, trace"),
    **quantize.RULES,
}
PAGE = Path(__file__).resolve().parent / "static" / "chat.html"


# ----------------------------------------------------------------------------- errors, OpenAI's shape

class APIError(Exception):
    def __init__(self, status, message, type="invalid_request_error", code=None, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(err):
    """A pydantic error as one 400: the first problem, named by where it is in the body."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    return APIError(400, f"'{where}': {message}", code="invalid_value", param=where or None)


def not_json(name):
    raise ValueError(f"{name} is not a JSON number")


async def json_body(request, schema, work):
    """The request's JSON body checked against a schema (parsed in the `work` thread pool, not on
    the event loop); every way it can be wrong is a 400 (or 415)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "send the body as JSON with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client left, or its body did not arrive within request_timeout
        raise APIError(408, "the request body did not arrive", code="request_timeout") from None
    return await asyncio.get_running_loop().run_in_executor(work, parse_body, raw, schema)


def parse_body(raw, schema):
    try:
        data = json.loads(raw, parse_constant=not_json)
    except (ValueError, RecursionError) as err:
        raise APIError(400, f"the body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


class BodyLimit:
    """Refuse request bodies over max_bytes (413), by their Content-Length or while they arrive."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.max_bytes:,} bytes",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


# ----------------------------------------------------------------------------- request bodies

class Body(BaseModel):
    """What both endpoints take. Unknown fields are ignored, as OpenAI's clients send many."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM's and llama.cpp's name
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stop: list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("n")
    @classmethod
    def one_answer(cls, n):
        if n != 1:
            raise ValueError("this server gives one answer per request (n=1): send n requests for n answers")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def no_openai_penalties(cls, penalty):
        if penalty != 0:
            raise ValueError("not supported: use repetition_penalty (1.0 is off, 1.1 to 1.3 discourages repeats)")
        return penalty

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, logprobs):
        if logprobs:
            raise ValueError("log-probabilities are not returned by this server")
        return logprobs

    @field_validator("stop", mode="before")
    @classmethod
    def one_or_more_strings(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, list) and any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def text_parts_joined(cls, content):
        """OpenAI's content may also be a list of {"type": "text", "text": ...} parts."""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts "
                                 "(this model reads text only)")
            return "".join(p["text"] for p in content)
        return content


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(Body):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported: the answer holds the continuation only")
        return echo

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send one prompt per request (a string, or a list holding one)")
        return prompt if isinstance(prompt, str) else prompt[0]


# ----------------------------------------------------------------------------- requests -> jobs

def sampling_of(body, config):
    """The request's sampling settings, the server's defaults where it gives none."""
    values = {key: getattr(body, key) if getattr(body, key) is not None else config[key]
              for key in ("temperature", "top_k", "top_p", "repetition_penalty")}
    try:
        return engine.Sampling(**values)
    except GrafitoError as err:
        raise APIError(400, str(err), code="invalid_value") from None


def stop_of(body, config):
    """The request's stop strings, each at most max_stop_chars long."""
    for i, stop in enumerate(body.stop or ()):
        if len(stop) > config["max_stop_chars"]:
            raise APIError(400, f"stop string {i} has {len(stop):,} characters: at most {config['max_stop_chars']:,} "
                                f"per stop string", code="stop_too_long", param="stop")
    return body.stop or ()


def max_tokens_of(body, config):
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or config["max_new_tokens"]
    if max_tokens > config["max_tokens_limit"]:
        raise APIError(400, f"max_tokens = {max_tokens} is above this server's limit of {config['max_tokens_limit']}",
                       code="invalid_value", param="max_tokens")
    return max_tokens


def chat_prompt(body, config, block_size, max_tokens):
    """(prompt ids, oldest turns dropped to fit the context) for a chat request."""
    if len(body.messages) > config["max_messages"]:
        raise APIError(400, f"{len(body.messages)} messages: this server takes at most {config['max_messages']}",
                       code="too_many_messages", param="messages")
    for i, message in enumerate(body.messages):
        if len(message.content) > config["max_message_chars"]:
            raise APIError(400, f"message {i} has {len(message.content):,} characters: at most "
                                f"{config['max_message_chars']:,} per message", code="message_too_long",
                           param=f"messages.{i}.content")
    total = sum(len(m.content) for m in body.messages)
    if total > config["max_conversation_chars"]:
        raise APIError(400, f"the messages hold {total:,} characters: at most {config['max_conversation_chars']:,} "
                            f"per conversation", code="conversation_too_long", param="messages")
    try:  # a system message is folded into the first instruction
        history, instruction = tokenizer.turns_from_messages([m.model_dump() for m in body.messages])
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_messages", param="messages") from None
    budget = tokenizer.prompt_budget(block_size, max_tokens)
    ids, kept, _ = tokenizer.fit_prompt(history, instruction, budget)
    if not kept and len(tokenizer.render_prompt([], instruction)) > budget:
        raise APIError(400, f"the last message does not fit the model's context: {block_size} tokens, "
                            f"{block_size - budget} of them kept for the answer (max_tokens); shorten it or ask "
                            f"for fewer tokens", code="context_length_exceeded", param="messages")
    return ids, len(history) - len(kept)


def completion_prompt(body, config, block_size, max_tokens):
    if len(body.prompt) > config["max_message_chars"]:
        raise APIError(400, f"the prompt has {len(body.prompt):,} characters: at most {config['max_message_chars']:,}",
                       code="message_too_long", param="prompt")
    ids = tokenizer.encode(body.prompt) or [tokenizer.EOT]  # an empty prompt starts a new text
    budget = tokenizer.prompt_budget(block_size, max_tokens)
    if len(ids) > budget:
        raise APIError(400, f"the prompt is {len(ids)} tokens; with room for the answer (max_tokens) the model's "
                            f"{block_size}-token context takes {budget}", code="context_length_exceeded",
                       param="prompt")
    return ids


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """One request's job in the batcher, and the chunks of its answer as the engine delivers them."""

    def __init__(self, batcher, model, kind, ids, max_tokens, sampling, stop, body, raw, dropped=0, draining=None):
        self.batcher, self.model, self.kind, self.dropped = batcher, model, kind, dropped
        self.draining = draining or (lambda: False)
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created, self.prompt_tokens = int(time.time()), len(ids)
        self.include_usage = bool((body.stream_options or {}).get("include_usage"))
        loop, self.pieces = asyncio.get_running_loop(), asyncio.Queue()
        deliver = lambda text, finish: loop.call_soon_threadsafe(self.pieces.put_nowait, (text, finish))
        self.job = engine.Job(ids, max_tokens, sampling, deliver, stop=stop, seed=body.seed, raw=raw)
        try:
            batcher.submit(self.job)
        except engine.QueueFull as err:
            raise APIError(503, str(err), type="server_error", code="server_overloaded",
                           headers={"Retry-After": "1"}) from None

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.job.generated,
                "total_tokens": self.prompt_tokens + self.job.generated}

    async def answer(self):
        """(text, finish_reason) pieces until the last; if the caller stops listening first (its
        client left), the job leaves its slot at the engine's next step."""
        try:
            while True:
                text, finish = await self.pieces.get()
                if finish == "error" and self.draining():
                    raise APIError(503, text, type="server_error", code="shutting_down")
                if finish == "error":
                    raise APIError(500, f"generation failed: {text}", type="server_error", code="engine_error")
                yield text, finish
                if finish:
                    return
        finally:
            self.batcher.cancel(self.job)

    def chunk(self, piece, finish=None, role=False):
        if self.kind == "chat":
            delta = ({"role": "assistant", "content": piece} if role else {"content": piece}) if not finish else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        data = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}
        if role and self.dropped:
            data["dropped_turns"] = self.dropped
        if self.include_usage:
            data["usage"] = None
        return data

    async def stream(self):
        """Server-sent events: the role first, then pieces, the finish reason, usage if asked, [DONE]."""
        try:
            if self.kind == "chat":
                yield sse(self.chunk("", role=True))
            finish = None
            async for piece, finish in self.answer():
                if piece:
                    yield sse(self.chunk(piece))
            yield sse(self.chunk("", finish=finish))
            if self.include_usage:
                yield sse({**self.chunk(""), "choices": [], "usage": self.usage()})
        except APIError as err:
            yield sse(err.body())
        yield "data: [DONE]\n\n"

    async def whole(self, request):
        """The complete answer as one chat.completion or text_completion object."""
        async def watch():  # Starlette stops a stream whose client leaves; a whole answer needs this
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.pieces.put_nowait(("", "client left"))

        watcher = asyncio.create_task(watch())
        text, finish = "", None
        try:
            async for piece, finish in self.answer():
                text += piece
        finally:
            watcher.cancel()
        if finish == "client left":
            return Response(status_code=499)  # nobody reads it
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if self.kind == "chat" else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        data = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage()}
        if self.kind == "chat":
            data["dropped_turns"] = self.dropped
        return JSONResponse(data, headers={"X-Dropped-Turns": str(self.dropped)})


# ----------------------------------------------------------------------------- the app

def model_name_of(config):
    if config["model_name"]:
        return config["model_name"]
    source = checkpoint.model_source(config["init_from"], config["out_dir"])
    return source.path.name if source.path is not None else source.name


def is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SimpleState:
    """What the app shares between the loading thread, the handlers and the server."""

    def __init__(self, model):
        self.model, self.batcher, self.error, self.server = model, None, None, None
        self.draining = False  # a stop signal came: new requests are refused, running ones finish


def create_app(config, load=engine.load_engine):
    """The FastAPI app; the model is loaded in a thread once the server starts (load(config) -> Engine)."""
    state = SimpleState(model=model_name_of(config))

    def load_model():
        try:
            tokenizer.get_encoding()  # the BPE files, read now rather than by the first request
            state.batcher = engine.Batcher(load(config), config["max_batch"], config["max_queue"]).start()
        except Exception as err:  # the server stops and main() reports it
            state.error = str(err) if isinstance(err, GrafitoError) else f"{type(err).__name__}: {err}"
            if state.server is not None:
                state.server.should_exit = True

    # requests are parsed, rendered and tokenized here, not on the event loop, which stays free for the others
    work = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grafito-prompt")

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_model, name="grafito-load", daemon=True).start()
        yield
        if state.batcher is not None:
            state.batcher.close()
        work.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="grafito", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.grafito = state
    app.add_middleware(BodyLimit, max_bytes=config["max_body_bytes"])
    origins = [o.strip() for o in config["cors_origins"].split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Dropped-Turns"])
    if is_loopback(config["host"]):  # a page from another site cannot reach this server by renaming itself
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])
    app.add_exception_handler(APIError, lambda request, err: err.response())
    app.add_exception_handler(HTTPException, lambda request, err: APIError(
        err.status_code, f"{request.method} {request.url.path}: {err.detail}",
        code=f"http_{err.status_code}").response())

    def ready_batcher():
        if state.draining:
            raise APIError(503, "the server is shutting down; try another one", type="server_error",
                           code="shutting_down")
        if state.batcher is None:
            raise APIError(503, "the model is still loading; try again shortly (GET /health says when it is ready)",
                           type="server_error", code="model_loading", headers={"Retry-After": "5"})
        return state.batcher

    def require_key(request: Request):
        key = config["api_key"]
        if not key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    def page():
        # the page loads nothing from elsewhere; model text is only ever set as textContent
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    def health():
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.batcher is None:
            status = {"status": "failed", "error": state.error} if state.error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        return {"status": "ok", "model": state.model, "busy": state.batcher.busy, "queued": len(state.batcher.waiting),
                "max_batch": state.batcher.max_batch, "peak_busy": state.batcher.peak_busy,
                "defaults": {"max_tokens": config["max_new_tokens"], "temperature": config["temperature"],
                             "top_p": config["top_p"], "top_k": config["top_k"]}}

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @api.get("/models")
    def models():
        ready_batcher()
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "grafito"}]}

    async def off_loop(function, *args):
        return await asyncio.get_running_loop().run_in_executor(work, function, *args)

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        batcher = ready_batcher()
        body = await json_body(request, ChatBody, work)
        max_tokens, stop, sampling = max_tokens_of(body, config), stop_of(body, config), sampling_of(body, config)
        ids, dropped = await off_loop(chat_prompt, body, config, batcher.block_size, max_tokens)
        reply = Reply(ready_batcher(), state.model, "chat", ids, max_tokens, sampling, stop, body, raw=False,
                      dropped=dropped, draining=lambda: state.draining)
        return await respond(reply, body, request)

    @api.post("/completions")
    async def completions(request: Request):
        batcher = ready_batcher()
        body = await json_body(request, CompletionBody, work)
        max_tokens, stop, sampling = max_tokens_of(body, config), stop_of(body, config), sampling_of(body, config)
        ids = await off_loop(completion_prompt, body, config, batcher.block_size, max_tokens)
        reply = Reply(ready_batcher(), state.model, "text", ids, max_tokens, sampling, stop, body, raw=True,
                      draining=lambda: state.draining)
        return await respond(reply, body, request)

    async def respond(reply, body, request):
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream", headers={
                "Cache-Control": "no-cache", "X-Dropped-Turns": str(reply.dropped)})
        return await reply.whole(request)

    app.include_router(api)
    return app


# ----------------------------------------------------------------------------- the server: connections, logs, stopping

def guarded_protocol(request_timeout, max_connections):
    """uvicorn's HTTP/1.1 protocol, guarded against clients that hold connections open.

    uvicorn closes an idle keep-alive connection, but waits forever for a request whose headers
    never end. Here a request whose headers and body have not all arrived within request_timeout
    seconds is closed, and past max_connections open connections a new one replaces the oldest
    that is not being answered (a request half sent, or an idle keep-alive), or is closed at once
    when every one is: never queued, so the file-descriptor limit is never reached.
    """
    open_connections = {}  # protocol -> None, oldest first

    class GuardedProtocol(H11Protocol):
        deadline = None
        counts = {"closed_for_timeout": 0, "replaced": 0, "refused": 0}

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(open_connections) >= max_connections:
                oldest = next((c for c in open_connections if not c.being_answered()), None)
                if oldest is None:
                    self.counts["refused"] += 1
                    transport.abort()
                    return
                self.counts["replaced"] += 1
                oldest.transport.abort()
                open_connections.pop(oldest, None)
            open_connections[self] = None
            self.watch()

        def connection_lost(self, exc):
            open_connections.pop(self, None)
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def data_received(self, data):
            super().data_received(data)
            self.watch()

        def on_response_complete(self):
            super().on_response_complete()
            self.watch()

        def being_answered(self):
            return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE) and not self.transport.is_closing()

        def watch(self):
            """The clock runs from a request's first wait until it has all arrived."""
            arrived = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.ERROR, h11.CLOSED)
            if arrived and self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None
            elif not arrived and self.deadline is None and not self.transport.is_closing():
                self.deadline = self.loop.call_later(request_timeout, self.too_slow)

        def too_slow(self):
            self.deadline = None
            if not self.transport.is_closing() and self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
                self.counts["closed_for_timeout"] += 1
                self.transport.abort()

    GuardedProtocol.open_connections = open_connections
    return GuardedProtocol


class RepeatsCounted(logging.Filter):
    """A message logged again within `window` seconds is dropped and counted; when it comes
    after that, a line says how many times it was dropped. (An accept loop failing for want of
    file descriptors would otherwise write the same traceback thousands of times a second.)"""

    def __init__(self, handler, window=60.0):
        super().__init__()
        self.handler, self.window, self.lock = handler, window, threading.Lock()
        self.recent = {}  # message -> [when first logged, times dropped since]

    def filter(self, record):
        key = (record.name, record.levelno, record.getMessage(), record.exc_info and repr(record.exc_info[1]))
        now = time.monotonic()
        with self.lock:
            first, dropped = self.recent.get(key, (None, 0))
            if first is not None and now - first < self.window:
                self.recent[key][1] += 1
                return False
            if len(self.recent) > 1000:
                self.recent = {k: v for k, v in self.recent.items() if now - v[0] < self.window}
            self.recent[key] = [now, 0]
        if dropped:
            note = logging.makeLogRecord({"name": record.name, "levelno": record.levelno,
                                          "levelname": record.levelname, "msg": f"(the next message was also logged "
                                                                                f"{dropped} more times, not shown)"})
            with self.handler.lock:
                self.handler.emit(note)
        return True


def count_repeated_logs():
    """uvicorn's log and asyncio's (where a failing accept loop reports) each say a repeated message once."""
    for handler in logging.getLogger("uvicorn").handlers:
        if not any(isinstance(f, RepeatsCounted) for f in handler.filters):
            handler.addFilter(RepeatsCounted(handler))
    asyncio_log = logging.getLogger("asyncio")
    if not any(any(isinstance(f, RepeatsCounted) for f in h.filters) for h in asyncio_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
        handler.addFilter(RepeatsCounted(handler))
        asyncio_log.addHandler(handler)
        asyncio_log.propagate = False


class Server(uvicorn.Server):
    """uvicorn's server for the app, with guarded connections and logs, and a graceful stop: on
    SIGTERM or SIGINT new requests get 503, running answers get drain_seconds to finish, then
    each one left ends with an error event (and [DONE] when streamed), and the process exits 0.
    A second signal stops at once."""

    def __init__(self, app, config, grace_seconds=5):
        self.protocol = guarded_protocol(config["request_timeout"], config["max_connections"])
        super().__init__(uvicorn.Config(app, log_level=config["log_level"], http=self.protocol, backlog=ACCEPT_BURST,
                                        timeout_graceful_shutdown=grace_seconds))  # once drained, for the last bytes
        count_repeated_logs()
        self.state, self.drain_seconds = app.state.grafito, config["drain_seconds"]
        self.state.server = self

    def handle_exit(self, sig, frame):  # uvicorn's would re-raise the signal once stopped: an exit status not 0
        if self.state.draining or self.state.batcher is None:
            self.force_exit = self.state.draining
            self.should_exit = True
            return
        self.state.draining = True
        threading.Thread(target=self.drain, name="grafito-drain", daemon=True).start()

    def drain(self):
        batcher, deadline = self.state.batcher, time.monotonic() + self.drain_seconds
        while (batcher.busy or batcher.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        batcher.close(message=f"the server is shutting down: this answer did not finish within its "
                              f"{self.drain_seconds:g} s")
        self.should_exit = True


def listening_socket(host, port):
    """A socket listening on host:port, or one clear error if another process holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=ACCEPT_BURST)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise GrafitoError(f"port {port} on {host} is already in use (another server?): stop that one or "
                               f"choose another --port") from None
        raise GrafitoError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


FILES_KEPT = 128  # file descriptors the server keeps for itself: model files, logs, threads' pipes
# connections waiting to be accepted, and accepted at once in one turn of the event loop (asyncio takes
# the listen backlog for both); a refused or replaced one holds its descriptor for a few more turns
ACCEPT_BURST = 128
IN_FLIGHT = 4 * ACCEPT_BURST


def allowed_connections(wanted):
    """The open-file limit raised (up to its hard limit) for `wanted` connections, a burst of
    new ones and the server's own files; the number of connections it then allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + IN_FLIGHT + FILES_KEPT
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return wanted if soft == resource.RLIM_INFINITY else min(wanted, soft - IN_FLIGHT - FILES_KEPT)


def main():
    config = load_config(DEFAULTS)
    check_options(config, RULES)
    quantize.check(config["quantize"], resolve_device(config["device"]), config["compile"])  # before the port opens
    engine.Sampling(temperature=config["temperature"], top_k=config["top_k"], top_p=config["top_p"],
                    repetition_penalty=config["repetition_penalty"])  # the defaults' one clear error
    config["api_key"] = config["api_key"] or os.environ.get("GRAFITO_API_KEY", "")
    if not PAGE.is_file():
        raise GrafitoError(f"the chat page {PAGE} is missing; restore it from the repository")
    allowed = allowed_connections(config["max_connections"])
    if allowed < 16:
        raise GrafitoError(f"the open-file limit (ulimit -n) leaves room for {allowed} connections; raise it")
    if allowed < config["max_connections"]:
        print(f"warning: the open-file limit (ulimit -n) allows {allowed} connections, not --max_connections="
              f"{config['max_connections']}", flush=True)
        config["max_connections"] = allowed
    sock = listening_socket(config["host"], config["port"])  # before saying we serve: the port may be taken
    app = create_app(config)
    server = Server(app, config)
    state = app.state.grafito
    shown = f"[{config['host']}]" if ":" in config["host"] else config["host"]
    print(f"serving {state.model}: chat page at http://{shown}:{config['port']}/, OpenAI API under /v1"
          f"{' (API key required)' if config['api_key'] else ''}", flush=True)
    if not is_loopback(config["host"]) and not config["api_key"]:
        print("warning: the server is open to the network without an API key (set GRAFITO_API_KEY)", flush=True)
    server.run(sockets=[sock])
    if state.error:
        raise GrafitoError(state.error)


if __name__ == "__main__":
    run_cli(main)
