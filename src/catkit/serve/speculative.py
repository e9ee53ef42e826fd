"""Speculative decoding: a draft model proposes ``gamma`` tokens, the target verifies them at once.

Chain drafting: the draft decodes ``gamma`` tokens autoregressively with its own KV cache; the
target runs ONE forward pass over the last accepted token plus the ``gamma`` drafts (``gamma + 1``
positions) and accepts a prefix of them:

* greedy (``temperature == 0``): the longest prefix where each draft equals the target's argmax,
  then the target's argmax at the first mismatch (or the bonus position). The output is the
  target's greedy output token for token.
* sampling: the standard modified rejection sampling (Leviathan et al. 2023, Chen et al. 2023):
  draft ``x ~ q`` is accepted with probability ``min(1, p(x) / q(x))``; at the first rejection the
  token is drawn from ``norm(max(0, p - q))``; when all ``gamma`` are accepted a bonus token is
  drawn from ``p``. Both ``p`` and ``q`` go through the same temperature / top-k / top-p transform
  (``filter_logits``), so each emitted token is distributed exactly as the target's sampler.

Rollback: both models use contiguous ``KVCache`` s; rejected positions are dropped by setting
``KVCache.length`` back. That is safe because ``append`` writes at ``length`` and attention reads
only ``[:length]``, so stale entries past it are overwritten before they are ever read.

The verify pass is either the target's own forward (``verify="dense"``, lossless) or the sparse
verifier of :mod:`catkit.serve.sparse_verify` (``verify="sparse"``: NOT lossless, it changes the
verifier; report its quality cost next to its speed).

Batches: all rows of a ``KVCache`` share one length, so a round advances every row by the SMALLEST
accepted count ``c`` over the rows; a row that accepted more emits its (accepted) draft token at
position ``c``. Still lossless: the cut depends only on the other rows' independent randomness and
on this row's own rejection point, and every emitted token is an accepted draft or the
residual/bonus sample at that position. Equal-length prompts only.

Scope: dense-attention layers (letter ``A``) only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from catkit.models.sampling import check_sampling_args, filter_logits


def check_pair(target, draft) -> None:
    """Raise ``ValueError`` (naming the argument) unless target and draft can be used together."""
    for name, model in (("target", target), ("draft", draft)):
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(model, "new_caches"):
            raise ValueError(f"{name}: expected a catkit CatModel, got {type(model).__name__}")
        bad = sorted(set(cfg.pattern) - {"A"})
        if bad:
            raise ValueError(f"{name}: speculative decoding supports dense attention layers (letter 'A') only "
                             f"for now; pattern {cfg.pattern!r} has {bad}")
        if cfg.ngram:
            raise ValueError(f"{name}: the N-gram embedding keeps a decode state that cannot be rolled back")
        modes = {b.mixer.mode for b in model.blocks}
        if modes != {"dense"}:
            raise ValueError(f"{name}: every attention layer must be in dense mode, got modes {sorted(modes)}")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft: vocab_size {draft.cfg.vocab_size} differs from the target's "
                         f"{target.cfg.vocab_size}")


def rollback(caches: list, length: int) -> None:
    """Drop every cached position ``>= length`` (no copy: ``append`` overwrites from ``length``)."""
    for c in caches:
        if length > c.length:
            raise ValueError(f"length: cannot roll a cache of length {c.length} forward to {length}")
        c.length = length


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """The sampler's distribution: softmax of the filtered, tempered logits. [..., V] -> fp32 [..., V]."""
    shape = logits.shape
    flat = logits.float().reshape(-1, shape[-1]) / temperature
    return filter_logits(flat, top_k, top_p).softmax(-1).view(shape)


def greedy_accept(target_argmax: torch.Tensor, draft_tokens: torch.Tensor):
    """Greedy verification, vectorised over rows.

    target_argmax: [N, gamma + 1] the target's argmax at each verified position; draft_tokens:
    [N, gamma]. Returns (n_accepted [N] in 0..gamma, next_token [N]): the target's own token at
    the first mismatch, or the bonus token when every draft matched.
    """
    gamma = draft_tokens.shape[1]
    match = (target_argmax[:, :gamma] == draft_tokens).long()
    n = match.cumprod(-1).sum(-1)
    return n, target_argmax.gather(1, n[:, None]).squeeze(1)


