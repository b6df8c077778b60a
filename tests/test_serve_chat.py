"""/v1/chat/completions renders each request with the chat template of the adapter it names
(chat_template.jinja in the adapter folder, as `lorakit train` stores it), and `lorakit serve`
with no arguments serves the shipped chat adapter as "chat".

The reference for a prompt is the template rendered by jinja2 directly (or written out by hand)
and tokenized by the tokenizer: the token ids the engine receives must be exactly those.
"""

from __future__ import annotations

import argparse

import jinja2
import pytest
import tiny
import torch
from fastapi.testclient import TestClient
from test_engine import make_adapter, make_tokenizer

from lorakit import LoraConfig, inject
from lorakit.commands import serve
from lorakit.files.peft_format import save_adapter
from lorakit.serve import AdapterRegistry, MultiLoraModel
from lorakit.serve.app import create_app
from lorakit.train.chat import DEFAULT_CHAT_TEMPLATE, TEMPLATE_FILE, encode_conversation, write_template

# Two templates over words the tiny tokenizer knows, so every rendered word is one known id.
TEMPLATES = {
    "x": "{% for m in messages %}the {{ m['content'] }} {% endfor %}movie",
    "y": "{% for m in messages %}good {{ m['content'] }} cat {% endfor %}{% if add_generation_prompt %}park{% endif %}",
}
MESSAGES = [{"role": "user", "content": "dog ran"}, {"role": "assistant", "content": "sea"}]


def record_prompts(engine) -> list[tuple[str | None, list[int]]]:
    """(adapter, prompt ids) of every request the engine prefills, in order."""
    seen: list[tuple[str | None, list[int]]] = []
    prefill = engine._prefill

    def spy(requests):
        seen.extend((r.adapter, list(r.prompt_ids)) for r in requests)
        return prefill(requests)

    engine._prefill = spy
    return seen


def expected_ids(tokenizer, template: str) -> list[int]:
    text = jinja2.Template(template).render(messages=MESSAGES, add_generation_prompt=True)
    return tokenizer(text)["input_ids"]


@pytest.fixture
def chat_server(tmp_path):
    tokenizer = make_tokenizer()
    multi = MultiLoraModel(tiny.gpt2(0), slots=4, max_rank=8)
    registry = AdapterRegistry(multi)
    for seed, name in enumerate(TEMPLATES, start=1):
        folder = make_adapter(tiny.gpt2, tmp_path / name, r=4, seed=seed)
        write_template(folder, TEMPLATES[name])
        registry.register(name, folder)
    registry.register("plain", make_adapter(tiny.gpt2, tmp_path / "plain", r=4, seed=3))  # no template
    app = create_app(multi, tokenizer, registry, base_name="tiny-gpt2")
    return app, tokenizer, registry, tmp_path


def chat(http, model: str) -> dict:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_adapter_renders_chat_with_its_own_template(chat_server):
    app, tokenizer, _, _ = chat_server
    with TestClient(app) as http:
        seen = record_prompts(app.state.engine)
        for model in ("x", "y", "plain", "tiny-gpt2"):
            chat(http, model)
    role_lines = tokenizer("user: dog ran\nassistant: sea\nassistant:")["input_ids"]  # no template: as before
    assert seen == [
        ("x", expected_ids(tokenizer, TEMPLATES["x"])),
        ("y", expected_ids(tokenizer, TEMPLATES["y"])),
        ("plain", role_lines),
        (None, role_lines),
    ]
    assert seen[0][1] != seen[1][1]


def test_a_re_registered_adapter_uses_the_new_versions_template(chat_server):
    app, tokenizer, registry, root = chat_server
    folder = make_adapter(tiny.gpt2, root / "x2", r=4, seed=5)
    write_template(folder, TEMPLATES["y"])
    with TestClient(app) as http:
        seen = record_prompts(app.state.engine)
        chat(http, "x")
        registry.register("x", folder)  # a new version of "x": its own template from now on
        chat(http, "x")
    assert [ids for _, ids in seen] == [expected_ids(tokenizer, t) for t in (TEMPLATES["x"], TEMPLATES["y"])]


