"""The adapter registry (lorakit.serve.AdapterRegistry) over a MultiLoraModel of a tiny GPT-2.

Outputs are compared with the same adapter loaded by lorakit.load_adapter and merged, run alone.
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
import tiny
import torch
import torch.nn as nn

import lorakit
from lorakit.files.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from lorakit.serve import AdapterRegistry, MultiLoraModel, NoFreeSlotError, UnknownAdapterError

TOL = 1e-5
IDS = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))


def make_adapter(base: nn.Module, folder, seed: int, r: int = 4) -> str:
    """A random non-zero adapter of rank r on every linear layer of a copy of `base`, saved to `folder`."""
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=generator) * 0.3)
    return str(lorakit.save_adapter(model, folder))


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny.gpt2(0).eval()


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(base, root / name, seed, r=4 + 2 * seed) for seed, name in enumerate("abcd")}


@pytest.fixture(scope="module")
def expected(base, folders) -> dict[str | None, torch.Tensor]:
    out = {None: base(IDS).logits.detach()}
    for name, folder in folders.items():
        model = lorakit.merge_and_unload(lorakit.load_adapter(copy.deepcopy(base), folder))
        out[name] = model(IDS).logits.detach()
    return out


def run(multi: MultiLoraModel, name: str | None) -> torch.Tensor:
    with torch.no_grad(), multi.use([name]):
        return multi.model(IDS).logits


def test_lru_eviction_and_reload_on_demand(base, folders, expected):
    multi = MultiLoraModel(copy.deepcopy(base), slots=4, max_rank=16)
    registry = AdapterRegistry(multi, max_resident=2)
    for name in "abc":
        registry.register(name, folders[name], load_now=False)
    assert registry.known() == ["a", "b", "c"] and registry.resident() == []
    for name in "ab":
        registry.pin(name)
        assert (run(multi, name) - expected[name]).abs().max() <= TOL
        registry.unpin(name)
    registry.pin("a")  # a is now the most recently used: c's load evicts b
    registry.unpin("a")
    registry.pin("c")
    assert registry.resident() == ["a", "c"] and multi.names() == ["a", "c"]
    registry.unpin("c")
    registry.pin("b")  # reloaded on demand, evicting a
    assert registry.resident() == ["c", "b"]
    assert (run(multi, "b") - expected["b"]).abs().max() <= TOL
    registry.unpin("b")
    with pytest.raises(UnknownAdapterError, match="not registered"):
        registry.pin("zzz")
    with pytest.raises(AdapterError, match="not pinned"):
        registry.unpin("b")
    registry.pin(None)  # the base needs no slot
    registry.unpin(None)


def test_pinned_adapters_are_never_evicted(base, folders, expected):
    multi = MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=16)
    registry = AdapterRegistry(multi)
    for name in "abc":
        registry.register(name, folders[name], load_now=False)
    registry.pin("a")
    registry.pin("b")
    with pytest.raises(NoFreeSlotError, match="pinned"):
        registry.pin("c")
    assert registry.resident() == ["a", "b"] and registry.pinned() == {"a": 1, "b": 1}
    for name in "ab":
        assert (run(multi, name) - expected[name]).abs().max() <= TOL
    registry.unpin("b")
    registry.pin("c")  # b was the only unpinned one
    assert registry.resident() == ["a", "c"]
    with pytest.raises(AdapterError, match="max_resident"):
        AdapterRegistry(multi, max_resident=3)


def test_same_name_twice_and_replacement(base, folders, expected):
    multi = MultiLoraModel(copy.deepcopy(base), slots=3, max_rank=16)
    registry = AdapterRegistry(multi)
    registry.register("x", folders["a"])
    registry.register("x", folders["a"])  # same path: nothing happens
    assert multi.free_slots() == 2 and registry.resident() == ["x"]
    registry.register("x", folders["b"])  # new path: validated, then replaces a
    assert registry.resident() == ["x"] and multi.free_slots() == 2
    assert (run(multi, "x") - expected["b"]).abs().max() <= TOL
    registry.pin("x")
    registry.remove("x")  # pinned: forgotten now, unloaded at the last unpin
    assert registry.known() == [] and multi.names() == ["x"]
    with pytest.raises(UnknownAdapterError):
        registry.pin("x")
    registry.unpin("x")
    assert multi.names() == [] and registry.resident() == []
    with pytest.raises(UnknownAdapterError):
        registry.remove("x")


def test_paths_outside_the_root_are_refused(base, folders, tmp_path):
    root = tmp_path / "root"
    inside = make_adapter(base, root / "in", 7)
    registry = AdapterRegistry(MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=16), root=root)
    for bad in (folders["a"], root / ".." / "elsewhere", "../x"):
        with pytest.raises(AdapterError, match="outside the adapter root"):
            registry.register("bad", bad)
    (root / "link").symlink_to(folders["a"], target_is_directory=True)  # a link out of the root
    with pytest.raises(AdapterError, match="outside the adapter root"):
        registry.register("bad", root / "link")
    registry.register("ok", inside)
    registry.register("rel", "in")  # relative paths are read under the root
    assert registry.known() == ["ok", "rel"] and registry.path_of("rel") == (root / "in").resolve()


def test_bad_folders_are_refused_with_the_model_untouched(base, folders, expected, tmp_path):
    multi = MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=16)
    registry = AdapterRegistry(multi)
    registry.register("a", folders["a"])
    broken_json = tmp_path / "json"
    broken_json.mkdir()
    (broken_json / CONFIG_NAME).write_text("{not json")
    (broken_json / WEIGHTS_NAME).write_bytes(b"")
    truncated = tmp_path / "trunc"
    make_adapter(base, truncated, 8)
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    llama = make_adapter(tiny.llama(0), tmp_path / "llama", 9)  # another architecture
    nan = tmp_path / "nan"
    make_adapter(base, nan, 10)
    config = json.loads((nan / CONFIG_NAME).read_text())
    (nan / CONFIG_NAME).write_text(json.dumps({**config, "r": 5}))  # config disagrees with the tensors
    buffers = {n: b.clone() for n, b in multi.model.named_buffers()}
    for name, folder, message in [
        ("j", broken_json, "not valid JSON"),
        ("t", truncated, "truncated or corrupt"),
        ("l", llama, "cannot be served here"),
        ("n", nan, "disagrees with the config"),
        ("a", tmp_path / "missing", "no such adapter folder"),  # a bad new path keeps the old adapter
    ]:
        with pytest.raises(AdapterError, match=message):
            registry.register(name, folder)
    assert registry.known() == ["a"] and multi.names() == ["a"] and multi.free_slots() == 1
    assert all(torch.equal(b, buffers[n]) for n, b in multi.model.named_buffers())
    assert (run(multi, "a") - expected["a"]).abs().max() <= TOL


def test_concurrent_loads_never_show_a_half_loaded_adapter(base, folders, expected):
    """One thread keeps replacing and evicting adapters; another runs forwards all the while.
    Every forward must give exactly one adapter's output (never a mix of two, or of zeros)."""
    multi = MultiLoraModel(copy.deepcopy(base), slots=3, max_rank=16)
    registry = AdapterRegistry(multi, max_resident=2)
    registry.register("x", folders["a"])
    for name in "bcd":
        registry.register(name, folders[name], load_now=False)
    stop, errors, seen = threading.Event(), [], set()

    def loader() -> None:
        try:
            for i in range(12):
                registry.register("x", folders["ab"[i % 2]])  # replace x while forwards read it
                registry.pin("cd"[i % 2])  # load on demand, evicting the other one
                registry.unpin("cd"[i % 2])
        except Exception as err:  # surfaced by the main thread
            errors.append(err)
        finally:
            stop.set()

    thread = threading.Thread(target=loader)
    thread.start()
    while not stop.is_set() or not seen:
        registry.pin("x")  # as a request does: x stays resident while it runs
        out = run(multi, "x")
        registry.unpin("x")
        match = [n for n in "ab" if (out - expected[n]).abs().max() <= TOL]
        assert match, "a forward saw a half-written adapter"
        seen.add(match[0])
    thread.join()
    assert not errors, errors
    assert multi.free_slots() >= 1


