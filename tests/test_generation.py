"""Generation: the KV cache against full forward passes, left padding, the batched sampling
API (per-row params, seeds, stops, streaming) and cached == uncached tokens, for both presets
(learned positions and RoPE) and with grouped-query attention."""
from __future__ import annotations

from typing import List

import pytest
import torch

from dist_llm.config.schema import ModelConfig
from dist_llm.models import GPT, KVCache, SamplingParams, generate, generate_batch
from dist_llm.models.sampling import filter_logits

PRESETS = ["gpt2", "llama"]
PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 300, 12, 9, 81]]


def make(preset: str, n_kv_heads=None, **kw) -> GPT:
    # init_std 0.3: a random model whose greedy continuations vary (0.02 repeats one token).
    base = dict(preset=preset, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_model=64, max_seq_len=64,
                vocab_size=320, init_std=0.3)
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference relative to the largest logit."""
    return ((got - want).abs().max() / want.abs().max()).item()


def letters(ids: List[int]) -> str:
    """A toy detokenizer: every token is two characters."""
    return "".join("ab"[t % 2] + "xyz"[t % 3] for t in ids)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n_kv", [None, 2])
def test_cache_logits_equal_full_forward(preset, n_kv):
    model = make(preset, n_kv)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 20)
        parts = [model(ids[:, :7], kv_cache=cache)]  # prefill, then one token at a time
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    assert cache.length == 20
    # Same math on different shapes (SDPA over the cache vs causal SDPA): fp32 round-off only,
    # which grows with the logits' scale (about 10 with init_std 0.3).
    assert rel_diff(torch.cat(parts, dim=1), full) < 1e-5
    assert cache.keys.shape[2] == (n_kv or 4)  # the cache holds the key/value heads only


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padding_with_positions_equals_unpadded(preset):
    model = make(preset, 2)
    short = torch.tensor([[9, 8, 7, 6]])
    padded = torch.tensor([[0, 0, 0, 9, 8, 7, 6]])
    mask = torch.tensor([[False] * 3 + [True] * 4])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3]])
    with torch.no_grad():
        want = model(short)
        got = model(padded, positions=positions, attn_mask=mask)[:, 3:]
        # The hooks with no padding are the training path.
        plain = model(padded)
        hooked = model(padded, positions=torch.arange(7)[None], attn_mask=torch.ones(1, 7, dtype=torch.bool))
    assert rel_diff(got, want) < 1e-5
    assert rel_diff(hooked, plain) < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.9, top_k=40, top_p=0.95, seed=11),
])
def test_cached_equals_uncached_and_padded_rows_equal_alone(preset, sampling):
    model = make(preset, 2)
    params = SamplingParams(max_new_tokens=24, **sampling)
    cached = generate_batch(model, PROMPTS, params)
    uncached = generate_batch(model, PROMPTS, params, use_cache=False)
    for i, prompt in enumerate(PROMPTS):
        assert cached[i].token_ids == uncached[i].token_ids, i
        assert len(cached[i].token_ids) == 24 and cached[i].finish_reason == "length"
        assert cached[i].prompt_tokens == len(prompt)
        alone = generate_batch(model, [prompt], params)[0]
        assert alone.token_ids == cached[i].token_ids, i
    assert len({t for r in cached for t in r.token_ids}) > 10  # not a degenerate repeat


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_is_argmax_of_full_forward(preset):
    model = make(preset)
    out = generate_batch(model, PROMPTS[:2], SamplingParams(max_new_tokens=10, temperature=0))
    for prompt, res in zip(PROMPTS, out):
        seq = torch.tensor([prompt + res.token_ids])
        with torch.no_grad():
            argmax = model(seq[:, :-1]).argmax(-1)[0, len(prompt) - 1:]
        assert argmax.tolist() == res.token_ids


def test_per_row_params_and_seeds():
    model = make("llama", 2)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    mixed = generate_batch(model, PROMPTS[:3], [greedy, seeded, SamplingParams(max_new_tokens=3, seed=9)])
    assert mixed[0].token_ids == generate_batch(model, [PROMPTS[0]], greedy)[0].token_ids
    assert mixed[1].token_ids == generate_batch(model, [PROMPTS[1]], seeded)[0].token_ids
    assert len(mixed[2].token_ids) == 3 and len(mixed[1].token_ids) == 12  # rows finish on their own
    other_seed = generate_batch(model, [PROMPTS[1]], SamplingParams(max_new_tokens=12, seed=6))[0]
    assert other_seed.token_ids != mixed[1].token_ids
    # top_k=1 and a tiny top_p are greedy at any temperature.
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):
        res = generate_batch(model, PROMPTS[:2], SamplingParams(max_new_tokens=12, temperature=3.0, seed=1, **narrow))
        assert [r.token_ids for r in res] == [r.token_ids for r in generate_batch(model, PROMPTS[:2], greedy)]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = filter_logits(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 0.85]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top-2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.5+0.3
    assert kept[2].tolist() == [True, True, True, False]  # 0.8 < 0.85
    assert torch.equal(out[kept], logits[kept])


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_tokens_and_streaming(use_cache):
    model = make("gpt2")
    free = generate_batch(model, PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=0))
    stop = free[0].token_ids[3]
    assert stop not in free[0].token_ids[:3]
    streamed = {0: [], 1: []}
    res = generate_batch(model, PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(stop,)),
                         use_cache=use_cache, on_token=lambda row, tok: streamed[row].append(tok))
    assert res[0].token_ids == free[0].token_ids[:3] and res[0].finish_reason == "stop"
    cut = free[1].token_ids.index(stop) if stop in free[1].token_ids else 16
    assert res[1].token_ids == free[1].token_ids[:cut]
    assert streamed == {0: res[0].token_ids, 1: res[1].token_ids}


def test_stop_strings_cut_text_and_tokens():
    model = make("llama")
    free = generate_batch(model, [PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=0), decode=letters)[0]
    assert free.text == letters(free.token_ids)
    # A stop string spanning tokens 4 and 5 (second character of one, first of the next).
    text = free.text
    stop_str = text[9:11]
    first = text.find(stop_str)
    streamed: List[int] = []
    res = generate_batch(model, [PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=0,
                                                             stop_strings=(stop_str, "never")),
                         decode=letters, on_token=lambda row, tok: streamed.append(tok))[0]
    assert res.finish_reason == "stop"
    assert res.text == text[:first]
    assert res.token_ids == free.token_ids[: first // 2]  # whole tokens before the stop string
    assert streamed == res.token_ids


def test_finished_rows_keep_position_within_window():
    model = make("gpt2")  # learned positions: an index past max_seq_len would fail
    long, short = list(range(1, 61)), [3, 4]
    params = [SamplingParams(max_new_tokens=4, temperature=0), SamplingParams(max_new_tokens=40, temperature=0)]
    for use_cache in (True, False):
        res = generate_batch(model, [long, short], params, use_cache=use_cache)
        assert [len(r.token_ids) for r in res] == [4, 40]
        assert res[1].token_ids == generate_batch(model, [short], params[1])[0].token_ids


def test_bad_requests_are_clear_errors():
    model = make("llama")
    with pytest.raises(ValueError, match=r"prompt length 60 \+ max_new_tokens 10 = 70 exceeds model.max_seq_len=64"):
        generate_batch(model, [[1] * 60], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="stop_strings need a `decode`"):
        generate_batch(model, [[1]], SamplingParams(stop_strings=("x",)))
    with pytest.raises(ValueError, match=r"params\[1\]: top_p=0.0 must be in \(0, 1\]"):
        generate_batch(model, [[1], [2]], [SamplingParams(), SamplingParams(top_p=0.0)])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate_batch(model, [[1], []], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_batch(model, [[320]], SamplingParams())
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        generate_batch(model, [[1], [2]], [SamplingParams()])
    res = generate_batch(model, [[1, 2]], SamplingParams(max_new_tokens=0))[0]
    assert res.token_ids == [] and res.finish_reason == "length" and res.prompt_tokens == 2


@pytest.mark.parametrize("preset", PRESETS)
def test_old_generate_uses_cache_and_matches_batch_api(preset):
    model = make(preset).train()
    prompt = torch.tensor([PROMPTS[3], PROMPTS[1][:5]])
    out = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert model.training  # mode restored
    batch = generate_batch(model, prompt.tolist(), SamplingParams(max_new_tokens=12, temperature=0))
    assert out[:, 5:].tolist() == [r.token_ids for r in batch]