def rejection_accept(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                     generator: torch.Generator | None = None):
    """Modified rejection sampling, vectorised over rows (lossless: outputs are distributed as ``p``).

    p: [N, gamma + 1, V] target probabilities at the verified positions (the last is the bonus
    position); q: [N, gamma, V] draft probabilities the drafts were sampled from; draft_tokens:
    [N, gamma]. Returns (n_accepted [N], next_token [N]): next_token is drawn from
    ``norm(max(0, p_n - q_n))`` at the first rejection ``n``, or from ``p_gamma`` if none.
    """
    n_rows, gamma = draft_tokens.shape
    if gamma:
        p_x = p[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_x = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = torch.rand(n_rows, gamma, generator=generator, device=p.device)
        # accept iff u * q(x) < p(x), i.e. u < p/q without dividing by a zero q
        ok = (u * q_x < p_x).long()
        n = ok.cumprod(-1).sum(-1)
    else:
        n = torch.zeros(n_rows, dtype=torch.long, device=p.device)
    rows = torch.arange(n_rows, device=p.device)
    p_n = p[rows, n]
    # the bonus position has no draft: q = 0 there, so the residual is p itself
    q_pad = torch.cat([q, q.new_zeros(n_rows, 1, q.shape[-1])], 1) if gamma else q.new_zeros(n_rows, 1, p.shape[-1])
    resid = (p_n - q_pad[rows, n]).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    # p == q up to rounding leaves no residual; rejection then had probability ~0, fall back to p
    resid = torch.where(mass > 1e-12, resid / mass.clamp_min(1e-30), p_n)
    nxt = torch.multinomial(resid, 1, generator=generator).squeeze(-1)
    return n, nxt


@dataclass
class SpecStats:
    """Counters of one ``speculative_generate`` call (times in seconds, wall clock)."""

    steps: int = 0  # verification rounds = target calls after the prefill
    target_calls: int = 0  # target forward passes, prefill included
    draft_calls: int = 0  # draft forward passes, prefill included
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted (per round: the smallest count over the batch rows)
    row_accepted: int = 0  # draft tokens each row's own verification accepted, summed over rows
    generated: int = 0  # tokens emitted
    draft_time: float = 0.0
    verify_time: float = 0.0
    accept_lengths: list = field(default_factory=list)  # accepted drafts per round

    @property
    def mean_accepted(self) -> float:
        """Mean number of accepted draft tokens per verification round."""
        return self.accepted / max(self.steps, 1)

    @property
    def mean_acceptance_length(self) -> float:
        """Mean tokens emitted per verification round (accepted drafts + the target's token)."""
        return self.generated / max(self.steps, 1)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "target_calls": self.target_calls, "draft_calls": self.draft_calls,
                "drafted": self.drafted, "accepted": self.accepted, "generated": self.generated,
                "mean_accepted": self.mean_accepted, "mean_acceptance_length": self.mean_acceptance_length,
                "acceptance_rate": self.accepted / max(self.drafted, 1), "row_accepted": self.row_accepted,
                "draft_time": self.draft_time, "verify_time": self.verify_time}


