"""Byte-level tokenizer: ids 0..255 are raw bytes, plus three special ids.

A byte vocabulary needs no training, no files and no downloads, and it is lossless on any byte
string, which keeps the built-in model and the synthetic tasks self-contained.
"""

from __future__ import annotations

from typing import Iterable


class ByteTokenizer:
    """Map UTF-8 text (or arbitrary bytes) to ids 0..255, with ``BOS``/``EOS``/``PAD`` above.

    Example::

        tok = ByteTokenizer()
        ids = tok.encode("héllo", bos=True, eos=True)   # [256, 104, 195, 169, 108, 108, 111, 257]
        tok.decode(ids)                                 # "héllo"
    """

    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids, optionally framed by ``BOS``/``EOS``."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.BOS)
        if eos:
            ids.append(self.EOS)
        return ids

    def encode_bytes(self, b: bytes) -> list[int]:
        """Raw bytes as ids (no special ids added)."""
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise ValueError(f"b: expected bytes, got {type(b).__name__}")
        return list(bytes(b))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids back to bytes; special ids (BOS/EOS/PAD) are dropped. Lossless for byte ids.

        ``ids`` may be a list of ints or a 1-D integer tensor.
        """
        if hasattr(ids, "tolist"):  # torch tensor / numpy array without importing either here
            ids = ids.tolist()
        ids = list(ids)
        try:
            return bytes(ids)  # fast path: only byte ids
        except (ValueError, TypeError):
            pass  # specials, out-of-range ids or non-ints: the checked loop below sorts them out
        out = bytearray()
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                try:
                    i = int(i)
                except (TypeError, ValueError):
                    raise ValueError(f"ids: expected a flat sequence of ints, found {i!r}") from None
            if 0 <= i < 256:
                out.append(i)
            elif not (self.BOS <= i < self.vocab_size):
                raise ValueError(f"ids: id {i} is out of range [0, {self.vocab_size})")
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; special ids are dropped and invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size
