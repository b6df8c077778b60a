"""Server abuse: bad requests of every kind arrive while 16 clients stream, and nobody else notices.

A real uvicorn server on 127.0.0.1 (serve_in_background), the official `openai` client for the
streams, raw http.client keep-alive connections for the abuse. Passes only with no collateral
failure (a good stream that errs, ends early or differs from its adapter's reference computed
alone beforehand), no 5xx, and every abusive connection still usable after its answer.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import pytest
import tiny
from test_engine import make_tokenizer, setup

from lorakit.serve import AdapterRegistry, MultiLoraModel
from lorakit.serve.app import create_app, serve_in_background

BASE = "tiny-gpt2"
CLIENTS, ROUNDS, MAX_TOKENS = 16, 3, 20
PROMPTS = ["the cat sat on the mat", "a good movie", "we went to the sea", "a bad film", "the dog ran"]


def _nested(depth: int) -> bytes:
    return b'{"model": "a", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def bad_requests() -> list[tuple[str, str, bytes | list[bytes]]]:
    """(name, path, body) of every abuse kind; a list body goes out chunked."""
    streamed = {"model": "b", "stream": True, "max_tokens": 4}
    return [
        ("id 99999", "/v1/completions", _json({"model": "a", "prompt": [99999], "max_tokens": 4})),
        ("id -1", "/v1/completions", _json({"model": "b", "prompt": [-1], **streamed})),
        ("id 2**40", "/v1/completions", _json({"model": BASE, "prompt": [5, 2**40]})),
        ("seed 2**70", "/v1/completions", _json({"model": "a", "prompt": "the", "temperature": 1, "seed": 2**70})),
        ("surrogate", "/v1/completions", _json({"model": "a", "prompt": "the \ud800"})),
        (
            "chat surrogate",
            "/v1/chat/completions",
            _json({"model": "a", "messages": [{"role": "user", "content": "\udfff"}]}),
        ),
        ("nested 100k", "/v1/completions", _nested(100_000)),
        ("NaN", "/v1/completions", b'{"model": "a", "prompt": "the", "top_p": NaN}'),
        ("5000 digits", "/v1/completions", b'{"model": "a", "prompt": "the", "seed": 1' + b"0" * 5000 + b"}"),
        ("truncated", "/v1/completions", b'{"model": "a", "prompt": '),
        ("max_tokens", "/v1/completions", _json({"model": "a", "prompt": "the", "max_tokens": 2**70})),
        ("stop", "/v1/completions", _json({"model": "a", "prompt": "the", "stop": ["", "x"]})),
        ("path NUL", "/v1/adapters", _json({"name": "n", "path": "gpt2/a\x00b"})),
        ("path 5000", "/v1/adapters", _json({"name": "n", "path": "x" * 5000})),
        ("path 300", "/v1/adapters", _json({"name": "n", "path": "x" * 300})),
        ("symlink loop", "/v1/adapters", _json({"name": "n", "path": "loop/inside"})),
        ("chunked 2 MB", "/v1/completions", [b" " * 65536] * 32),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    s = setup("gpt2", str(root))
    (root / "loop").symlink_to(root / "loop")
    multi = MultiLoraModel(tiny.gpt2(0), slots=4, max_rank=8)
    registry = AdapterRegistry(multi, root=root)
    for name, path in s["adapters"].items():
        registry.register(name, path)
    app = create_app(multi, make_tokenizer(), registry, base_name=BASE, adapter_root=root, max_batch=32)
    uvicorn_server, thread, port = serve_in_background(app)
    yield {"port": port, "url": f"http://127.0.0.1:{port}", "registry": registry}
    uvicorn_server.should_exit = True
    thread.join(timeout=30)


def stream_once(api: openai.OpenAI, model: str, prompt: str) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        stream=True):  # fmt: skip
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


class Tally:
    """Counts shared by the threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.bad_sent = self.collateral = self.server_errors = self.dropped = 0
        self.problems: list[str] = []

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def problem(self, what: str) -> None:
        with self.lock:
            self.problems.append(what)


def good_client(server, jobs: list[tuple[str, str]], refs: dict, tally: Tally, stop: threading.Event) -> None:
    api = openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=60)
    for _ in range(ROUNDS):
        for model, prompt in jobs:
            tally.add(sent=1)
            try:
                got = stream_once(api, model, prompt)
            except Exception as err:
                got = (f"{type(err).__name__}: {err}", "exception")
            if got != refs[model, prompt]:
                tally.add(collateral=1)
                tally.problem(f"{model} {prompt!r}: {got} != {refs[model, prompt]}")
    stop.set()


def send_bad(conn: http.client.HTTPConnection, path: str, body: bytes | list[bytes]) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
    if isinstance(body, list):
        conn.request("POST", path, body=iter(body), headers=headers, encode_chunked=True)
    else:
        conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def abuser(server, tally: Tally, stop: threading.Event, offset: int) -> None:
    """Cycle through the bad requests on one keep-alive connection while the good clients run."""
    kinds = bad_requests()
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    i = offset
    while not stop.is_set():
        name, path, body = kinds[i % len(kinds)]
        i += 1
        sock = conn.sock
        tally.add(sent=1, bad_sent=1)
        try:
            status, raw = send_bad(conn, path, body)
        except (OSError, http.client.HTTPException) as err:  # a reset: the previous answer broke the connection
            tally.add(dropped=1)
            tally.problem(f"{name}: {type(err).__name__}: {err}")
            conn.close()
            continue
        if sock is not None and conn.sock is not sock:
            tally.add(dropped=1)
            tally.problem(f"{name}: the server closed the keep-alive connection before it")
        check_error_answer(name, status, raw, tally)


def check_error_answer(name: str, status: int, raw: bytes, tally: Tally) -> None:
    if status >= 500:
        tally.add(server_errors=1)
    try:
        error = json.loads(raw)["error"]
        well_formed = set(error) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        well_formed = False
    if not 400 <= status < 500 or not well_formed:
        tally.problem(f"{name}: {status} {raw[:200]!r}")


def test_bad_requests_never_touch_the_streams_around_them(server):
    models = [BASE, "a", "b"]
    jobs = [[(models[(c + k) % 3], PROMPTS[(c + k) % len(PROMPTS)]) for k in range(2)] for c in range(CLIENTS)]
    api = openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=60)
    refs = {job: stream_once(api, *job) for client_jobs in jobs for job in client_jobs}  # each alone, first
    assert all(reason in ("length", "stop") for _, reason in refs.values())

    tally, stops = Tally(), [threading.Event() for _ in range(CLIENTS)]
    all_done = threading.Event()
    good = [threading.Thread(target=good_client, args=(server, jobs[c], refs, tally, stops[c])) for c in range(CLIENTS)]
    bad = [threading.Thread(target=abuser, args=(server, tally, all_done, k * 7)) for k in range(3)]
    start = time.monotonic()
    for thread in bad + good:
        thread.start()
    for thread in good:
        thread.join(timeout=120)
    all_done.set()
    for thread in bad:
        thread.join(timeout=60)
    elapsed = time.monotonic() - start
    print(
        f"\nabuse: {tally.sent} requests sent ({tally.bad_sent} bad) in {elapsed:.1f} s; collateral failures "
        f"{tally.collateral}; 5xx {tally.server_errors}; dropped connections {tally.dropped}"
    )
    print(*sorted({p[:160] for p in tally.problems})[:20], sep="\n")
    assert tally.problems == []
    assert (tally.collateral, tally.server_errors, tally.dropped) == (0, 0, 0)
    assert tally.bad_sent >= len(bad_requests())  # every kind went out at least once
    assert server["registry"].pinned() == {}
