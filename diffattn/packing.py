"""Document-aware batching (`--packing bos-best-fit`): BOS-aligned rows, best-fit packed from whole
documents.

    data = packing.for_run(data, train_config)     # random: data itself; bos-best-fit: PackedData

Documents are token arrays, each beginning with the BOS token; `Documents` holds the train and
validation lists and the BOS id. Where they come from:
- text corpora (builtin:pydoc one per help topic, builtin:stdlib one per .py file, a text file or
  folder one per file): split train/validation at the byte where random windows split the joined
  text (the last 10%; the document straddling that byte is cut there), each document tokenised on
  its own by the run's tokenizer. BOS is token 0, the NUL byte, which these texts never hold
  (checked); bits per byte count it as 0 bytes, since it is not text.
- token shards whose stream carries a BOS before every document (data.bos or the tokenizer's
  "bos"): `documents_from_stream` splits the stream before every BOS.

Packing. One epoch is every training document in an order shuffled by (data_seed, epoch). Rows of
L+1 tokens are filled one at a time from a window of the next WINDOW documents: the largest
document that fits the space left goes in whole; when none fits, the shortest is cropped to the
space left (its tail dropped) and the row is done. Every row begins with a BOS and holds no
padding; a document is cut only where no whole one fits, and the epoch's last, partial row is
dropped. The cropped share of the epoch's tokens, `crop_fraction`, is printed by `train` and held in
run.json's data entry. It depends on how document lengths compare with L: pydoc's topics (median
1.7 kB) at L=64 lose most of their text, at L=1024 far less.

Attention is not masked at document boundaries: every kernel here (fused Triton, SDPA, MLX's)
takes a causal mask only, so a token attends to the earlier documents of its row, and RoPE
positions run 0..L over the row. The BOS marks where a document starts, so the model can learn
to discount what precedes it.

Batches stay a function of (data_seed, step): step s takes rows s*B*n_micro onward of the
concatenated epochs. Validation rows pack the validation documents once, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffattn import data as data_mod
from diffattn.data import VAL_FRACTION, DataError

WINDOW = 256  # documents considered for each row
TEXT_BOS = 0  # the NUL byte: token 0 of the byte tokenizer and of every byte-level BPE


@dataclass
class Documents:
    train: list[np.ndarray]
    val: list[np.ndarray]
    bos: int


def documents_from_stream(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    """A token stream with a BOS before every document -> its documents (each from its BOS);
    tokens before the first BOS form a document of their own, given a BOS."""
    stream = np.asarray(stream)
    starts = np.flatnonzero(stream == bos)
    docs = [np.asarray(d, np.int32) for d in np.split(stream, starts) if len(d)]
    if docs and docs[0][0] != bos:
        docs[0] = np.concatenate([[bos], docs[0]]).astype(np.int32)
    return docs


def text_documents(name: str, raw_docs: list[bytes], tokenizer, limit: int | None = None) -> Documents:
    """Documents of a text corpus, split train/validation where data.py splits the joined text."""
    for i, d in enumerate(raw_docs):
        if bytes([TEXT_BOS]) in d:
            raise DataError(f"{name}: document {i} holds a NUL byte, the BOS of bos-best-fit packing")
    total = min(sum(len(d) + 2 for d in raw_docs) - 2, limit or float("inf"))
    cut, at = int(total * (1 - VAL_FRACTION)), 0
    train, val = [], []
    for d in raw_docs:
        d = d[:max(0, total - at)]
        before, after = d[:max(0, cut - at)], d[max(0, cut - at):]
        train += [before] if before else []
        val += [after] if after else []
        at += len(d) + 2
    encode = lambda b: np.concatenate([[TEXT_BOS], tokenizer.encode(b)]).astype(np.int32)  # noqa: E731
    return Documents([encode(d) for d in train], [encode(d) for d in val], TEXT_BOS)


def documents_for(data) -> Documents:
    """The documents behind a TokenData, from its source name (module docstring)."""
    name = data.name
    if getattr(data, "task", "lm") != "lm" or name.startswith("hf:"):
        raise DataError(f"--packing bos-best-fit packs documents of a text corpus or of BOS-carrying shards; "
                        f"{name} has none here")
    bos = getattr(data, "bos", None)
    if bos is None and data.tokenizer is not None:
        bos = data.tokenizer.to_json().get("bos")
    if "shards" in data.info:
        if bos is None:
            raise DataError(f"{name}: --packing bos-best-fit needs document starts, and these shards state no "
                            f"BOS token (a 'bos' id in their tokenizer.json)")
        return Documents([d for s in data.train for d in documents_from_stream(s, bos)],
                         [d for s in data.val for d in documents_from_stream(s, bos)], int(bos))
    if name == "builtin:pydoc":
        raw, limit = data_mod.pydoc_documents(), None
    elif name == "builtin:stdlib":
        raw, limit = data_mod.stdlib_documents(), data_mod.STDLIB_BYTES
    else:
        raw, limit = data_mod.text_documents(Path(name)), None
    return text_documents(name, raw, data.tokenizer or data_mod.ByteTokenizer(), limit)


def best_fit_rows(docs: list[np.ndarray], row_len: int, window: int = WINDOW) -> tuple[np.ndarray, int]:
    """Pack docs, in this order, into rows of row_len tokens (module docstring). Returns
    (rows (n, row_len) int32, tokens cropped: cut tails plus the dropped last partial row)."""
    rows, pending, cropped = [], [], 0
    nxt = 0
    row, space = [], row_len
    while True:
        while len(pending) < window and nxt < len(docs):
            pending.append(docs[nxt])
            nxt += 1
        if not pending:
            break
        fits = [i for i, d in enumerate(pending) if len(d) <= space]
        if fits:
            i = max(fits, key=lambda j: len(pending[j]))  # first of the longest: deterministic
            row.append(pending.pop(i))
            space -= len(row[-1])
        else:
            i = min(range(len(pending)), key=lambda j: len(pending[j]))
            d = pending.pop(i)
            row.append(d[:space])
            cropped += len(d) - space
            space = 0
        if space == 0:
            rows.append(np.concatenate(row))
            row, space = [], row_len
    cropped += sum(len(d) for d in row)  # the last row, not filled: dropped
    return np.asarray(rows, np.int32).reshape(-1, row_len), cropped


class PackedData:
    """A TokenData whose train and validation batches are best-fit packed rows of its documents
    (for one seq_len and data_seed, the run's); every other attribute is the TokenData's."""
    packing = "bos-best-fit"

    def __init__(self, base, seq_len: int, seed: int, docs: Documents | None = None):
        self.base, self.seq_len, self.seed = base, seq_len, seed
        self.docs = docs if docs is not None else documents_for(base)
        self.bos = self.docs.bos
        self.token_bytes = None
        if base.token_bytes is not None:  # the text's BOS is no text: 0 bytes
            self.token_bytes = np.array(base.token_bytes)
            if self.docs.bos == TEXT_BOS and "shards" not in base.info:
                self.token_bytes[TEXT_BOS] = 0
        self._epochs: list[np.ndarray] = []
        self._epoch_crop: list[float] = []
        self.val_rows, val_cropped = best_fit_rows(self.docs.val, seq_len + 1)
        self.val_crop_fraction = val_cropped / max(1, sum(map(len, self.docs.val)))

    def __getattr__(self, name):  # name, vocab_size, tokenizer, task, info, train, val: the base's
        return getattr(self.base, name)

    def _epoch(self, e: int) -> np.ndarray:
        while len(self._epochs) <= e:
            order = np.random.default_rng([self.seed, len(self._epochs), 0xB05]).permutation(len(self.docs.train))
            rows, cropped = best_fit_rows([self.docs.train[i] for i in order], self.seq_len + 1)
            if not len(rows):
                raise DataError(f"{self.name}: the training documents fill no row of seq_len+1={self.seq_len + 1}")
            self._epochs.append(rows)
            self._epoch_crop.append(cropped / sum(map(len, self.docs.train)))
        return self._epochs[e]

    @property
    def crop_fraction(self) -> float:
        """The share of the first epoch's training tokens cropped (later epochs differ slightly)."""
        self._epoch(0)
        return self._epoch_crop[0]

    def check(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise DataError(f"{self.name}: packed for seq_len={self.seq_len}, asked for {seq_len}")
        self._epoch(0)
        if not len(self.val_rows):
            raise DataError(f"{self.name}: the validation documents fill no row of seq_len+1={seq_len + 1}")

    def train_batch(self, step: int, batch_size: int, seq_len: int, n_micro: int = 1, seed: int = 0) -> np.ndarray:
        """(n_micro, B, seq_len+1): rows step*B*n_micro onward of the concatenated epochs."""
        if (seq_len, seed) != (self.seq_len, self.seed):
            raise DataError(f"{self.name}: packed for seq_len={self.seq_len}, data_seed={self.seed}; "
                            f"asked for {seq_len}, {seed}")
        need, start, e, out = n_micro * batch_size, step * n_micro * batch_size, 0, []
        while need:
            rows = self._epoch(e)
            if start >= len(rows):
                start -= len(rows)
            else:
                take = rows[start:start + need]
                out.append(take)
                need -= len(take)
                start = 0
            e += 1
        return np.concatenate(out).reshape(n_micro, batch_size, seq_len + 1)

    def val_batches(self, batch_size: int, seq_len: int, n_batches: int, seed: int = 0):
        """The first n_batches * B validation rows (fewer where the documents fill fewer)."""
        rows = self.val_rows[:batch_size * n_batches]
        return [(rows[i:i + batch_size], None) for i in range(0, len(rows), batch_size)]

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def describe(self) -> dict:
        return {**self.base.describe(), "packing": self.packing, "bos": self.bos,
                "documents": {"train": len(self.docs.train), "val": len(self.docs.val)},
                "crop_fraction": self.crop_fraction, "val_crop_fraction": self.val_crop_fraction,
                "rows_per_epoch": len(self._epoch(0)), "val_rows": len(self.val_rows),
                "document_mask": "none: attention is causal across the documents of a row"}


def for_run(data, tcfg):
    """The data a run of tcfg trains on: itself for packing "random", else PackedData. A
    PackedData packed for another seq_len or data_seed (a paired run's next seed) is repacked
    from the same documents, which are not tokenised again."""
    if tcfg.packing == "random":
        return data
    if isinstance(data, PackedData):
        if (data.seq_len, data.seed) == (tcfg.seq_len, tcfg.data_seed):
            return data
        return PackedData(data.base, tcfg.seq_len, tcfg.data_seed, data.docs)
    return PackedData(data, tcfg.seq_len, tcfg.data_seed)
