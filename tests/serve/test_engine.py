"""Engine: batched continuous decoding == one-at-a-time generation; blocks, queueing, stops, seeds, stats."""

import pytest
import torch

from catkit.models import CatModel, ModelConfig
from catkit.serve import Engine, SamplingParams


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    # a large init_std keeps a random model's greedy output varied (not one repeated token)
    cfg = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, pattern="AA", max_seq_len=96, init_std=0.5)
    cfg.update(kw)
    return CatModel(ModelConfig(**cfg)).eval()


def reference(model, prompt, n, **kw):
    return model.generate(torch.tensor([prompt]), n, **kw)[0, len(prompt):].tolist()


def test_batched_greedy_equals_one_at_a_time(seed):
    model = tiny_model(seed % 1000)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 7, 3, 16, 5, 11)]
    max_tokens = [9, 4, 12, 6, 10, 3]
    engine = Engine(model, max_batch_size=3, num_blocks=40, block_size=4)
    # requests join at different steps: two now, the rest while others are decoding
    rids = [engine.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i])) for i in range(2)]
    for i in range(2, 6):
        engine.step()
        engine.step()
        rids.append(engine.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i])))
    max_batch_seen = 0
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
        max_batch_seen = max(max_batch_seen, len(engine.running))
        assert len(engine.running) <= 3
    assert not engine.has_work()
    for rid, p, n in zip(rids, prompts, max_tokens):
        req = engine.requests[rid]
        assert req.output == reference(model, p, n), f"request {rid}"
        assert req.finish_reason == "length"
        assert req.stats.prompt_tokens == len(p) and req.stats.generated_tokens == n
        assert req.stats.time_to_first_token is not None and req.stats.time_to_first_token >= 0
        assert n == 1 or req.stats.tokens_per_s > 0
    assert engine.cache.num_free == 40 and not engine.cache.tables  # every block back


def test_generate_and_gqa_mha():
    model = tiny_model(3, n_kv_heads=None, pattern="AAA")
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    outs = Engine(model, max_batch_size=8, num_blocks=32, block_size=16).generate(prompts, SamplingParams(max_tokens=8))
    assert outs == [reference(model, p, 8) for p in prompts]


def test_out_of_blocks_queues_instead_of_crashing():
    model = tiny_model(1)
    # each request needs ceil((4 + 12) / 4) = 4 blocks; 9 blocks admit two at a time
    engine = Engine(model, max_batch_size=8, num_blocks=9, block_size=4)
    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(5)]
    rids = [engine.add_request(p, SamplingParams(max_tokens=12)) for p in prompts]
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 3
    engine.run_until_done()
    for rid, p in zip(rids, prompts):
        assert engine.requests[rid].output == reference(model, p, 12)
    assert engine.cache.num_free == 9
    with pytest.raises(ValueError, match="KV blocks"):  # could never fit: rejected up front
        engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=20))


def test_stop_tokens_and_max_tokens():
    model = tiny_model(2)
    prompt = [3, 1, 4, 1, 5]
    ref = reference(model, prompt, 20)
    stop = ref[6]
    first = ref.index(stop)
    engine = Engine(model, max_batch_size=4, num_blocks=32, block_size=4)
    out = engine.generate([prompt, prompt], [SamplingParams(max_tokens=20, stop_token_ids=(stop,)),
                                             SamplingParams(max_tokens=5)])
    assert out[0] == ref[:first]  # the stop token ends generation and is not part of the output
    assert out[1] == ref[:5]
    assert engine.cache.num_free == 32
    with pytest.raises(ValueError, match="context"):
        engine.add_request(prompt, SamplingParams(max_tokens=95))
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0)):
        with pytest.raises(ValueError):
            engine.add_request(prompt, SamplingParams(**bad))
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.add_request([64], SamplingParams())


