"""vLLM's runtime adapter API beside lorakit's own: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (plain-text success, vLLM's statuses), vLLM's model cards (root, parent),
and the serve flags under vLLM's names. Driven over real HTTP with httpx and the `openai` client;
outputs are checked against the adapter merged into the base by full recomputation.
"""

from __future__ import annotations

import argparse
import json

import httpx
import openai
import pytest
import tiny
from test_engine import make_adapter, make_tokenizer, setup
from test_server import merged_greedy_text

from lorakit.serve import AdapterRegistry, MultiLoraModel
from lorakit.serve.app import create_app, serve_in_background
from lorakit.serve.auth import load_api_keys

ADMIN, USER = "admin-key-0000", "user-key-00001"
BASE = "tiny-gpt2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm") / "root"
    s = setup("gpt2", str(root))  # adapters a and b under root/gpt2
    for name, seed in (("c", 3), ("d", 4)):
        make_adapter(tiny.gpt2, root / "gpt2" / name, r=2, seed=seed)
    outside = make_adapter(tiny.gpt2, root.parent / "operator" / "op", r=2, seed=5)
    keys_file = root.parent / "keys.json"
    keys_file.write_text(json.dumps({ADMIN: "*", USER: ["a", BASE]}))
    multi = MultiLoraModel(tiny.gpt2(0), slots=6, max_rank=8)
    registry = AdapterRegistry(multi, root=root)
    registry.register("a", s["adapters"]["a"])
    registry.register("op", outside, trusted=True)  # the operator's own, outside the root
    app = create_app(multi, s["tokenizer"], registry, base_name=BASE, api_keys=load_api_keys(keys_file),
                     adapter_root=root)  # fmt: skip
    uvicorn_server, thread, port = serve_in_background(app)
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "tokenizer": s["tokenizer"]}
    uvicorn_server.should_exit = True
    thread.join(timeout=30)


def post(server, path: str, body: dict, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=ADMIN, max_retries=0, timeout=60)


def cards(server) -> dict[str, dict]:
    answer = httpx.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    return {card["id"]: card for card in answer["data"]}