def test_re_registering_a_name_mid_stream_keeps_the_running_request_on_its_version(base, folders):
    """A greedy stream on "positive" with "positive" re-registered from another folder halfway
    equals positive's own reference token for token; a request after it gets the new adapter."""
    import time

    from test_engine import make_tokenizer

    from lorakit.serve.engine import Engine, SamplingParams

    multi = MultiLoraModel(copy.deepcopy(base), slots=4, max_rank=16)
    registry = AdapterRegistry(multi)
    registry.register("positive", folders["a"])
    registry.register("negative", folders["b"])
    multi.model.register_forward_pre_hook(lambda *_: time.sleep(0.005))  # a step long enough to land mid-stream
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = [5, 17, 42]
    with Engine(multi, make_tokenizer(), registry=registry) as engine:
        want = {n: engine.generate(prompt, n, params).token_ids for n in ("positive", "negative")}
        assert want["positive"] != want["negative"]
        running = engine.submit(prompt, "positive", params)
        while len(running.output_ids) < 5:
            time.sleep(0.001)
        registry.register("positive", folders["b"])  # what POST /v1/adapters {"name": "positive", ...} does
        assert running.completion is None, "the stream ended before the re-registration: the test proves nothing"
        later = engine.generate(prompt, "positive", params)
        assert running.result().token_ids == want["positive"]
        assert later.token_ids == want["negative"]
    assert registry.pinned() == {} and multi.free_slots() == 2  # the old version's slot was freed at its end


