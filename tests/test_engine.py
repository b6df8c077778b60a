"""The generation engine: continuous batching with one adapter per row, against independent references.

The reference for a row is the same prompt run alone, with its adapter merged into a fresh copy
of the base (lorakit load_adapter + merge_and_unload) and greedy decoding by full recomputation
(no KV cache, no padding, no batch).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import tiny
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorakit import LoraConfig, inject
from lorakit.core.adapters import merge_and_unload
from lorakit.files.peft_format import load_adapter, save_adapter
from lorakit.serve import AdapterRegistry, MultiLoraModel
from lorakit.serve.engine import Engine, RequestError, SamplingParams

SENTENCES = [
    "the cat sat on the mat and the dog ran in the park",
    "a good movie with a fine story and great actors",
    "a bad film with a slow plot and poor acting",
    "we went to the sea and saw the boats and birds",
]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
BUILDERS = {"gpt2": tiny.gpt2, "llama": tiny.llama}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 100 ids: [EOS] (0, their eos), [UNK], the words of a
    few sentences, then filler words w<i>, so that every id the model can emit decodes to text."""
    words = ["[EOS]", "[UNK]", *dict.fromkeys(" ".join(SENTENCES).split())]
    words += [f"w{i}" for i in range(100 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", unk_token="[UNK]", pad_token="[EOS]")


def make_adapter(build, folder: Path, *, r: int, seed: int, rslora: bool = False) -> Path:
    """A random adapter (B not zero, so it changes the outputs) on all linear layers, saved in PEFT format."""
    model = inject(build(0), LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", use_rslora=rslora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_adapter(model, folder)


@functools.cache
def setup(arch: str, root: str) -> dict:
    """Tokenizer and two adapters (r=4, and r=8 with rsLoRA) for one architecture, made once."""
    build = BUILDERS[arch]
    folder = Path(root) / arch
    adapters = {
        "a": make_adapter(build, folder / "a", r=4, seed=1),
        "b": make_adapter(build, folder / "b", r=8, seed=2, rslora=True),
    }
    return {"build": build, "tokenizer": make_tokenizer(), "adapters": adapters}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("engine"))


def start_engine(arch: str, root: str, **kwargs) -> Engine:
    s = setup(arch, root)
    multi = MultiLoraModel(s["build"](0), slots=4, max_rank=8)
    registry = AdapterRegistry(multi)
    for name, path in s["adapters"].items():
        registry.register(name, path)
    return Engine(multi, s["tokenizer"], registry=registry, **kwargs).start()


@functools.cache
def merged(arch: str, root: str, adapter: str | None) -> torch.nn.Module:
    s = setup(arch, root)
    model = s["build"](0)
    if adapter is not None:
        model = merge_and_unload(load_adapter(model, s["adapters"][adapter]))
    return model.eval()


def reference(arch: str, root: str, adapter: str | None, prompt: str, n: int) -> list[int]:
    """Greedy tokens by full recomputation on the merged model: no cache, no padding, no batch."""
    model = merged(arch, root, adapter)
    ids = setup(arch, root)["tokenizer"](prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
    return out


PROMPTS = [
    ("a", "the cat sat on the mat"),
    ("b", "a good movie"),
    (None, "we went to the sea and saw the boats"),
    ("a", "bad"),
    ("b", "the dog ran in the park and the cat"),
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mixed_batch_equals_each_alone_merged(arch, root):
    with start_engine(arch, root) as engine:
        jobs = [engine.submit(prompt, adapter, GREEDY) for adapter, prompt in PROMPTS]
        results = [job.result(timeout=60) for job in jobs]
        assert engine.max_rows_seen >= 2  # they really shared batches
    for (adapter, prompt), result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference(arch, root, adapter, prompt, GREEDY.max_tokens), (adapter, prompt)
        assert result.finish_reason == "length"
    # the adapters matter: the same prompt differs across adapters
    outs = {a: reference(arch, root, a, "a good movie", 10) for a in ("a", "b", None)}
    assert len({tuple(v) for v in outs.values()}) == 3


def test_request_joining_midway_gets_the_same_tokens(root):
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    with start_engine("gpt2", root) as engine:
        first = engine.submit("the cat sat on the mat", "a", long)
        stream = first.stream()
        for _ in range(5):  # the first request is decoding now
            next(stream)
        assert first.completion is None
        second = engine.submit("a good movie with", "b", GREEDY)
        third = engine.submit("we went", None, GREEDY)
        rest = "".join(stream)
        results = [first.completion, second.result(timeout=60), third.result(timeout=60)]
        assert engine.max_rows_seen == 3
    assert results[0].token_ids == reference("gpt2", root, "a", "the cat sat on the mat", 30)
    assert results[1].token_ids == reference("gpt2", root, "b", "a good movie with", 10)
    assert results[2].token_ids == reference("gpt2", root, None, "we went", 10)
    assert rest  # streaming went on after the others joined


def test_sampling_with_a_seed_is_reproducible_alone_and_in_a_batch(root):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    with start_engine("llama", root) as engine:
        alone = engine.generate("the cat", "a", params).token_ids
        again = engine.generate("the cat", "a", params).token_ids
        crowd = [engine.submit(p, a, GREEDY) for a, p in PROMPTS]
        batched = engine.submit("the cat", "a", params)
        assert batched.result(timeout=60).token_ids == alone
        [job.result(timeout=60) for job in crowd]
        other = engine.generate("the cat", "a", SamplingParams(**{**params.__dict__, "seed": 8})).token_ids
        # a nucleus so small it holds one token is greedy decoding
        tiny_p = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-9, seed=3, ignore_eos=True)
        nucleus = engine.generate("the cat", "a", tiny_p).token_ids
    assert alone == again
    assert other != alone
    assert nucleus == reference("llama", root, "a", "the cat", 10)


def test_stop_sequences_cut_the_text_and_streaming_matches(root):
    with start_engine("gpt2", root) as engine:
        full = engine.generate("a good movie", "b", GREEDY)
        words = full.text.split()
        stop = words[3]  # a word that first appears at position 3 or earlier
        cut = full.text[: full.text.find(stop)]
        job = engine.submit("a good movie", "b", SamplingParams(**{**GREEDY.__dict__, "stop": ["zzz", stop]}))
        streamed = "".join(job.stream())
        stopped = job.completion
    assert stopped.finish_reason == "stop"
    assert stopped.text == cut and streamed == cut
    assert stop not in stopped.text
    assert len(stopped.token_ids) < GREEDY.max_tokens


def test_streaming_deltas_join_to_the_text_and_eos_stops(root):
    s = setup("llama", root)
    with start_engine("llama", root) as engine:
        job = engine.submit("the cat", None, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        deltas = list(job.stream())
        assert "".join(deltas) == job.completion.text == s["tokenizer"].decode(job.completion.token_ids)
        assert len(deltas) > 1
        # make a token the greedy path meets the end-of-sequence token: decoding stops just before it
        full = job.completion.token_ids
        eos = next(t for t in full if t != full[0])
        engine.eos_ids = {eos}
        ends = engine.generate("the cat", None, SamplingParams(max_tokens=20, temperature=0))
    assert ends.finish_reason == "stop"
    assert ends.token_ids == full[: full.index(eos)]


def test_bad_requests_are_refused_before_they_run(root):
    with start_engine("gpt2", root) as engine:
        long_prompt = " ".join(["the"] * 64)  # the tiny GPT-2 has 64 positions
        with pytest.raises(RequestError, match="context"):
            engine.submit(long_prompt, None, GREEDY)
        with pytest.raises(RequestError, match="max_tokens") as err:
            engine.submit("the cat", None, SamplingParams(max_tokens=63, temperature=0))
        assert err.value.param == "max_tokens"
        with pytest.raises(RequestError, match="temperature"):
            engine.submit("the cat", None, SamplingParams(temperature=3.0))
        with pytest.raises(ValueError, match="not registered"):
            engine.submit("the cat", "nope", GREEDY)
        # the engine still serves, and no pin leaked from the refused requests
        assert engine.generate("the cat", "a", GREEDY).token_ids == reference("gpt2", root, "a", "the cat", 10)
        assert engine.registry.pinned() == {}


def test_cancelled_request_leaves_the_batch(root):
    with start_engine("gpt2", root, max_batch=2) as engine:
        long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        job = engine.submit("the", "a", long)
        next(job.stream())
        job.cancel()
        assert job.result(timeout=30).finish_reason == "cancelled"
        assert len(job.completion.token_ids) < 50
        other = engine.submit("the cat", "b", GREEDY)
        assert other.result(timeout=30).token_ids == reference("gpt2", root, "b", "the cat", 10)
        assert engine.registry.pinned() == {}


def record_forwards(engine: Engine) -> list[list[str | None]]:
    """The adapters of every forward the engine runs from now on (one entry per row)."""
    seen, use = [], engine.multi.use

    def recording_use(adapters):
        seen.append(list(adapters))
        return use(adapters)

    engine.multi.use = recording_use
    return seen


def test_swap_mode_serves_one_adapter_per_batch(root):
    with start_engine("gpt2", root, mode="swap") as engine:
        seen = record_forwards(engine)
        jobs = [engine.submit(prompt, adapter, GREEDY) for adapter, prompt in PROMPTS]
        results = [job.result(timeout=60) for job in jobs]
    for (adapter, prompt), result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference("gpt2", root, adapter, prompt, GREEDY.max_tokens)
    # continuous batching would mix adapters in one forward as soon as a request joins a running batch
    assert [a for a in seen if len(set(a)) > 1] == []
    assert len(seen) >= GREEDY.max_tokens  # the recording saw the decoding


def test_out_of_vocabulary_ids_and_unusable_seeds_are_refused_before_they_run(root):
    with start_engine("gpt2", root) as engine:
        for ids in ([99999], [-1], [2**40], [5, 100]):  # the tiny GPT-2 embeds ids 0..99
            with pytest.raises(RequestError, match="vocabulary") as err:
                engine.submit(ids, "a", GREEDY)
            assert (err.value.param, err.value.status) == ("prompt", 400)
        with pytest.raises(RequestError, match="tokenized"):
            engine.submit([1.5], "a", GREEDY)
        for seed in (2**70, 2**64, -(2**63) - 1):
            with pytest.raises(RequestError, match="seed") as err:
                engine.submit("the cat", "a", SamplingParams(temperature=1.0, seed=seed))
            assert err.value.param == "seed"
        assert engine.registry.pinned() == {}
        # the largest seed torch takes still samples
        assert engine.generate("the", "a", SamplingParams(max_tokens=3, seed=2**64 - 1)).finish_reason != "error"
        assert engine.generate([99], "a", GREEDY).token_ids == reference_ids("gpt2", root, "a", [99], 10)


def reference_ids(arch: str, root: str, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """reference() for a prompt given as ids."""
    model, out = merged(arch, root, adapter), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_a_row_failing_in_sampling_ends_only_that_row(root, monkeypatch):
    import lorakit.serve.engine as engine_module

    real = engine_module.pick_token

    def faulty(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("sampling broke for this row")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "pick_token", faulty)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    with start_engine("gpt2", root) as engine:
        alone = engine.generate("the cat", "b", sampled).token_ids
        long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        running = engine.submit("the cat sat on the mat", "a", long)
        stream = running.stream()
        next(stream)  # it is decoding when the others arrive
        jobs = [engine.submit(p, a, GREEDY) for a, p in PROMPTS]
        other = engine.submit("the cat", "b", sampled)
        bad = engine.submit("the cat", "b", SamplingParams(max_tokens=10, temperature=1.0, seed=666))
        assert bad.result(timeout=60).finish_reason == "error" and "sampling broke" in bad.completion.error
        running.result(timeout=60)
        assert engine.max_rows_seen >= 3  # the bad row shared its batch
        assert running.completion.token_ids == reference("gpt2", root, "a", "the cat sat on the mat", 30)
        for (adapter, prompt), job in zip(PROMPTS, jobs, strict=True):
            assert job.result(timeout=60).token_ids == reference("gpt2", root, adapter, prompt, 10)
        assert other.result(timeout=60).token_ids == alone
        assert engine.registry.pinned() == {}


def test_a_failing_step_fails_only_its_requests_and_the_engine_goes_on(root):
    s = setup("gpt2", root)
    multi = MultiLoraModel(s["build"](0), slots=2, max_rank=8)
    multi.load("a", s["adapters"]["a"])
    with Engine(multi, s["tokenizer"]) as engine:  # no registry: nothing checks names before the forward
        broken = engine.generate("the cat", "missing", GREEDY)
        assert broken.finish_reason == "error" and "missing" in broken.error
        assert engine.alive
        assert engine.generate("the cat", "a", GREEDY).token_ids == reference("gpt2", root, "a", "the cat", 10)


def test_a_failing_prefill_does_not_end_the_rows_already_decoding(root):
    s = setup("gpt2", root)
    multi = MultiLoraModel(s["build"](0), slots=2, max_rank=8)
    multi.load("a", s["adapters"]["a"])
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    with Engine(multi, s["tokenizer"]) as engine:  # no registry: "missing" fails in the forward
        running = engine.submit("the cat sat on the mat", "a", long)
        stream = running.stream()
        next(stream)
        broken = engine.submit("the cat", "missing", GREEDY)
        healthy = engine.submit("we went", None, GREEDY)  # may be admitted together with the broken one
        assert broken.result(timeout=60).finish_reason == "error"
        running.result(timeout=60)
    assert running.completion.finish_reason == "length"
    assert running.completion.token_ids == reference("gpt2", root, "a", "the cat sat on the mat", 30)
    assert healthy.result(timeout=60).token_ids == reference("gpt2", root, None, "we went", 10)