def test_seeded_sampling_reproducible_across_batches():
    model = tiny_model(4)
    p = SamplingParams(max_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    alone = Engine(model, max_batch_size=1, num_blocks=64, block_size=4).generate([[7, 8, 9]], p)[0]
    engine = Engine(model, max_batch_size=4, num_blocks=64, block_size=4)
    others = SamplingParams(max_tokens=15, temperature=1.0, seed=99)
    mixed = engine.generate([[1, 2], [7, 8, 9], [5, 5, 5, 5]], [others, p, others])
    assert mixed[1] == alone
    # same as model.generate with a generator seeded alike (one sample_next call per token)
    g = torch.Generator().manual_seed(1234)
    assert alone == reference(model, [7, 8, 9], 15, temperature=1.0, top_k=20, top_p=0.9, generator=g)
    other_seed = Engine(model, max_batch_size=1, num_blocks=64, block_size=4).generate(
        [[7, 8, 9]], SamplingParams(max_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=1235))[0]
    assert other_seed != alone


def test_streaming_callback_iterator_and_abort():
    model = tiny_model(5)
    engine = Engine(model, max_batch_size=4, num_blocks=32, block_size=4)
    seen = []
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=6), on_token=lambda r, t: seen.append(t))
    engine.run_until_done()
    assert seen == engine.requests[rid].output + [None]
    streamed = list(engine.stream([1, 2, 3], SamplingParams(max_tokens=6)))
    assert streamed == seen[:-1]
    it = engine.stream([1, 2, 3], SamplingParams(max_tokens=50))
    next(it)
    assert engine.cache.num_free < 32
    it.close()  # abandoning the iterator aborts the request and frees its blocks
    assert engine.cache.num_free == 32
    rid = engine.add_request([4, 5], SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(rid)
    engine.step()
    assert engine.requests[rid].finish_reason == "abort" and engine.cache.num_free == 32


def test_refuses_unsupported_models():
    # served: dense attention ("A") only; streaming (S) and delta-net (G K F P) layers and the
    # N-gram embedding keep decode states the paged cache does not hold: a clear refusal
    for pattern in ("AG", "AS", "AK", "AF", "AP"):
        with pytest.raises(ValueError, match="dense attention"):
            Engine(tiny_model(pattern=pattern), max_batch_size=2, num_blocks=8)
    with pytest.raises(ValueError, match="N-gram"):
        Engine(tiny_model(ngram={"max_n": 2, "n_splits": 1, "table_base": 66}), max_batch_size=2, num_blocks=8)


def test_paged_decode_kernel_path_matches(monkeypatch):
    """Decode attention through ``paged_decode_attention`` (Triton; interpreted on CPU) == model.generate."""
    from catkit.utils.triton_utils import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    import catkit.ops.sparse_attention as sa

    calls = []
    orig = sa.paged_decode_attention
    monkeypatch.setattr(sa, "paged_decode_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model = tiny_model(6, n_heads=2, n_kv_heads=1)  # head_dim 16: a kernel size
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [3]]
    engine = Engine(model, max_batch_size=3, num_blocks=20, block_size=4, use_kernels=True)
    assert engine.generate(prompts, SamplingParams(max_tokens=5)) == [reference(model, p, 5) for p in prompts]
    assert calls  # the kernel really ran


def test_chunked_prefill_output_unchanged_and_decode_not_stalled(seed):
    model = tiny_model(seed % 1000)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 41, 9, 17)]
    params = SamplingParams(max_tokens=8)
    whole = Engine(model, max_batch_size=4, num_blocks=60, block_size=4).generate(prompts, params)
    assert whole == [reference(model, p, 8) for p in prompts]
    engine = Engine(model, max_batch_size=4, num_blocks=60, block_size=4, prefill_chunk=6)
    short = engine.add_request(prompts[0], params)
    engine.step()  # the short prompt is prefilled (one chunk) and decodes
    long_ = engine.add_request(prompts[1], params)
    grew = []
    while engine.requests[long_].prefilled < len(prompts[1]):
        before = len(engine.requests[short].output)
        engine.step()
        grew.append(len(engine.requests[short].output) - before)
    # the 41-token prompt took ceil(41 / 6) = 7 steps, and the running request decoded in each
    assert len(grew) == 7 and all(n == 1 for n in grew[:6])
    rest = [engine.add_request(p, params) for p in prompts[2:]]
    engine.run_until_done()
    outs = [engine.requests[r].output for r in (short, long_, *rest)]
    assert outs == whole
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, max_batch_size=1, num_blocks=8, prefill_chunk=0)


@pytest.mark.parametrize("same_draft", [True, False])
def test_speculative_engine_equals_plain_greedy(seed, same_draft):
    model = tiny_model(seed % 1000)
    draft = model if same_draft else tiny_model(seed % 1000 + 1, d_model=16, n_heads=2, n_kv_heads=1, pattern="A")
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 9, 4, 23)]
    params = [SamplingParams(max_tokens=m) for m in (11, 7, 13, 5)]
    plain = Engine(model, max_batch_size=4, num_blocks=80, block_size=4).generate(prompts, params)
    engine = Engine(model, max_batch_size=3, num_blocks=80, block_size=4, draft_model=draft, gamma=3,
                    prefill_chunk=8)
    # plus a sampled request in the same batch: it decodes one token per step, unaffected
    sampled = engine.add_request(prompts[1], SamplingParams(max_tokens=6, temperature=1.0, seed=3))
    outs = engine.generate(prompts, params)
    assert outs == plain
    ref_sampled = Engine(model, max_batch_size=1, num_blocks=80, block_size=4).generate(
        [prompts[1]], SamplingParams(max_tokens=6, temperature=1.0, seed=3))[0]
    assert engine.requests[sampled].output == ref_sampled
    st = engine.spec_stats
    assert st["rounds"] > 0 and 0 <= st["accepted"] <= st["drafted"]
    if same_draft:  # the target drafting for itself: every draft accepted
        assert st["accepted"] == st["drafted"]
    assert engine.cache.num_free == 80 and engine.draft_cache.num_free == 80
    with pytest.raises(ValueError, match="gamma"):
        Engine(model, max_batch_size=1, num_blocks=8, draft_model=draft, gamma=0)
