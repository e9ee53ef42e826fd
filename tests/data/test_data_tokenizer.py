import random

import pytest
import torch

from catkit.data import ByteTokenizer


def test_special_ids():
    tok = ByteTokenizer()
    assert (tok.BOS, tok.EOS, tok.PAD, tok.vocab_size) == (256, 257, 258, 259)
    assert ByteTokenizer.vocab_size == len(tok) == 259


def test_bytes_round_trip_arbitrary(seed):
    rng = random.Random(seed)
    tok = ByteTokenizer()
    for n in (0, 1, 7, 1000):
        b = bytes(rng.randrange(256) for _ in range(n))
        ids = tok.encode_bytes(b)
        assert all(0 <= i < 256 for i in ids) and len(ids) == n
        assert tok.decode_bytes(ids) == b
        assert tok.decode_bytes(torch.tensor(ids, dtype=torch.int64)) == b
    # invalid UTF-8 survives the bytes path and is replaced (not raised) by the text path
    bad = b"\xff\xfe\xc3(\x80abc"
    assert tok.decode_bytes(tok.encode_bytes(bad)) == bad
    assert tok.decode(tok.encode_bytes(bad)) == bad.decode("utf-8", errors="replace")


def test_text_round_trip_unicode(seed):
    rng = random.Random(seed)
    tok = ByteTokenizer()
    for _ in range(20):
        # any code point except surrogates, which UTF-8 cannot encode
        chars = []
        for _ in range(rng.randrange(50)):
            cp = rng.randrange(0x110000)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randrange(0x110000)
            chars.append(chr(cp))
        s = "".join(chars)
        ids = tok.encode(s, bos=True, eos=True)
        assert ids[0] == tok.BOS and ids[-1] == tok.EOS
        assert ids[1:-1] == list(s.encode("utf-8"))
        assert tok.decode(ids) == s


def test_specials_dropped_and_errors():
    tok = ByteTokenizer()
    assert tok.decode([tok.BOS, 104, tok.PAD, 105, tok.EOS]) == "hi"
    assert tok.decode_bytes([tok.PAD, 0, 255]) == b"\x00\xff"
    for bad in ([259], [-1], [104, 1000]):
        with pytest.raises(ValueError, match="ids"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="ids"):
        tok.decode_bytes([[1, 2]])
    with pytest.raises(ValueError, match="text"):
        tok.encode(b"bytes")
