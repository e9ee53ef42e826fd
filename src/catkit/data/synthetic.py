"""Synthetic tasks with exactly checkable answers: MQAR, passkey retrieval, copy, arithmetic.

Shared conventions, so one training loop and one metric serve every task:

* Each task returns ``TaskBatch(inputs [B, T], targets [B, T])``, int64, on the CPU.
* ``targets`` is ``IGNORE`` (-100, what ``F.cross_entropy`` skips) everywhere except the scored
  positions, and at a scored position ``t`` it equals ``inputs[:, t + 1]`` (teacher forcing: the
  answer also appears in the inputs, the model predicts it one step ahead). The one exception is
  a scored last position, which never happens here: every answer ends before ``T``.
* Everything is drawn from the given ``torch.Generator`` with vectorised torch ops, so a seed
  gives the same batch and long sequences cost no Python loop per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .tokenizer import ByteTokenizer

IGNORE = -100
_TOK = ByteTokenizer()


class TaskBatch(NamedTuple):
    """``inputs [B, T]`` and ``targets [B, T]`` (``IGNORE`` except where scored), int64."""

    inputs: torch.Tensor
    targets: torch.Tensor


class PasskeyBatch(TaskBatch):
    """A :class:`TaskBatch` that also carries the hidden keys.

    Unpacks like a ``TaskBatch`` (``x, y = passkey(...)``); ``.answers`` is ``[B]`` int64 (the
    5-digit numbers) and ``.answer_digits`` ``[B, 5]`` int64 (0..9).
    """


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _distinct(batch_size: int, n: int, pool: int, generator) -> torch.Tensor:
    """``[B, n]`` distinct draws from ``range(pool)`` per row (argsort of noise = a random permutation)."""
    return torch.rand(batch_size, pool, generator=generator).argsort(dim=1)[:, :n]


# --------------------------------------------------------------------------------------------- MQAR
def mqar(
    batch_size: int,
    *,
    num_kv_pairs: int,
    seq_len: int,
    vocab_size: int,
    num_queries: int | None = None,
    generator: torch.Generator | None = None,
) -> TaskBatch:
    """Multi-query associative recall (the Zoology / Based benchmark).

    Layout of a row::

        k1 v1 k2 v2 ... kN vN | 0 0 kq1 vq1 0 0 0 0 kq2 vq2 0 ...
        <--- 2 * num_kv_pairs ->  <------ query region, pairs at random even offsets ------>

    Token 0 is filler; keys come from ``[1, 1 + K)`` and values from ``[1 + K, vocab_size)``
    with ``K = (vocab_size - 1) // 2``, so keys and values never collide. Keys are distinct within
    a row (each key is bound to one value), values too. The queries are distinct keys of the row,
    placed uniformly at random among the ``(seq_len - 2N) // 2`` pair slots after the context
    (Zoology uses power-law gaps; uniform keeps recall distance spread over the whole window).
    The target at a query key's position is the value bound to it; nothing else is scored.

    Args:
        batch_size: ``B``.
        num_kv_pairs: ``N`` key-value pairs in the context.
        seq_len: ``T``; needs ``T >= 2 * N + 2 * num_queries``.
        vocab_size: needs ``vocab_size >= 2 * N + 1``.
        num_queries: defaults to ``N`` (every key is queried once); at most ``N``.
        generator: source of randomness.

    Returns:
        ``TaskBatch(inputs [B, T], targets [B, T])`` with ``num_queries`` scored positions per row.

    Example::

        x, y = mqar(32, num_kv_pairs=8, seq_len=64, vocab_size=256, generator=g)
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    if num_queries is None:
        num_queries = num_kv_pairs
    _check_int("num_queries", num_queries, 1)
    if num_queries > num_kv_pairs:
        raise ValueError(
            f"num_queries: at most num_kv_pairs={num_kv_pairs} distinct keys can be queried, got {num_queries}"
        )
    _check_int("seq_len", seq_len, 1)
    if seq_len < 2 * num_kv_pairs + 2 * num_queries:
        raise ValueError(
            f"seq_len: {seq_len} cannot hold {num_kv_pairs} key-value pairs and {num_queries} queries "
            f"(needs >= {2 * num_kv_pairs + 2 * num_queries})"
        )
    _check_int("vocab_size", vocab_size, 1)
    if vocab_size < 2 * num_kv_pairs + 1:
        raise ValueError(
            f"vocab_size: {vocab_size} is too small for {num_kv_pairs} distinct keys and values plus a "
            f"filler token (needs >= {2 * num_kv_pairs + 1})"
        )
    B, N, Q, T = batch_size, num_kv_pairs, num_queries, seq_len
    n_keys = (vocab_size - 1) // 2
    n_values = vocab_size - 1 - n_keys
    keys = 1 + _distinct(B, N, n_keys, generator)  # [B, N]
    values = 1 + n_keys + _distinct(B, N, n_values, generator)  # [B, N]

    inputs = torch.zeros(B, T, dtype=torch.int64)
    inputs[:, 0 : 2 * N : 2] = keys
    inputs[:, 1 : 2 * N : 2] = values

    which = _distinct(B, Q, N, generator)  # [B, Q]: which pairs are queried
    slots = _distinct(B, Q, (T - 2 * N) // 2, generator)  # [B, Q]: where in the query region
    qpos = 2 * N + 2 * slots
    inputs.scatter_(1, qpos, keys.gather(1, which))
    inputs.scatter_(1, qpos + 1, values.gather(1, which))

    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    targets.scatter_(1, qpos, values.gather(1, which))
    return TaskBatch(inputs, targets)


# ------------------------------------------------------------------------------------------ passkey
PASSKEY_HEADER = b"There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
PASSKEY_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = b"The pass key is #####. Remember it. ##### is the pass key. "
PASSKEY_QUESTION = b" What is the pass key? The pass key is "
PASSKEY_DIGITS = 5


def passkey_min_len(marker: int | None = None) -> int:
    """The shortest ``context_len`` :func:`passkey` accepts (no filler at all)."""
    return len(PASSKEY_HEADER) + len(PASSKEY_NEEDLE) + len(PASSKEY_QUESTION) + PASSKEY_DIGITS + 3 * (marker is not None)


def _passkey_templates(marker: int | None) -> tuple[bytes, bytes]:
    """(needle, question), with ``marker`` right before each copy of the key and at the question's end."""
    if marker is None:
        return PASSKEY_NEEDLE, PASSKEY_QUESTION
    m = bytes([marker])
    return PASSKEY_NEEDLE.replace(b"#####", m + b"#####"), PASSKEY_QUESTION + m


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.tensor(list(b), dtype=torch.int64)


def passkey(
    batch_size: int,
    *,
    context_len: int,
    generator: torch.Generator | None = None,
    filler: list[int] | bytes | None = None,
    marker: int | None = None,
) -> PasskeyBatch:
    """Passkey retrieval: a 5-digit key hidden at a random depth in filler text, byte level.

    Row layout (bytes, length exactly ``context_len``)::

        HEADER  filler[:a]  "The pass key is 12345. Remember it. 12345 is the pass key. "
        filler[a:F]  " What is the pass key? The pass key is 12345"

    ``F`` is whatever length makes the row ``context_len`` long; the filler is one continuous
    stream (the default sentence repeated, or ``filler`` tiled) with the needle inserted at depth
    ``a``, drawn per row among the sentence starts (after ``". "`` or a newline) so the needle
    does not split a word. The scored targets are the five answer digits at the end.

    Args:
        batch_size: ``B``.
        context_len: ``T``, at least :func:`passkey_min_len` (about 200).
        generator: source of randomness (keys and depths).
        filler: byte ids (0..255) or bytes to use as haystack, e.g. corpus text; tiled if short.
        marker: optional byte id (0..255, best one the haystack never holds, e.g. 1) written right
            before both copies of the key in the needle and at the end of the question, so a single
            token names where the key starts (an easier, one-hop induction; small models learn it
            faster). None: the standard text.

    Returns:
        :class:`PasskeyBatch` ``(inputs [B, T], targets [B, T])`` with ``.answers [B]`` and
        ``.answer_digits [B, 5]``; score with :func:`passkey_accuracy`.

    Example::

        batch = passkey(4, context_len=2048, generator=g)
        x, y = batch                      # [4, 2048] each; batch.answers -> tensor([48213, ...])
    """
    _check_int("batch_size", batch_size, 1)
    if marker is not None and (isinstance(marker, bool) or not isinstance(marker, int) or not 0 <= marker <= 255):
        raise ValueError(f"marker: expected a byte id in [0, 255] or None, got {marker!r}")
    _check_int("context_len", context_len, passkey_min_len(marker))
    if filler is None:
        fill = _bytes_tensor(PASSKEY_FILLER)
    else:
        if isinstance(filler, (bytes, bytearray)):
            filler = list(filler)
        fill = torch.as_tensor(list(filler), dtype=torch.int64)
        if fill.ndim != 1 or fill.numel() == 0:
            raise ValueError("filler: expected a non-empty flat list of byte ids")
        if int(fill.min()) < 0 or int(fill.max()) > 255:
            raise ValueError("filler: byte ids must be in [0, 255]")
    B, T = batch_size, context_len
    needle_t, question_t = _passkey_templates(marker)
    header, needle, question = (_bytes_tensor(b) for b in (PASSKEY_HEADER, needle_t, question_t))
    H, N, Qn, D = header.numel(), needle.numel(), question.numel(), PASSKEY_DIGITS
    F = T - H - N - Qn - D
    stream = fill.repeat(F // fill.numel() + 1)[:F]

    # Depth: a sentence start inside the filler (the very start always qualifies).
    boundary = torch.zeros(F + 1, dtype=torch.bool)
    boundary[0] = True
    if F > 1:
        after_dot = (stream[1:] == ord(" ")) & (stream[:-1] == ord("."))
        boundary[2:] |= after_dot
        boundary[1:] |= stream == ord("\n")
    cand = boundary.nonzero().flatten()
    depth = cand[torch.randint(0, cand.numel(), (B,), generator=generator)]  # [B]

    answers = torch.randint(10**(D - 1), 10**D, (B,), generator=generator)
    powers = 10 ** torch.arange(D - 1, -1, -1)
    digits = (answers[:, None] // powers) % 10  # [B, D]
    digit_ids = digits + ord("0")

    needles = needle.expand(B, N).clone()
    slots = (needle == ord("#")).nonzero().flatten().view(-1, D)  # two groups of D positions
    for group in slots:
        needles[:, group] = digit_ids

    # Everything but the needle is the same constant text for every row, shifted by N after it.
    base = torch.cat([header, stream, question])  # [T - N - D]
    t = torch.arange(T - D)
    start = H + depth[:, None]  # [B, 1]
    in_needle = (t >= start) & (t < start + N)
    src = torch.where(t >= start + N, t - N, t).clamp(max=base.numel() - 1)
    body = torch.where(in_needle, needles.gather(1, (t - start).clamp(0, N - 1)), base[src])
    inputs = torch.cat([body, digit_ids], dim=1)

    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    targets[:, T - D - 1 : T - 1] = digit_ids
    batch = PasskeyBatch(inputs, targets)
    batch.answers = answers
    batch.answer_digits = digits
    return batch


def passkey_accuracy(logits_or_pred_ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose five key digits are all predicted right (see :func:`evaluate_answers`)."""
    return evaluate_answers(logits_or_pred_ids, targets)


# --------------------------------------------------------------------------------------------- copy
COPY_PAD = 0
COPY_SEP = 1


def copy_task(
    batch_size: int,
    *,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    segment_len: int | None = None,
) -> TaskBatch:
    """Copy: a random segment, a separator, the same segment again (scored), padding.

    Row layout: ``s1 .. sL SEP s1 .. sL PAD ..`` with ``L = segment_len`` (default
    ``(seq_len - 1) // 2``), content ids from ``[2, vocab_size)``, ``SEP = 1``, ``PAD = 0``.
    Scored: positions ``L .. 2L - 1`` (the separator and the copy, predicting the next copy token).

    Returns ``TaskBatch(inputs [B, T], targets [B, T])``.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 3)
    _check_int("vocab_size", vocab_size, 3)
    L = (seq_len - 1) // 2 if segment_len is None else segment_len
    _check_int("segment_len", L, 1)
    if 2 * L + 1 > seq_len:
        raise ValueError(f"segment_len: 2 * {L} + 1 does not fit in seq_len={seq_len}")
    B, T = batch_size, seq_len
    seg = torch.randint(2, vocab_size, (B, L), generator=generator)
    inputs = torch.full((B, T), COPY_PAD, dtype=torch.int64)
    inputs[:, :L] = seg
    inputs[:, L] = COPY_SEP
    inputs[:, L + 1 : 2 * L + 1] = seg
    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    targets[:, L : 2 * L] = seg
    return TaskBatch(inputs, targets)


# ------------------------------------------------------------------------------------- arithmetic
def arithmetic_min_len(max_digits: int) -> int:
    """Longest problem text for ``max_digits``: ``a*b=c`` with ``c`` up to ``2 * max_digits`` digits."""
    return 4 * max_digits + 2


def arithmetic(
    batch_size: int,
    *,
    max_digits: int,
    seq_len: int,
    generator: torch.Generator | None = None,
    ops: str = "+-*",
) -> TaskBatch:
    """Byte-level integer arithmetic ``"a+b=c"``, ``"a-b=c"``, ``"a*b=c"``, one problem per row.

    ``a`` and ``b`` have 1..``max_digits`` digits (digit count uniform, no leading zeros), the
    operator is uniform over ``ops``, and ``c`` is computed exactly with Python ints (so
    ``max_digits`` may exceed what int64 holds); a negative difference is written ``-123``. The
    row is padded with ``ByteTokenizer.PAD`` to ``seq_len``. Scored: the characters of ``c``
    (sign and digits), predicted from the position before each; padding and the question are
    ``IGNORE``.

    Args:
        max_digits: at least 1; ``seq_len`` must be ``>= 4 * max_digits + 2``.
        ops: any non-empty subset of ``"+-*"``.

    Returns:
        ``TaskBatch(inputs [B, T], targets [B, T])``.

    Example::

        x, y = arithmetic(64, max_digits=3, seq_len=16, generator=g)
        ByteTokenizer().decode(x[0])   # e.g. "417*25=10425"
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("max_digits", max_digits, 1)
    _check_int("seq_len", seq_len, 1)
    if seq_len < arithmetic_min_len(max_digits):
        raise ValueError(
            f"seq_len: {seq_len} is too short for {max_digits}-digit problems "
            f"(needs >= {arithmetic_min_len(max_digits)})"
        )
    if not ops or any(o not in "+-*" for o in ops):
        raise ValueError(f"ops: expected a non-empty subset of '+-*', got {ops!r}")
    B, T, M = batch_size, seq_len, max_digits
    # All randomness comes from torch so the generator fully determines the batch.
    n_digits = torch.randint(1, M + 1, (B, 2), generator=generator)
    raw = torch.randint(0, 10, (B, 2, M), generator=generator)
    lead = torch.randint(1, 10, (B, 2), generator=generator)
    op_idx = torch.randint(0, len(ops), (B,), generator=generator)

    inputs = torch.full((B, T), ByteTokenizer.PAD, dtype=torch.int64)
    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    # One Python step per problem (not per token): the answer needs exact big-int arithmetic.
    for i, (nd, dg, ld, o) in enumerate(zip(n_digits.tolist(), raw.tolist(), lead.tolist(), op_idx.tolist())):
        a, b = (int(str(ld[j] if nd[j] > 1 else dg[j][0]) + "".join(map(str, dg[j][1 : nd[j]]))) for j in (0, 1))
        op = ops[o]
        c = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"{a}{op}{b}=".encode()
        answer = str(c).encode()
        row = torch.tensor(list(question + answer), dtype=torch.int64)
        inputs[i, : row.numel()] = row
        q = len(question)
        targets[i, q - 1 : q - 1 + len(answer)] = row[q:]
    return TaskBatch(inputs, targets)


# ---------------------------------------------------------------------------------------- metrics
def evaluate_answers(pred_ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Exact-match accuracy: a row counts only if every scored position is right.

    Args:
        pred_ids: ``[B, T]`` predicted ids, or ``[B, T, V]`` logits (argmax is taken); position
            ``t`` is the prediction for ``targets[:, t]`` (i.e. the model output at ``t``).
        targets: ``[B, T]`` with ``IGNORE`` at unscored positions.

    Returns:
        Fraction in [0, 1] over the rows that have at least one scored position.
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2:
        raise ValueError(f"targets: expected a [B, T] tensor, got {getattr(targets, 'shape', type(targets))}")
    if not isinstance(pred_ids, torch.Tensor):
        raise ValueError(f"pred_ids: expected a tensor, got {type(pred_ids).__name__}")
    if pred_ids.ndim == 3 or pred_ids.is_floating_point():
        if pred_ids.ndim != 3:
            raise ValueError(f"pred_ids: logits must be [B, T, V], got shape {tuple(pred_ids.shape)}")
        pred_ids = pred_ids.argmax(dim=-1)
    if pred_ids.shape != targets.shape:
        raise ValueError(f"pred_ids: shape {tuple(pred_ids.shape)} does not match targets {tuple(targets.shape)}")
    scored = targets != IGNORE
    has_answer = scored.any(dim=1)
    if not bool(has_answer.any()):
        raise ValueError("targets: no scored positions (every entry is IGNORE = -100)")
    ok = ((pred_ids.to(targets.device) == targets) | ~scored).all(dim=1)
    return float(ok[has_answer].float().mean())
