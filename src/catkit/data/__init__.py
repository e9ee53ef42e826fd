"""Data: byte-level tokenizer, the built-in stdlib corpus, batching, synthetic tasks."""

from .batches import DocumentDataset, PackedDataset, varlen_batch
from .corpus import EXCLUDED_DIRS, load_corpus, split_files, split_of, stdlib_files, stdlib_root
from .synthetic import (
    IGNORE,
    PasskeyBatch,
    TaskBatch,
    arithmetic,
    arithmetic_min_len,
    copy_task,
    evaluate_answers,
    mqar,
    passkey,
    passkey_accuracy,
    passkey_min_len,
)
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "EXCLUDED_DIRS", "stdlib_root", "stdlib_files", "split_of", "split_files", "load_corpus",
    "PackedDataset", "DocumentDataset", "varlen_batch",
    "IGNORE", "TaskBatch", "PasskeyBatch", "mqar", "passkey", "passkey_min_len", "passkey_accuracy",
    "copy_task", "arithmetic", "arithmetic_min_len", "evaluate_answers",
]