def test_a_template_that_refuses_the_messages_is_the_requests_400(chat_server):
    app, _, registry, root = chat_server
    folder = make_adapter(tiny.gpt2, root / "strict", r=4, seed=6)
    (folder / TEMPLATE_FILE).write_text("{{ raise_exception('roles must alternate') }}", encoding="utf-8")
    registry.register("strict", folder)
    with TestClient(app) as http:
        body = {"model": "strict", "messages": MESSAGES, "max_tokens": 2}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_a_client_loaded_adapters_template_must_lie_under_the_root(tmp_path):
    outside = tmp_path / "outside.jinja"
    outside.write_text("secret", encoding="utf-8")
    root = tmp_path / "root"
    folder = make_adapter(tiny.gpt2, root / "linked", r=4, seed=1)
    (folder / TEMPLATE_FILE).symlink_to(outside)
    registry = AdapterRegistry(MultiLoraModel(tiny.gpt2(0), slots=2, max_rank=8), root=root)
    with pytest.raises(Exception, match="outside the adapter root") as err:
        registry.register("linked", "linked")
    assert "secret" not in str(err.value)


def test_serve_with_no_arguments_serves_the_shipped_chat_adapter_as_chat(tmp_path, monkeypatch):
    """The shipped folder as `lorakit serve` reads it, with a chat adapter saved the way
    `lorakit train` saves one (weights and the template it rendered the data with)."""
    from lorakit import defaults, hf

    gpt = defaults.default_causal_lm_path()
    tokenizer = hf.load_tokenizer(gpt)
    shipped = defaults.default_causal_lm_adapters()
    for name in ("positive", "negative"):
        (tmp_path / name).symlink_to(shipped[name], target_is_directory=True)
    assert serve.shipped_adapters(tmp_path) == {n: tmp_path / n for n in ("positive", "negative")}
    torch.manual_seed(0)
    lora = inject(hf.load_base(gpt, hf.CAUSAL_LM), LoraConfig(r=2, alpha=4, target_modules=["c_attn"]))
    write_template(save_adapter(lora, tmp_path / "chat"), DEFAULT_CHAT_TEMPLATE)
    assert list(serve.shipped_adapters(tmp_path)) == ["positive", "negative", "chat"]

    monkeypatch.setattr(serve, "shipped_adapter_folder", lambda: tmp_path)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    app, _, names = serve.build_app(parser.parse_args([]))
    assert names == ["chat", "negative", "positive"]
    with TestClient(app) as http:
        seen = record_prompts(app.state.engine)
        body = {"model": "chat", "messages": [{"role": "user", "content": "a fine film"}], "max_tokens": 3}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["model"] == "chat"
    # the template's text alone (no BOS the tokenizer would add), as training encodes it
    prompt = tokenizer("<|user|>\na fine film\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert seen == [("chat", prompt)]
    reply = [*body["messages"], {"role": "assistant", "content": "great"}]
    trained = encode_conversation(tokenizer, reply, DEFAULT_CHAT_TEMPLATE, max_length=64).input_ids
    assert trained[: len(prompt)] == prompt  # what the chat adapter saw in training before its answer


def test_a_templated_prompt_is_tokenized_as_training_tokenizes_it_without_a_second_bos(chat_server):
    """A tokenizer that adds a BOS by itself: the template's text is the whole prompt (the
    trainer's encode_conversation tokenizes it with add_special_tokens=False too)."""
    from tokenizers import processors

    app, tokenizer, _, _ = chat_server
    bos_first = processors.TemplateProcessing(single="[UNK] $A", special_tokens=[("[UNK]", 1)])
    tokenizer._tokenizer.post_processor = bos_first
    assert tokenizer("the")["input_ids"] == [1, tokenizer.convert_tokens_to_ids("the")]
    with TestClient(app) as http:
        seen = record_prompts(app.state.engine)
        chat(http, "x")
    text = jinja2.Template(TEMPLATES["x"]).render(messages=MESSAGES, add_generation_prompt=True)
    assert seen == [("x", tokenizer(text, add_special_tokens=False)["input_ids"])]
    assert seen[0][1][0] != 1