def error_of(response: httpx.Response) -> dict:
    """The OpenAI/vLLM error envelope, checked to have exactly its four fields."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_load_then_complete_with_openai_then_unload(server):
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "gpt2/c"})
    assert loaded.status_code == 200 and loaded.headers["content-type"].startswith("text/plain")
    assert loaded.text == "Success: LoRA adapter 'c' added successfully."
    out = client(server).completions.create(model="c", prompt="a bad film", max_tokens=6, temperature=0)
    reference = merged_greedy_text(server["root"] / "gpt2" / "c", server["tokenizer"], "a bad film", 6)
    assert out.choices[0].text == reference
    unloaded = post(server, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert unloaded.status_code == 200 and unloaded.headers["content-type"].startswith("text/plain")
    assert unloaded.text == "Success: LoRA adapter 'c' removed successfully."
    gone = post(server, "/v1/completions", {"model": "c", "prompt": "the"})
    assert gone.status_code == 404 and "c" not in cards(server)


def test_an_absolute_lora_path_under_the_root_loads_too(server):
    folder = server["root"] / "gpt2" / "b"
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(folder)}).status_code == 200
    assert cards(server)["b"]["root"] == "gpt2/b"
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200


def test_a_duplicate_name_is_400_unless_load_inplace(server):
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "dup", "lora_path": "gpt2/c"}).status_code == 200
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "dup", "lora_path": "gpt2/d"})
    assert again.status_code == 400
    error = error_of(again)
    assert error["param"] == "lora_name" and "load_inplace" in error["message"]
    assert (error["type"], error["code"]) == ("InvalidUserInput", 400)  # vLLM's serving_models.py
    ask = {"model": "dup", "prompt": "a bad film", "max_tokens": 6, "temperature": 0}
    first = post(server, "/v1/completions", ask).json()["choices"][0]["text"]
    assert first == merged_greedy_text(server["root"] / "gpt2" / "c", server["tokenizer"], "a bad film", 6)
    inplace = post(server, "/v1/load_lora_adapter", {"lora_name": "dup", "lora_path": "gpt2/d", "load_inplace": True})
    assert inplace.status_code == 200 and cards(server)["dup"]["root"] == "gpt2/d"
    replaced = post(server, "/v1/completions", ask).json()["choices"][0]["text"]
    assert replaced == merged_greedy_text(server["root"] / "gpt2" / "d", server["tokenizer"], "a bad film", 6)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "dup"}).status_code == 200


def test_a_missing_path_is_404_and_outside_the_root_is_403(server):
    missing = post(server, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "gpt2/none"})
    assert missing.status_code == 404 and error_of(missing)["param"] == "lora_path"
    assert (error_of(missing)["type"], error_of(missing)["code"]) == ("NotFoundError", 404)
    outside = post(server, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "../operator/op"})
    assert outside.status_code == 403 and error_of(outside)["code"] == "path_not_allowed"
    assert "m" not in cards(server)


def test_a_folder_that_is_no_adapter_is_400_without_its_contents(server):
    junk = server["root"] / "junk"
    junk.mkdir()
    (junk / "adapter_config.json").write_text('{"secret": "do-not-echo-me"')
    answer = post(server, "/v1/load_lora_adapter", {"lora_name": "j", "lora_path": "junk"})
    assert answer.status_code == 400 and "do-not-echo-me" not in answer.text
    assert error_of(answer)["param"] == "lora_path"


def test_unloading_an_unknown_name_is_404(server):
    answer = post(server, "/v1/unload_lora_adapter", {"lora_name": "never"})
    assert answer.status_code == 404
    assert error_of(answer)["message"] == "The lora adapter 'never' cannot be found."
    assert (error_of(answer)["type"], error_of(answer)["code"]) == ("NotFoundError", 404)


def test_the_new_routes_need_an_admin_key_and_a_valid_body(server):
    body = {"lora_name": "k", "lora_path": "gpt2/c"}
    assert post(server, "/v1/load_lora_adapter", body, key=None).status_code == 401
    assert post(server, "/v1/load_lora_adapter", body, key=USER).status_code == 403
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "a"}, key=USER).status_code == 403
    bad = post(server, "/v1/load_lora_adapter", {"lora_name": "k"})
    assert bad.status_code == 400 and error_of(bad)["param"] == "lora_path"
    assert "k" not in cards(server) and "a" in cards(server)


def test_model_cards_carry_root_and_parent(server):
    shown = cards(server)
    assert shown[BASE]["parent"] is None and shown[BASE]["root"] == BASE
    assert shown["a"] == shown["a"] | {"object": "model", "owned_by": "lorakit", "parent": BASE, "root": "gpt2/a"}
    assert shown["op"]["root"] == "op"  # outside --adapter-root: the server's own folders are not shown
    assert "operator" not in json.dumps(shown)
    assert {"created"} <= set(shown["a"])


def test_the_old_adapter_api_still_works_beside_the_new_one(server):
    loaded = post(server, "/v1/adapters", {"name": "old", "path": "gpt2/c"})
    assert loaded.status_code == 200 and loaded.json()["parent"] == BASE
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "old", "lora_path": "gpt2/c"}).status_code == 400
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "old"}).status_code == 200
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "old", "lora_path": "gpt2/d"})
    assert again.status_code == 200
    deleted = httpx.delete(server["url"] + "/v1/adapters/old", headers={"Authorization": f"Bearer {ADMIN}"})
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True


def test_without_an_adapter_root_loading_is_refused(tmp_path):
    from fastapi.testclient import TestClient

    s = setup("gpt2", str(tmp_path))
    multi = MultiLoraModel(tiny.gpt2(0), slots=2, max_rank=8)
    app = create_app(multi, s["tokenizer"], AdapterRegistry(multi), base_name=BASE)
    with TestClient(app) as http:
        answer = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(s["adapters"]["a"])})
    assert answer.status_code == 403 and answer.json()["error"]["param"] == "lora_path"


def parse_serve_flags(flags: list[str]):
    from lorakit.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(flags)


def test_vllm_flag_names_are_aliases_of_lorakits():
    args = parse_serve_flags(["--max-loras", "3", "--max-lora-rank", "16", "--lora-modules", "x=d1", "y=d2"])
    assert (args.max_resident, args.max_rank, args.lora_modules) == (3, 16, ["x=d1", "y=d2"])
    assert parse_serve_flags(["--max-resident", "2", "--max-rank", "8"]).max_resident == 2


def test_lora_modules_serve_like_adapter_in_both_forms(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from lorakit.cli import main
    from lorakit.commands import serve

    model_dir = tmp_path / "tiny-gpt2"
    tiny.gpt2(0).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    first = make_adapter(tiny.gpt2, tmp_path / "adapters" / "a", r=4, seed=1)
    second = make_adapter(tiny.gpt2, tmp_path / "adapters" / "b", r=2, seed=2)
    module = json.dumps({"name": "b", "path": str(second), "base_model_name": "tiny-gpt2"})
    args = parse_serve_flags(["--model", str(model_dir), "--lora-modules", f"a={first}", module,
                              "--max-loras", "1", "--max-lora-rank", "4"])  # fmt: skip
    app, base, names = serve.build_app(args)
    assert (base, names) == ("tiny-gpt2", ["a", "b"])
    assert app.state.service.registry.max_resident == 1 and app.state.service.multi.max_rank == 4
    with TestClient(app) as http:
        shown = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        body = {"model": "b", "prompt": "a good movie", "max_tokens": 5, "temperature": 0}
        text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert shown["b"]["parent"] == "tiny-gpt2" and shown["b"]["root"] == "b"  # no --adapter-root: names only
    assert text == merged_greedy_text(second, make_tokenizer(), "a good movie", 5)
    wrong = json.dumps({"name": "b", "path": str(second), "base_model_name": "other"})
    assert main(["serve", "--model", str(model_dir), "--lora-modules", wrong]) == 2
    assert "base_model_name must be" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--lora-modules", '{"name": "b"}', "{nope"]) == 2
    err = capsys.readouterr().err
    assert "needs string fields 'name' and 'path'" in err and "is not valid JSON" in err and "Traceback" not in err
