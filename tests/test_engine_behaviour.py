"""Engine behaviour: seeded sampling, stop handling under speculation, KV block accounting, prefix caching."""

from __future__ import annotations

import pytest

from specserve import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Count: one two three four five six seven eight nine ten",
    "Write a short poem about the sea and the sea and the sea.",
    "List the planets of the solar system in order.",
]


@pytest.fixture(scope="module")
def smol(smollm2) -> LLM:
    return LLM(loaded_model=smollm2, device="cpu", dtype="float32", speculative_config=NGRAM)


def all_free(llm: LLM) -> bool:
    stats = llm.engine.stats()
    return stats.num_free_blocks == stats.num_total_blocks


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(smol):
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=40)
    alone = smol.generate([PROMPTS[0]], seeded)[0].outputs[0]
    busy_params = [SamplingParams(temperature=1.0, max_tokens=48)] * 5 + [seeded]
    busy = smol.generate([*PROMPTS, PROMPTS[2], PROMPTS[0]], busy_params)[-1]
    assert busy.outputs[0].token_ids == alone.token_ids
    assert busy.outputs[0].text == alone.text


def test_n_samples_with_a_seed_are_distinct_and_reproducible(smol):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=24)
    a = smol.generate([PROMPTS[3]], params)[0]
    b = smol.generate([PROMPTS[3]], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert [o.index for o in a.outputs] == [0, 1, 2]


def test_stop_string_cuts_speculated_tokens(smol):
    full = smol.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=40), spec_arm="none")[0]
    text = full.outputs[0].text
    assert len(text) > 10
    stop = text[5:8]
    out = smol.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    # the token that completed the stop string is the last one kept: nothing speculated after it survives
    assert stop not in smol.get_tokenizer().decode(out.token_ids[:-1])


def test_max_tokens_cuts_an_accepted_block(smol):
    # n-gram drafts on a repetitive prompt accept several tokens per step; max_tokens must still hold exactly
    for n in (1, 2, 3, 7):
        out = smol.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == n and out.outputs[0].finish_reason == "length"


def test_logprobs_one_entry_per_token(smol):
    out = smol.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in entry and len(entry) >= 3
        assert entry[tok].rank == 1  # greedy picks the top token
    total = sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    assert out.cumulative_logprob == pytest.approx(total)


def test_logit_bias_steers_greedy_and_speculated_tokens(smol):
    tok = smol.get_tokenizer().encode(" banana")[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={tok: 100.0})
    out = smol.generate([PROMPTS[0]], params)[0].outputs[0]
    assert out.token_ids == [tok] * 6
    with pytest.raises(ValueError, match="logit_bias"):
        smol.engine.add_request("bias", "hi", SamplingParams(logit_bias={10**7: 1.0}))


def test_prefix_cache_hit_gives_identical_output(smol):
    prompt = " ".join(["The history of computing is long and varied."] * 8)  # several full blocks
    params = SamplingParams(temperature=0.0, max_tokens=24)
    first = smol.generate([prompt], params)[0]
    hits_before = smol.engine.stats().prefix_cache_hits
    second = smol.generate([prompt], params)[0]
    assert smol.engine.stats().prefix_cache_hits > hits_before
    assert second.metrics.num_cached_tokens >= 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert all_free(smol)


def test_blocks_return_after_finish_abort_and_preemption(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=12, block_size=16,
              speculative_config=NGRAM)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"r{i}", "a b c a b c a b c " * (i + 1), params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == 3:
            engine.abort_request("r2")
            engine.abort_request("nonexistent")
    assert engine.scheduler.num_preemptions > 0
    assert all_free(llm)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "x", params)
        engine.add_request("dup", "x", params)
    engine.abort_request("dup")
    assert all_free(llm)


def test_bad_requests_raise_clear_errors(smol):
    engine = smol.engine
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("long", [1] * 10, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("oov", [10**9], SamplingParams())
    with pytest.raises(ValueError, match="unknown speculative arm"):
        engine.add_request("arm", "hi", SamplingParams(), spec_arm="eagle:9")
    assert not engine.has_unfinished_requests() and all_free(smol)


def test_max_model_len_is_what_the_kv_cache_holds(tiny_model_dir):
    common = dict(model=tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=4, block_size=16)
    assert LLM(**common).engine.max_model_len == 64  # the model allows 256: a longer request could never run
    with pytest.raises(ValueError, match="more than the KV cache holds"):
        LLM(max_model_len=128, **common)


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -5), ("min_p", 2.0), ("presence_penalty", 3.0),
     ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("max_tokens", 0), ("n", 0), ("logprobs", 21),
     ("stop", [""]), ("stop_token_ids", [-1]), ("min_tokens", -1), ("logit_bias", {3: 101.0})],
)
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