class SpeculativeDecoder:
    """One speculative generation with its caches kept as attributes (for tests and the engine).

    After :meth:`generate` returns ``ids`` ([B, T]): ``target_caches`` hold exactly the first
    ``T - 1`` positions and ``draft_caches`` a prefix of them (the last token is the next input).
    """

    def __init__(self, target, draft, *, gamma: int = 4, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, verify: str = "dense",
                 sparse_config=None):
        check_pair(target, draft)
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma: expected an int >= 1, got {gamma!r}")
        check_sampling_args(temperature, top_k, top_p)
        if verify not in ("dense", "sparse"):
            raise ValueError(f"verify: expected 'dense' or 'sparse', got {verify!r}")
        if verify == "sparse":
            from catkit.serve.sparse_verify import SparseVerifyConfig

            sparse_config = sparse_config if sparse_config is not None else SparseVerifyConfig()
            if not isinstance(sparse_config, SparseVerifyConfig):
                raise ValueError(f"sparse_config: expected a SparseVerifyConfig, got {type(sparse_config).__name__}")
            sparse_config.check(target)
        elif sparse_config is not None:
            raise ValueError("sparse_config: given, but verify='dense'; pass verify='sparse' to use it")
        self.target, self.draft, self.gamma = target, draft, gamma
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.verify, self.sparse_config = verify, sparse_config
        self.target_caches: list | None = None
        self.draft_caches: list | None = None
        self.stats = SpecStats()
        self.sparse_stats: dict = {}

    def _probs(self, logits):
        return probs_from_logits(logits, self.temperature, self.top_k, self.top_p)

    def _target_forward(self, ids):
        if self.verify == "sparse":
            from catkit.serve.sparse_verify import sparse_verify_forward

            return sparse_verify_forward(self.target, ids, self.target_caches, self.sparse_config,
                                         stats=self.sparse_stats)
        return self.target(ids, caches=self.target_caches).logits

    def _draft(self, seq: torch.Tensor, gamma: int):
        """Propose ``gamma`` tokens after ``seq``; returns (tokens [1, gamma], draft probs [1, gamma, V] or None)."""
        dc = self.draft_caches
        inp = seq[:, dc[0].length :]  # tokens the draft has not cached yet (>= 1: the last one)
        toks, probs = [], []
        for _ in range(gamma):
            logits = self.draft(inp, caches=dc).logits[:, -1].float()
            self.stats.draft_calls += 1
            if self.temperature == 0:
                nxt = logits.argmax(-1)
            else:
                q = self._probs(logits)
                nxt = torch.multinomial(q, 1, generator=self.generator).squeeze(-1)
                probs.append(q)
            toks.append(nxt)
            inp = nxt[:, None]
        return torch.stack(toks, 1), (torch.stack(probs, 1) if probs else None)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids: expected a non-empty [B, T] tensor, got "
                             f"{getattr(prompt_ids, 'shape', type(prompt_ids).__name__)}")
        if prompt_ids.min() < 0 or prompt_ids.max() >= self.target.cfg.vocab_size:
            raise ValueError(f"prompt_ids: ids must be in [0, {self.target.cfg.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        total = prompt_ids.shape[1] + max_new_tokens
        for name, m in (("target", self.target), ("draft", self.draft)):
            if total > m.cfg.max_seq_len:
                raise ValueError(f"max_new_tokens: prompt + new tokens = {total} exceeds the {name}'s "
                                 f"max_seq_len={m.cfg.max_seq_len}")
        st = self.stats = SpecStats()
        wanted = self.sparse_stats.get("selections")  # a caller may ask to record the block selections
        self.sparse_stats.clear()
        if wanted is not None:
            self.sparse_stats["selections"] = wanted
        # Rounds never draft past max_new_tokens, so caches of `total` positions always suffice.
        rows = prompt_ids.shape[0]
        self.target_caches = self.target.new_caches(rows, total)
        self.draft_caches = self.draft.new_caches(rows, total)
        seq = prompt_ids
        if max_new_tokens == 0:
            return seq
        # Prefill both models on all but the last prompt token: it is the first input of round 1.
        if seq.shape[1] > 1:
            t0 = time.perf_counter()
            self.target(seq[:, :-1], caches=self.target_caches)
            t1 = time.perf_counter()
            self.draft(seq[:, :-1], caches=self.draft_caches)
            st.verify_time += t1 - t0
            st.draft_time += time.perf_counter() - t1
            st.target_calls += 1
            st.draft_calls += 1
        while st.generated < max_new_tokens:
            gamma = min(self.gamma, max_new_tokens - st.generated - 1)
            t0 = time.perf_counter()
            drafts, q = self._draft(seq, gamma) if gamma else (seq.new_zeros(rows, 0), None)
            t1 = time.perf_counter()
            base = seq.shape[1] - 1  # target cache length before this round
            logits = self._target_forward(torch.cat([seq[:, -1:], drafts], 1)).float()
            if self.temperature == 0:
                n, nxt = greedy_accept(logits.argmax(-1), drafts)
            else:
                q = q if q is not None else logits.new_zeros(rows, 0, logits.shape[-1])
                n, nxt = rejection_accept(self._probs(logits), q, drafts, self.generator)
            st.verify_time += time.perf_counter() - t1
            st.draft_time += t1 - t0
            n_acc = int(n.min())  # rows share one cache length: advance all by the shortest accept
            if n_acc < gamma:  # rows that accepted more emit their accepted draft at position n_acc
                nxt = torch.where(n == n_acc, nxt, drafts[:, n_acc])
            st.row_accepted += int(n.sum())
            seq = torch.cat([seq, drafts[:, :n_acc], nxt[:, None]], 1)
            # Keep the last accepted input token and the accepted drafts; drop the rejected ones.
            rollback(self.target_caches, base + 1 + n_acc)
            rollback(self.draft_caches, min(self.draft_caches[0].length, base + 1 + n_acc))
            st.steps += 1
            st.target_calls += 1
            st.drafted += gamma
            st.accepted += n_acc
            st.generated += n_acc + 1
            st.accept_lengths.append(n_acc)
        return seq


def speculative_generate(target, draft, prompt_ids: torch.Tensor, max_new_tokens: int, *, gamma: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None, verify: str = "dense",
                         sparse_config=None) -> tuple[torch.Tensor, dict]:
    """Continue ``prompt_ids`` with speculative decoding; returns ``(ids, stats)``.

    Args:
        target, draft: ``CatModel`` s of dense attention layers with the same vocabulary.
        prompt_ids: [B, T0] int64 (equal-length prompts; a round advances all rows by the
            smallest accepted count, see the module doc).
        max_new_tokens: exactly this many tokens are appended (no stop tokens).
        gamma: draft tokens per round (default 4).
        temperature, top_k, top_p, generator: as in ``CatModel.generate``; ``temperature == 0``
            is greedy and gives the target's greedy output token for token.
        verify: ``"dense"`` (lossless) or ``"sparse"`` (``catkit.serve.sparse_verify``; lossy).
        sparse_config: a ``SparseVerifyConfig`` for ``verify="sparse"`` (default: its defaults).
    Returns:
        ids [B, T0 + max_new_tokens] and a stats dict (``mean_acceptance_length`` = tokens per
        verification round, ``mean_accepted``, ``target_calls``, ``draft_time``, ``verify_time``, ...;
        with sparse verify also ``sparse`` counters).

    Example::

        ids, stats = speculative_generate(target, draft, prompt, 64, gamma=4)
    """
    dec = SpeculativeDecoder(target, draft, gamma=gamma, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator, verify=verify, sparse_config=sparse_config)
    ids = dec.generate(prompt_ids, max_new_tokens)
    stats = dec.stats.as_dict()
    if verify == "sparse":
        stats["sparse"] = dict(dec.sparse_stats)
    return ids, stats
