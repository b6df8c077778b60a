"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on 127.0.0.1.

Outputs are checked against independent references: greedy decoding by full recomputation on the
base with the adapter merged (test_engine.reference), and a merged classifier's softmax.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import tiny
import torch
from test_engine import make_adapter, make_tokenizer, reference, setup

from lorakit import LoraConfig, inject
from lorakit.core.adapters import merge_and_unload
from lorakit.files.peft_format import load_adapter, save_adapter
from lorakit.serve import AdapterRegistry, MultiLoraModel
from lorakit.serve.app import create_app, serve_in_background
from lorakit.serve.auth import load_api_keys
from lorakit.serve.engine import SamplingParams

ADMIN, USER = "admin-key-0000", "user-key-00001"
BASE = "tiny-gpt2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    s = setup("gpt2", str(root))  # adapters a (r=4) and b (r=8, rsLoRA) under root/gpt2
    make_adapter(tiny.gpt2, root / "gpt2" / "c", r=2, seed=3)
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps({ADMIN: "*", USER: ["a", BASE]}))
    multi = MultiLoraModel(tiny.gpt2(0), slots=4, max_rank=8)
    registry = AdapterRegistry(multi, root=root)
    for name, path in s["adapters"].items():
        registry.register(name, path)
    app = create_app(
        multi, s["tokenizer"], registry, base_name=BASE, api_keys=load_api_keys(keys_file),
        adapter_root=root, max_body=4096,
    )  # fmt: skip
    uvicorn_server, thread, port = serve_in_background(app)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "root": str(root), "engine": app.state.engine, "tokenizer": s["tokenizer"], "registry": registry}
    uvicorn_server.should_exit = True
    thread.join(timeout=30)


def client(server, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def expected(server, adapter: str | None, prompt: str, n: int) -> tuple[str, str]:
    """(text, finish_reason) of greedy decoding on the merged model, stopping at EOS (id 0) as the server does."""
    tokens = reference("gpt2", server["root"], adapter, prompt, n)
    reason = "length"
    if 0 in tokens:
        tokens, reason = tokens[: tokens.index(0)], "stop"
    return server["tokenizer"].decode(tokens, skip_special_tokens=True), reason


def merged_greedy_text(folder: Path, tokenizer, prompt: str, n: int) -> str:
    """Greedy text of tiny.gpt2(0) with the adapter at `folder` merged, by full recomputation, up to EOS (0)."""
    model = merge_and_unload(load_adapter(tiny.gpt2(0), folder)).eval()
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == 0:
                break
            ids.append(token)
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_models_lists_base_and_adapters_per_key(server):
    assert [m.id for m in client(server).models.list().data] == [BASE, "a", "b"]
    assert [m.id for m in client(server, USER).models.list().data] == [BASE, "a"]


def test_completions_per_adapter_equal_the_merged_reference_and_differ(server):
    texts = {}
    for model, adapter in ((BASE, None), ("a", "a"), ("b", "b")):
        out = client(server).completions.create(model=model, prompt="a good movie", max_tokens=8, temperature=0)
        text, reason = expected(server, adapter, "a good movie", 8)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (text, reason), model
        assert out.usage.prompt_tokens == 3 and out.model == model
        texts[model] = text
    assert len(set(texts.values())) == 3
    batch = client(server).completions.create(model="a", prompt=["the cat", "we went"], max_tokens=6, temperature=0)
    assert [c.text for c in batch.choices] == [expected(server, "a", p, 6)[0] for p in ("the cat", "we went")]


def test_chat_uses_role_lines_and_streaming_equals_non_streaming(server):
    messages = [{"role": "user", "content": "the cat sat"}]
    out = client(server).chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    text, reason = expected(server, "b", "user: the cat sat\nassistant:", 8)
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == reason
    assert out.choices[0].message.role == "assistant"
    chunks = list(
        client(server).chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason and len(chunks) > 2
    stream = client(server).completions.create(model="a", prompt="the dog", max_tokens=10, temperature=0, stream=True)
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces) == expected(server, "a", "the dog", 10)[0]


def test_a_client_leaving_mid_stream_frees_its_row_and_pin(server):
    body = {"model": "a", "prompt": "the", "max_tokens": 60, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers=headers, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: {")
    deadline = time.monotonic() + 20
    while server["registry"].pinned() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server["registry"].pinned() == {}
    after = server["engine"].generate("the", "a", SamplingParams(max_tokens=3, temperature=0))
    assert (after.text, after.finish_reason) == expected(server, "a", "the", 3)


def test_seeded_sampling_is_reproducible_over_http(server):
    kwargs = {"model": "a", "prompt": "the cat", "max_tokens": 10, "temperature": 1.0, "top_p": 0.95, "seed": 11}
    first = client(server).completions.create(**kwargs).choices[0].text
    assert client(server).completions.create(**kwargs).choices[0].text == first
    # it really sampled: another seed, and greedy decoding, give other texts (100 near-even ids, 10 tokens)
    assert client(server).completions.create(**{**kwargs, "seed": 12}).choices[0].text != first
    assert client(server).completions.create(**{**kwargs, "temperature": 0}).choices[0].text != first


def test_api_keys_401_and_403(server):
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, "wrong-key-0000").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(server, USER).completions.create(model="b", prompt="the", max_tokens=2)
    assert err.value.status_code == 403 and err.value.body["param"] == "model"
    # An adapter that does not exist looks the same to a key that may not use it: no existence leak.
    with pytest.raises(openai.PermissionDeniedError):
        client(server, USER).completions.create(model="no-such-adapter", prompt="the", max_tokens=2)
    denied = post(server, "/v1/adapters", {"name": "x", "path": "gpt2/c"}, key=USER)  # only "*" keys manage adapters
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    assert post(server, "/v1/completions", {"model": "a", "prompt": "the"}, key="").status_code == 401
    assert client(server, USER).completions.create(model="a", prompt="the", max_tokens=2, temperature=0).choices


def post(server, path: str, body: bytes | dict, key: str = ADMIN) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server["url"] + path, content=data, headers=headers, timeout=60)


BAD = [
    (b'{"model": "a", "prompt": ', 400, "invalid_json", None),
    ({"model": "nope", "prompt": "the"}, 404, "model_not_found", "model"),
    ({"model": "a", "prompt": " ".join(["the"] * 70)}, 400, "context_length_exceeded", "prompt"),
    ({"model": "a", "prompt": "the cat", "max_tokens": 500}, 400, "context_length_exceeded", "max_tokens"),
    ({"model": "a", "prompt": "the", "temperature": 5}, 400, "invalid_value", "temperature"),
    ({"model": "a"}, 400, "invalid_value", "prompt"),
    ({"model": "a", "prompt": "the " * 2000}, 413, "body_too_large", None),
    ({"model": "a", "prompt": [99999]}, 400, "invalid_token_id", "prompt"),
    ({"model": "a", "prompt": [-1]}, 400, "invalid_token_id", "prompt"),
    ({"model": "a", "prompt": [2**40]}, 400, "invalid_token_id", "prompt"),
    ({"model": "a", "prompt": "the", "temperature": 1, "seed": 2**70}, 400, None, "seed"),
    ({"model": "a", "prompt": "the \ud800 cat"}, 400, "invalid_json", None),
    (b'{"model": "a", "prompt": "the", "temperature": NaN}', 400, "invalid_json", None),
    (b'{"model": "a", "prompt": ' + b"[" * 4000, 400, "invalid_json", None),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, code, param):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param) and error["message"]
    assert client(server).completions.create(model="a", prompt="the", max_tokens=2, temperature=0).choices