def test_root_checks_every_loader_file_on_every_load_and_never_quotes_files(base, folders, tmp_path):
    root = tmp_path / "root"
    make_adapter(base, root / "ok", 3)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"r": "SECRET-TOKEN"}))
    weights_out = root / "weights_out"
    weights_out.mkdir()
    (weights_out / CONFIG_NAME).write_bytes((root / "ok" / CONFIG_NAME).read_bytes())
    (weights_out / WEIGHTS_NAME).symlink_to(f"{folders['a']}/{WEIGHTS_NAME}")  # a file link out of the root
    config_out = root / "config_out"
    config_out.mkdir()
    (config_out / CONFIG_NAME).symlink_to(secret)
    (config_out / WEIGHTS_NAME).write_bytes((root / "ok" / WEIGHTS_NAME).read_bytes())
    inside = root / "inside_link"  # a link that stays in the root still reaches the loader's checks
    inside.mkdir()
    (inside / CONFIG_NAME).symlink_to(root / "secret.json")
    (root / "secret.json").write_text(json.dumps({"r": "SECRET-TOKEN"}))
    (inside / WEIGHTS_NAME).write_bytes((root / "ok" / WEIGHTS_NAME).read_bytes())
    registry = AdapterRegistry(MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=16), max_resident=1, root=root)
    for folder in (weights_out, config_out):
        with pytest.raises(AdapterError, match="outside the adapter root") as info:
            registry.register("bad", folder)
        assert "SECRET" not in str(info.value)
    with pytest.raises(AdapterError, match="not a valid LoRA adapter config") as info:
        registry.register("bad", inside)
    assert "SECRET" not in str(info.value)
    registry.register("ok", "ok")
    registry.register("other", folders["a"], trusted=True)  # the operator's own: outside the root is fine
    assert registry.resident() == ["other"]  # "ok" was evicted
    (root / "ok" / WEIGHTS_NAME).unlink()
    (root / "ok" / WEIGHTS_NAME).symlink_to(f"{folders['a']}/{WEIGHTS_NAME}")  # swapped while evicted
    with pytest.raises(AdapterError, match="outside the adapter root"):
        registry.pin("ok")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\x00b", "x" * 129, 3])
def test_bad_adapter_names_are_refused(base, folders, name):
    registry = AdapterRegistry(MultiLoraModel(copy.deepcopy(base), slots=1, max_rank=16))
    with pytest.raises(AdapterError, match="adapter name"):
        registry.register(name, folders["a"])
    assert registry.known() == []
