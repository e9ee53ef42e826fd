"""A continuous-batching inference engine over a paged KV cache.

``Engine.step()`` admits waiting requests whose worst case fits the cache (each is prefilled on
its own: whole, or with ``prefill_chunk`` a chunk of at most that many prompt tokens per step, so
a long prompt does not stall the requests already decoding), then runs ONE batched forward that
decodes one token for every running request whose prompt is fully prefilled. Each
request attends only to its own paged K/V: the engine gathers every request's keys and values into
a padded batch with a key-padding mask (or calls ``paged_decode_attention`` on a GPU). Requests
join and leave between steps. The per-layer math reuses the model's own modules (norms, ``qkv``,
``out``, FFN, RoPE), so ``CatModel`` itself is unchanged.

Example::

    engine = Engine(model, max_batch_size=8, num_blocks=256)
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=20))
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from catkit.layers.rope import apply_rope, rope_cos_sin
from catkit.models.sampling import check_sampling_args, sample_next
from catkit.serve.paged_cache import PagedKVCache, check_model_supported
from catkit.utils.triton_utils import kernel_device_ok


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible.

    ``stop_token_ids``: generation ends when one is produced; the stop token is not part of the output.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple = ()

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an int >= 1, got {self.max_tokens!r}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float | None = None  # seconds from add_request to the first token
    tokens_per_s: float | None = None  # generated tokens / (finish - first token)
    arrival: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None


@dataclass
class Request:
    rid: int
    prompt: list
    params: SamplingParams
    on_token: Callable | None = None  # on_token(request, token) per token; token None once finished
    output: list = field(default_factory=list)
    status: str = "waiting"  # waiting | running | finished
    finish_reason: str | None = None  # stop | length | abort | error
    generator: torch.Generator | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    prefilled: int = 0  # prompt tokens already in the KV cache

    @property
    def finished(self) -> bool:
        return self.status == "finished"


class Engine:
    """Continuous batching over ``model`` (a ``CatModel`` with dense attention layers only).

    Args:
        max_batch_size: most requests decoded together in one step.
        num_blocks, block_size: the paged KV cache's pool (per layer).
        device: default the model's device.
        use_kernels: decode attention through ``paged_decode_attention`` (Triton) where the device
            allows; None (default) = on CUDA only (under the CPU interpreter it is correct but slow).
        prefill_chunk: None (default) = prefill a prompt whole when it is admitted; an int = at
            most this many prompt tokens are prefilled per step (one chunk forward per request,
            oldest first), interleaved with the decode steps of the running requests.
        draft_model, gamma: speculative decoding for greedy requests (temperature 0): the draft
            (its own paged cache, same block pool size) proposes ``gamma`` tokens per request and
            step, the target verifies them in one batched forward, each request keeps its longest
            matching prefix plus the target's token (output == plain greedy; rejected positions
            are dropped by cache lengths). Sampled requests decode one token per step as usual.
    Thread safety: ``add_request`` and ``abort`` only touch an inbox under a short lock (they never
    wait for a running step), ``step`` drains it under the same lock; so a server may call ``step``
    from a background thread while handlers add and abort requests.
    """

    def __init__(self, model, *, max_batch_size: int, num_blocks: int, block_size: int = 16, device=None,
                 use_kernels: bool | None = None, prefill_chunk: int | None = None, draft_model=None,
                 gamma: int = 4):
        check_model_supported(model)
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk: expected None or a positive int, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected a positive int, got {max_batch_size!r}")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else model.embed.weight.device
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, device=self.device)
        self.draft, self.draft_cache, self.gamma = None, None, 0
        if draft_model is not None:
            from catkit.serve.speculative import check_pair

            check_pair(model, draft_model)
            check_model_supported(draft_model)
            if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
                raise ValueError(f"gamma: expected an int >= 1, got {gamma!r}")
            self.draft, self.gamma = draft_model.eval(), gamma
            self.draft_cache = PagedKVCache.for_model(draft_model, num_blocks, block_size, device=self.device)
        self.spec_stats = {"rounds": 0, "drafted": 0, "accepted": 0}
        self.max_batch_size = max_batch_size
        self.use_kernels = use_kernels
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}  # live requests plus the most recent finished ones
        self._finished_order: collections.deque[int] = collections.deque()
        self._aborts: set[int] = set()
        self._inbox: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self._inbox_lock = threading.Lock()  # guards _inbox, _aborts and ids
        self.lock = threading.RLock()  # held for a whole step

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    # -- requests ---------------------------------------------------------------------------
    def check_request(self, prompt_ids, params: SamplingParams) -> list:
        """Validate a request; returns the prompt as a list of ints. ValueError names the bad field."""
        params.validate()
        prompt = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
        if not prompt:
            raise ValueError("prompt_ids: expected at least one token")
        vocab = self.model.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt_ids: ids must be in [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_seq_len:
            raise ValueError(f"max_tokens: prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds the model's context of {self.max_seq_len} tokens")
        if self.cache.blocks_for(total + (self.gamma + 1 if self.draft else 0)) > self.cache.num_blocks:
            raise ValueError(f"max_tokens: {total} tokens need {self.cache.blocks_for(total)} KV blocks, "
                             f"the cache has {self.cache.num_blocks}")
        return prompt

    def add_request(self, prompt_ids, params: SamplingParams | None = None, *, on_token: Callable | None = None) -> int:
        """Queue a request; returns its id. It joins the batch at the next ``step`` with room."""
        params = params or SamplingParams()
        prompt = self.check_request(prompt_ids, params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with self._inbox_lock:
            rid = next(self._ids)
            req = Request(rid, prompt, params, on_token, generator=gen)
            req.stats.prompt_tokens, req.stats.arrival = len(prompt), time.perf_counter()
            self.requests[rid] = req
            self._inbox.append(req)
        return rid

    def abort(self, rid: int) -> None:
        """Stop a request at the next step (thread safe); its blocks are freed then."""
        with self._inbox_lock:
            req = self.requests.get(rid)
            if req is not None and not req.finished:
                self._aborts.add(rid)

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted (queued, or just added and not seen by a step yet)."""
        return len(self.waiting) + len(self._inbox)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborts or self._inbox)

    def fail_all(self, reason: str = "error") -> None:
        """Finish every live request (used by a server when a step raised), freeing all blocks."""
        with self.lock:
            self._drain_inbox()
            for req in list(self.running) + list(self.waiting):
                self._finish(req, reason)
            self._aborts.clear()

    def _drain_inbox(self) -> set[int]:
        with self._inbox_lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        return aborts

    # -- scheduling ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """One scheduling step; returns the requests that finished in it."""
        with self.lock:
            done: list[Request] = []
            for rid in self._drain_inbox():
                req = self.requests.get(rid)
                if req is not None and not req.finished:
                    self._finish(req, "abort")
                    done.append(req)
            # admit (FIFO: a request that doesn't fit blocks those behind it, so none starves)
            while self.waiting and len(self.running) < self.max_batch_size:
                req = self.waiting[0]
                # speculation writes up to gamma + 1 positions past the last token: reserve them
                need = len(req.prompt) + req.params.max_tokens + (self.gamma + 1 if self.draft else 0)
                if not self.cache.admit(req.rid, need):
                    break
                if self.draft is not None and not self.draft_cache.admit(req.rid, need):
                    self.cache.free(req.rid)
                    break
                self.waiting.popleft()
                req.status = "running"
                self.running.append(req)
                if self.prefill_chunk is None:
                    self._prefill(req, len(req.prompt))
                    if req.finished:
                        done.append(req)
            if self.prefill_chunk is not None:  # a token budget of prompt chunks per step, oldest first
                budget = self.prefill_chunk
                for req in [r for r in self.running if r.prefilled < len(r.prompt)]:
                    n = min(budget, len(req.prompt) - req.prefilled)
                    self._prefill(req, n)
                    if req.finished:
                        done.append(req)
                    budget -= n
                    if budget == 0:
                        break
            ready = [r for r in self.running if r.prefilled == len(r.prompt)]
            spec = [r for r in ready if self.draft is not None and r.params.temperature == 0]
            plain = [r for r in ready if r not in spec]
            if plain:
                done += self._decode(plain)
            if spec:
                done += self._speculate(spec)
            return done

    def _prefill(self, req: Request, n: int) -> None:
        """Prefill the next ``n`` prompt tokens; the last chunk also samples the first token."""
        start = req.prefilled
        self.cache.ensure(req.rid, start + n)
        ids = torch.tensor([req.prompt[start : start + n]], device=self.device)
        logits = self._forward(ids, [req.rid], [start])
        if self.draft is not None:
            self.draft_cache.ensure(req.rid, start + n)
            self._forward(ids, [req.rid], [start], model=self.draft, cache=self.draft_cache)
        req.prefilled = start + n
        if req.prefilled == len(req.prompt):
            self._emit(req, logits[0, -1])

    def _decode(self, reqs: list[Request]) -> list[Request]:
        rids = [r.rid for r in reqs]
        starts = [self.cache.length(r) for r in rids]
        for r, s in zip(rids, starts):
            self.cache.ensure(r, s + 1)  # within the admission quota: cannot fail
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=self.device)
        logits = self._forward(ids, rids, starts)[:, -1]
        # greedy rows: one argmax and one host sync for the whole batch
        greedy = logits.float().argmax(-1).tolist()
        finished = []
        for b, req in enumerate(reqs):
            self._emit(req, logits[b], greedy[b] if req.params.temperature == 0 else None)
            if req.finished:
                finished.append(req)
        return finished

    def _speculate(self, reqs: list[Request]) -> list[Request]:
        """One speculative round for greedy requests: draft ``gamma``, verify once, accept per row."""
        from catkit.serve.speculative import greedy_accept

        g = self.gamma
        rids = [r.rid for r in reqs]
        lens = [self.cache.length(r) for r in rids]  # each request's last token sits at position lens[b]
        for r, n in zip(rids, lens):  # within the admission quota (it reserved gamma + 1 extra)
            self.cache.ensure(r, n + g + 1)
            self.draft_cache.ensure(r, n + g)
        seq = [r.prompt + r.output for r in reqs]
        # the draft re-reads the last two tokens (rewriting the older one, if it already held it,
        # with the same values), so every row has the same input length whatever it accepted
        ids = torch.tensor([[s[n - 1], s[n]] for s, n in zip(seq, lens)], device=self.device)
        logits = self._forward(ids, rids, [n - 1 for n in lens], model=self.draft, cache=self.draft_cache)
        drafts = [logits[:, -1].argmax(-1)]
        for j in range(g - 1):
            logits = self._forward(drafts[-1][:, None], rids, [n + 1 + j for n in lens], model=self.draft,
                                   cache=self.draft_cache)
            drafts.append(logits[:, -1].argmax(-1))
        drafts = torch.stack(drafts, 1)
        last = torch.tensor([[s[n]] for s, n in zip(seq, lens)], device=self.device)
        logits = self._forward(torch.cat([last, drafts], 1), rids, lens)
        n_acc, nxt = greedy_accept(logits.float().argmax(-1), drafts)
        n_acc, nxt, drafts = n_acc.tolist(), nxt.tolist(), drafts.tolist()
        st = self.spec_stats
        st["rounds"] += 1
        st["drafted"] += g * len(reqs)
        st["accepted"] += sum(n_acc)
        finished = []
        for b, req in enumerate(reqs):
            # the target cache keeps the last token and the accepted drafts; the rest is dropped
            self.cache.set_length(req.rid, lens[b] + 1 + n_acc[b])
            for tok in drafts[b][: n_acc[b]] + [nxt[b]]:
                self._emit(req, logits[b, 0], tok)
                if req.finished:
                    finished.append(req)
                    break
        return finished

    def _emit(self, req: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample (unless ``token`` is given: the greedy pick), record, stream, and finish if done."""
        p = req.params
        if token is None:
            token = int(sample_next(logits[None], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                    generator=req.generator)[0])
        tok = token
        now = time.perf_counter()
        if req.stats.first_token_at is None:
            req.stats.first_token_at = now
            req.stats.time_to_first_token = now - req.stats.arrival
        if tok in p.stop_token_ids:
            self._finish(req, "stop")
            return
        req.output.append(tok)
        req.stats.generated_tokens += 1
        if req.on_token is not None:
            req.on_token(req, tok)
        if len(req.output) >= p.max_tokens:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        if req.finished:
            return
        req.status, req.finish_reason = "finished", reason
        self.cache.free(req.rid)
        if self.draft_cache is not None:
            self.draft_cache.free(req.rid)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        s = req.stats
        s.finished_at = time.perf_counter()
        if s.first_token_at is not None and s.generated_tokens > 1:
            s.tokens_per_s = (s.generated_tokens - 1) / max(s.finished_at - s.first_token_at, 1e-9)
        self._finished_order.append(req.rid)
        while len(self._finished_order) > 1024:  # keep the request map bounded
            self.requests.pop(self._finished_order.popleft(), None)
        if req.on_token is not None:
            req.on_token(req, None)

    # -- the model forward over paged K/V ------------------------------------------------------
    def _forward(self, ids: torch.Tensor, rids: list[int], starts: list[int], *, model=None,
                 cache: PagedKVCache | None = None) -> torch.Tensor:
        """ids [B, T]: row b continues request ``rids[b]`` at position ``starts[b]``. Returns logits [B, T, V].

        ``model`` / ``cache``: default the target and its cache (the draft passes its own).
        """
        model = model if model is not None else self.model
        cache = cache if cache is not None else self.cache
        cfg = model.cfg
        b, t = ids.shape
        dev = self.device
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(t, device=dev)[None, :]  # [B, T]
        x = model.embed(ids)
        rope = rope_cos_sin(pos, cfg.dim_head, cfg.rope_theta, dtype=x.dtype)
        lens = [s + t for s in starts]
        index, valid = cache.gather_index(rids, lens)
        # key j visible to query i of row b: j is a real key and j <= its position (causal)
        mask = (valid[:, None, :] & (torch.arange(index.shape[1], device=dev)[None, None, :] <= pos[:, :, None]))
        want = self.use_kernels if self.use_kernels is not None else dev.type == "cuda"
        use_kernel = want and t == 1 and cfg.dim_head in (16, 32, 64, 128)
        table = cache.block_table(rids) if use_kernel else None
        for i, block in enumerate(model.blocks):
            attn = block.mixer
            h = block.mixer_norm(x)
            hq, hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
            q, k, v = attn.qkv(h).view(b, t, hq + 2 * hk, d).split([hq, hk, hk], dim=2)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            cache.write(i, rids, starts, k, v)
            if use_kernel and kernel_device_ok(q, cache.k[i]):
                from catkit.ops.sparse_attention import paged_decode_attention

                seq_lens = torch.tensor(lens, device=dev, dtype=torch.int32)
                o = paged_decode_attention(q[:, 0].to(cache.k[i].dtype), cache.k[i], cache.v[i], table, seq_lens,
                                           validate=False)[:, None].to(q.dtype)
            else:
                kk, vv = cache.gather(i, index)
                o = F.scaled_dot_product_attention(q.transpose(1, 2), kk.to(q.dtype).transpose(1, 2),
                                                   vv.to(q.dtype).transpose(1, 2), attn_mask=mask[:, None],
                                                   enable_gqa=hq != hk).transpose(1, 2)
            x = x + attn.out(o.reshape(b, t, hq * d))
            f = block.ffn(block.ffn_norm(x))
            x = x + (f[0] if isinstance(f, tuple) else f)
        for r, n in zip(rids, lens):
            cache.set_length(r, n)
        x = model.norm(x)
        weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
        return F.linear(x, weight)

    # -- conveniences -------------------------------------------------------------------------
    def run_until_done(self, max_steps: int | None = None) -> None:
        """Step while there is work (at most ``max_steps`` steps; default enough for every request)."""
        limit = max_steps if max_steps is not None else 10 * self.max_seq_len * (len(self.requests) + 1)
        for _ in range(limit):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"engine: still busy after {limit} steps")

    def generate(self, prompts: list, params: SamplingParams | list | None = None) -> list[list[int]]:
        """Run every prompt to completion (batched); returns each request's generated token ids."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: expected {len(prompts)} SamplingParams, got {len(plist)}")
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        reqs = [self.requests[r] for r in rids]
        self.run_until_done()
        return [list(r.output) for r in reqs]

    def stream(self, prompt_ids, params: SamplingParams | None = None):
        """Yield tokens of one request as they are produced (steps the engine itself; other requests advance too)."""
        rid = self.add_request(prompt_ids, params)
        req = self.requests[rid]
        sent = 0
        try:
            while True:
                while sent < len(req.output):
                    yield req.output[sent]
                    sent += 1
                if req.finished:
                    return
                self.step()
        finally:
            if not req.finished:
                self.abort(rid)
                self.step()