def test_errors_leave_the_keep_alive_connection_usable(server, tmp_path):
    loop = Path(server["root"]) / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    bad = [
        ("/v1/completions", {"model": "a", "prompt": "\ud800"}, 400),
        ("/v1/completions", b"[" * 4000, 400),  # deeper than the recursion limit, inside max_body
        ("/v1/adapters", {"name": "n", "path": "gpt2/a\x00b"}, 400),
        ("/v1/adapters", {"name": "n", "path": "x" * 300}, 400),  # one name past NAME_MAX (5,000 is past max_body here)
        ("/v1/adapters", {"name": "n", "path": "loop"}, 400),
        ("/v1/adapters", {"name": "n", "path": "loop/inside"}, 400),
    ]
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server["url"], headers=headers, timeout=60) as http:
        for path, body, status in bad:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(path, content=data)
            assert response.status_code == status, (path, body if isinstance(body, dict) else body[:40])
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
            assert response.headers.get("connection") != "close"
            good = http.post("/v1/completions", json={"model": "a", "prompt": "the", "max_tokens": 2, "temperature": 0})
            assert good.status_code == 200
    assert server["registry"].pinned() == {}


def test_an_unexpected_failure_is_a_json_500_on_a_live_connection(server, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(server["engine"], "chat_prompt", broken)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    messages = [{"role": "user", "content": "the"}]
    with httpx.Client(base_url=server["url"], headers=headers, timeout=60) as http:
        response = http.post("/v1/chat/completions", json={"model": "a", "messages": messages})
        assert response.status_code == 400  # a template error is the request's
        monkeypatch.setattr(server["engine"], "encode", broken)
        response = http.post("/v1/completions", json={"model": "a", "prompt": "the"})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        monkeypatch.undo()
        good = http.post("/v1/completions", json={"model": "a", "prompt": "the", "max_tokens": 2, "temperature": 0})
        assert good.status_code == 200


def test_health_names_adapters_only_to_a_key_and_auth_comes_before_the_body(server):
    anonymous = httpx.get(server["url"] + "/health").json()
    assert anonymous["status"] == "ok" and "adapters" not in anonymous
    as_user = httpx.get(server["url"] + "/health", headers={"Authorization": f"Bearer {USER}"}).json()
    assert as_user["adapters"] == ["a"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/adapters"):
        assert post(server, path, b"{not json", key="").status_code == 401, path
        assert post(server, path, b"{not json", key="wrong-key-0000").status_code == 401, path


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    import socket

    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
        sent, answer = 0, b""
        sock.settimeout(0.002)
        while sent < 64 << 20 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(chunk)
                sent += 1024
                answer += sock.recv(65536)
            except TimeoutError:
                continue
        sock.settimeout(30)
        while b"}}" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"body_too_large"' in answer
    assert sent < 8 << 20  # refused near the 4 KB limit, not after the whole 64 MB arrived


def test_load_and_delete_adapters_under_the_root_only(server):
    outside = post(server, "/v1/adapters", {"name": "evil", "path": "../../../etc"})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "path_not_allowed"
    missing = post(server, "/v1/adapters", {"name": "m", "path": "gpt2/none"})
    assert missing.status_code == 404
    loaded = post(server, "/v1/adapters", {"name": "c", "path": "gpt2/c"})
    assert loaded.status_code == 200
    assert "c" in [m.id for m in client(server).models.list().data]
    # c's output is c merged into the base (reference computed from its folder)
    out = client(server).completions.create(model="c", prompt="a bad film", max_tokens=6, temperature=0)
    folder = Path(server["root"]) / "gpt2" / "c"
    assert out.choices[0].text == merged_greedy_text(folder, server["tokenizer"], "a bad film", 6)
    deleted = httpx.delete(server["url"] + "/v1/adapters/c", headers={"Authorization": f"Bearer {ADMIN}"})
    assert deleted.status_code == 200
    assert post(server, "/v1/completions", {"model": "c", "prompt": "the"}).status_code == 404
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_classify_returns_the_merged_classifier_probabilities(tmp_path):
    from fastapi.testclient import TestClient

    torch.manual_seed(0)
    lora = inject(
        tiny.bert(0), LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.add_(torch.randn(param.shape) * 0.5)
    folder = save_adapter(lora, tmp_path / "cls")
    multi = MultiLoraModel(tiny.bert(0), slots=2, max_rank=8, target_modules=["query", "value"])
    registry = AdapterRegistry(multi)
    registry.register("cls", folder)
    tokenizer = make_tokenizer()
    app = create_app(multi, tokenizer, registry, base_name="tiny-bert")
    texts = ["a good movie", "a bad film with a slow plot"]
    with TestClient(app) as http:
        got = http.post("/v1/classify", json={"model": "cls", "input": texts}).json()["data"]
        wrong = http.post("/v1/completions", json={"model": "cls", "prompt": "the"})
    merged = merge_and_unload(load_adapter(tiny.bert(0), folder)).eval()
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        probs = merged(**batch).logits.softmax(-1)
    for row, p in zip(got, probs, strict=True):
        assert list(row["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)
        assert row["label"] == merged.config.id2label[int(p.argmax())]
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unsupported"


def test_serve_command_builds_the_app_from_folders_and_refuses_bad_flags(tmp_path, capsys):
    import argparse

    from fastapi.testclient import TestClient

    from lorakit.cli import main
    from lorakit.commands import serve

    model_dir = tmp_path / "tiny-gpt2"
    tiny.gpt2(0).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    adapter = make_adapter(tiny.gpt2, tmp_path / "adapters" / "a", r=4, seed=1)
    keys = tmp_path / "keys.toml"
    keys.write_text(f'"{ADMIN}" = "*"\n')

    assert main(["serve", "--model", str(model_dir), "--adapter", "a", "--adapter", f"b={tmp_path}/nope"]) == 2
    err = capsys.readouterr().err
    assert "'a' is not NAME=DIR" in err and "does not exist" in err and "Traceback" not in err
    assert main(["serve", "--model", str(tmp_path), "--port", "70000"]) == 2
    assert "no config.json" in capsys.readouterr().err
    bad_keys = tmp_path / "bad.json"
    bad_keys.write_text("{not json")
    assert main(["serve", "--model", str(model_dir), "--api-keys", str(bad_keys)]) == 2
    assert "not valid JSON" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--adapter", f"a={adapter}", "--api-keys", str(keys)])
    app, base, names = serve.build_app(args)
    assert (base, names) == ("tiny-gpt2", ["a"])
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(app) as http:
        assert [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]] == ["tiny-gpt2", "a"]
        body = {"model": "a", "prompt": "a good movie", "max_tokens": 5, "temperature": 0}
        text = http.post("/v1/completions", json=body, headers=auth).json()["choices"][0]["text"]
        assert http.get("/v1/models").status_code == 401
    assert text == merged_greedy_text(adapter, make_tokenizer(), "a good movie", 5)
