"""Data: corpora, tokenizers, token shards and deterministic batches, all in numpy.

A batch is a pure function of (data_seed, step), so both backends, both variants of a paired
run, and a resumed run see byte-identical token streams, and the "data position" of a run is
just its step count.

Sources (the `--data` argument):

    builtin:pydoc    English prose: CPython's own help texts, `pydoc_data/topics.py` (every
                     topic joined in sorted order; 466,273 bytes on CPython 3.11). Default.
    builtin:stdlib   Python source code: the standard library's `.py` files in sorted path order
                     (tests excluded), the first 8 MiB.
    builtin:recall   synthetic multi-query associative recall (accuracy on the recalled values)
    builtin:needle   synthetic needles in a haystack of pydoc prose (accuracy on the needles)
    PATH             a text file, or a folder of text files (read recursively, sorted, joined by
                     a blank line); a `.bin` file, or a folder holding `.bin` files, is read as
                     token shards (below)
    hf:NAME[:CONFIG] a Hugging Face dataset, streamed (needs `datasets`: the `hf` extra); NAME
                     may be a local folder of json/parquet/csv/txt files

Token shards use the llm.c / modded-nanogpt layout: a header of 256 int32 (magic, version,
token count, ...) then the tokens: magic 20240520 version 1 for uint16, magic 20240801 version 7
for uint32. `write_shard` also stores the vocabulary size in header[3] (0 = not stated; llm.c
ignores it). A `tokenizer.json` beside the shards supplies token byte lengths (for bpb).

Tokenizers: `byte` (vocab 256; bits per byte exact, bytes = tokens) and `bpe:N`, a byte-level
BPE with N tokens trained here on the training split. Every BPE token is a byte string, so its
byte length is exact and bpb = nats / (ln 2 * target bytes) stays exact too.

The train/validation split of a text corpus is by position: the last 10% is validation.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

SHARD_HEADER_INTS = 256
SHARD_FORMATS = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}  # magic -> (version, dtype)
VAL_FRACTION = 0.1
STDLIB_BYTES = 8 << 20
HF_MAX_BYTES = 16 << 20
HUB_PROBE_TIMEOUT_S = 3.0


class DataError(ValueError):
    """Data that cannot be read or does not fit the run (message is one line)."""


# ---- tokenizers ---------------------------------------------------------------------------

class ByteTokenizer:
    """Bytes are tokens: vocab 256, every token one byte."""
    name = "byte"
    vocab_size = 256

    def __init__(self):
        self.token_bytes = np.ones(256, np.int64)

    def encode(self, data: bytes | str) -> np.ndarray:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> bytes:
        return np.asarray(ids, np.uint8).tobytes()

    def to_json(self) -> dict:
        return {"type": "byte"}


# GPT-2-like pre-split on bytes: words, numbers, punctuation runs (each with one leading space),
# whitespace. The alternatives cover every byte, so the chunks concatenate to the input.
_CHUNK = re.compile(rb" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, id 256+i is merge i of two earlier ids."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(int(t) for t in m) for m in merges]
        self.vocab_size = 256 + len(self.merges)
        self.name = f"bpe:{self.vocab_size}"
        self.rank = {m: i for i, m in enumerate(self.merges)}
        pieces = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            if not (a < len(pieces) and b < len(pieces)):
                raise DataError(f"BPE merge ({a}, {b}) refers to a token not yet defined")
            pieces.append(pieces[a] + pieces[b])
        self.pieces = pieces
        self.token_bytes = np.array([len(p) for p in pieces], np.int64)
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def train(cls, data: bytes, vocab_size: int) -> "BPETokenizer":
        """Merge the most frequent adjacent pair (ties: the smallest pair) until vocab_size."""
        if vocab_size < 256:
            raise DataError(f"BPE vocab_size={vocab_size} must be at least 256 (the bytes)")
        freq = Counter(_CHUNK.findall(data))
        words = [list(w) for w in freq]
        counts = list(freq.values())
        pair_count: Counter = Counter()
        where = defaultdict(set)
        for wi, w in enumerate(words):
            for p in zip(w, w[1:]):
                pair_count[p] += counts[wi]
                where[p].add(wi)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < vocab_size - 256 and heap:
            negc, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -negc:
                continue  # stale entry
            if -negc < 2:
                break
            new = 256 + len(merges)
            merges.append(pair)
            touched = set()
            for wi in where.pop(pair):
                w, c = words[wi], counts[wi]
                merged = _merge(w, pair, new)
                if len(merged) == len(w):
                    continue
                for p in zip(w, w[1:]):
                    pair_count[p] -= c
                    touched.add(p)
                for p in zip(merged, merged[1:]):
                    pair_count[p] += c
                    where[p].add(wi)
                    touched.add(p)
                words[wi] = merged
            for p in touched:
                c = pair_count.get(p, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    pair_count.pop(p, None)
        return cls(merges)

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        ids = self._cache.get(chunk)
        if ids is None:
            ids = list(chunk)
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, len(self.rank)))
                if pair not in self.rank:
                    break
                ids = _merge(ids, pair, 256 + self.rank[pair])
            self._cache[chunk] = ids
        return ids

    def encode(self, data: bytes | str) -> np.ndarray:
        if isinstance(data, str):
            data = data.encode("utf-8")
        out = []
        for chunk in _CHUNK.findall(data):
            out.extend(self._encode_chunk(chunk))
        return np.array(out, np.int32)

    def decode(self, ids) -> bytes:
        return b"".join(self.pieces[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"type": "bpe", "merges": [list(m) for m in self.merges]}


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i, a, b = [], 0, pair[0], pair[1]
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenizer_from_json(obj: dict):
    kind = obj.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(obj["merges"])
    raise DataError(f"unknown tokenizer type {kind!r} (expected 'byte' or 'bpe')")


def load_tokenizer(path) -> ByteTokenizer | BPETokenizer:
    try:
        return tokenizer_from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable tokenizer file ({e})") from None


def parse_tokenizer(spec: str) -> tuple[str, int]:
    """'byte' -> ('byte', 256); 'bpe:N' -> ('bpe', N)."""
    if spec == "byte":
        return "byte", 256
    m = re.fullmatch(r"bpe:(\d+)", spec or "")
    if not m or int(m.group(1)) < 257:
        raise DataError(f"unknown tokenizer {spec!r}: expected 'byte' or 'bpe:N' with N > 256")
    return "bpe", int(m.group(1))


# ---- raw corpora --------------------------------------------------------------------------

# Each text corpus is a list of documents (what --packing bos-best-fit packs) joined by a blank line.
def pydoc_documents() -> list[bytes]:
    """One document per help topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[k].encode("utf-8") for k in sorted(topics)]


def pydoc_text() -> bytes:
    return b"\n\n".join(pydoc_documents())


def stdlib_documents(limit: int = STDLIB_BYTES) -> list[bytes]:
    """One document per .py file, in sorted path order, until `limit` bytes (joined) are read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if any(p in ("test", "tests", "site-packages", "idle_test") for p in rel):
            continue
        b = f.read_bytes()
        parts.append(b)
        size += len(b) + 2
        if size >= limit:
            break
    return parts


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def stdlib_text(limit: int = STDLIB_BYTES) -> bytes:
    return b"\n\n".join(stdlib_documents(limit))[:limit]


def text_documents(path: Path) -> list[bytes]:
    """A text file is one document; a folder, one per file (recursive, sorted, no dot-files)."""
    if path.is_file():
        return [_read_bytes(path)]
    try:
        files = [f for f in sorted(path.rglob("*")) if f.is_file()
                 and not any(p.startswith(".") for p in f.relative_to(path).parts)]
    except OSError as e:
        raise DataError(f"{e.filename or path}: cannot list ({e.strerror or e})") from None
    if not files:
        raise DataError(f"{path}: folder holds no files")
    return [_read_bytes(f) for f in files]


def read_text_path(path: Path) -> bytes:
    return b"\n\n".join(text_documents(path))


def hf_text(name: str, config: str | None = None, split: str = "train", column: str = "text",
            max_bytes: int = HF_MAX_BYTES) -> bytes:
    """Stream documents of a Hugging Face dataset (or a local folder of data files) until
    max_bytes; documents joined by a blank line."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs the `datasets` package, which is not installed: "
                        "pip install 'diffattn[hf]'") from None
    if int(datasets.__version__.split(".")[0]) < 4:  # before 4.0 a hub repo's loading script could run
        raise DataError(f"hf: data needs datasets>=4.0, which never runs a dataset's own code; this is "
                        f"{datasets.__version__}: pip install 'diffattn[hf]'")
    if not Path(name).exists():
        _check_hub_reachable(name)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        parts, size = [], 0
        for row in ds:
            if column not in row:
                raise DataError(f"hf:{name}: no column {column!r} (columns: {', '.join(row)})")
            b = str(row[column]).encode("utf-8")
            parts.append(b)
            size += len(b) + 2
            if size >= max_bytes:
                break
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (network, missing config, ...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"hf:{name}: cannot load ({msg})") from None
    if not parts:
        raise DataError(f"hf:{name}: split {split!r} holds no documents")
    return b"\n\n".join(parts)[:max_bytes]


def _check_hub_reachable(name: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> None:
    """One short request to the Hub before `datasets` is asked: offline, its retries take half a
    minute. In offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) the cache is used instead."""
    import urllib.error
    import urllib.request

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # the Hub answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"hf:{name}: the Hugging Face Hub ({endpoint}) is unreachable ({reason}); "
                        "set HF_HUB_OFFLINE=1 to read a cached copy") from None


# ---- token shards -------------------------------------------------------------------------

def write_shard(path, tokens: np.ndarray, vocab_size: int | None = None) -> None:
    """Write tokens as an llm.c-style shard (uint16 if every id fits, else uint32), atomically."""
    from diffattn.params import atomic_write

    tokens = np.asarray(tokens)
    top = int(tokens.max()) if tokens.size else 0
    magic = 20240520 if top < 1 << 16 and (vocab_size or 0) <= 1 << 16 else 20240801
    version, dtype = SHARD_FORMATS[magic]
    header = np.zeros(SHARD_HEADER_INTS, np.int32)
    header[:4] = magic, version, tokens.size, vocab_size or 0

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype).tobytes())

    atomic_write(path, write)


def read_shard(path) -> tuple[np.ndarray, int]:
    """A shard's tokens (memory-mapped) and its stated vocab size (0 if not stated)."""
    path = Path(path)
    try:
        header = np.fromfile(path, np.int32, SHARD_HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if header.size < SHARD_HEADER_INTS or int(header[0]) not in SHARD_FORMATS:
        raise DataError(f"{path}: not a token shard (expected a 256-int32 header with magic "
                        f"{' or '.join(map(str, SHARD_FORMATS))})")
    version, dtype = SHARD_FORMATS[int(header[0])]
    if int(header[1]) != version:
        raise DataError(f"{path}: shard version {int(header[1])}, expected {version} for magic {int(header[0])}")
    n = int(header[2])
    held = (path.stat().st_size - 4 * SHARD_HEADER_INTS) // np.dtype(dtype).itemsize
    if n < 0 or held != n:
        raise DataError(f"{path}: header says {n} tokens but the file holds {held}")
    try:
        tokens = np.memmap(path, dtype, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(n,))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return tokens, int(header[3])


def _is_shard(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int(np.frombuffer(head, np.int32)[0]) in SHARD_FORMATS


# ---- datasets -----------------------------------------------------------------------------

def _windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return np.asarray(stream[starts[:, None] + np.arange(length)], np.int32)


class TokenData:
    """Language-model data: token streams for train and validation, random windows for
    training and evenly spaced windows for validation."""
    task = "lm"

    def __init__(self, name: str, train: list[np.ndarray], val: list[np.ndarray], vocab_size: int,
                 token_bytes: np.ndarray | None, tokenizer=None, info: dict | None = None):
        self.name, self.train, self.val = name, train, val
        self.vocab_size, self.token_bytes, self.tokenizer = vocab_size, token_bytes, tokenizer
        self.info = info or {}

    def check(self, seq_len: int) -> None:
        need = seq_len + 1
        for split, streams in (("train", self.train), ("validation", self.val)):
            longest = max((len(s) for s in streams), default=0)
            if longest < need:
                raise DataError(f"{self.name}: the {split} split has {longest} tokens, fewer than one "
                                f"sequence of seq_len+1={need} (use a longer corpus or a shorter --seq-len)")

    def _draw(self, rng, streams, batch_size, length):
        sizes = np.array([max(len(s) - length + 1, 0) for s in streams], np.float64)
        which = rng.choice(len(streams), size=batch_size, p=sizes / sizes.sum()) if len(streams) > 1 \
            else np.zeros(batch_size, np.int64)
        out = np.empty((batch_size, length), np.int32)
        for k in np.unique(which):
            rows = np.flatnonzero(which == k)
            starts = rng.integers(0, sizes[k], size=rows.size)
            out[rows] = _windows(streams[k], starts, length)
        return out

    def train_batch(self, step: int, batch_size: int, seq_len: int, n_micro: int = 1, seed: int = 0) -> np.ndarray:
        """(n_micro, B, seq_len+1) int32, a function of (seed, step) only."""
        rng = np.random.default_rng([seed, step])
        return np.stack([self._draw(rng, self.train, batch_size, seq_len + 1) for _ in range(n_micro)])

    def val_batches(self, batch_size: int, seq_len: int, n_batches: int, seed: int = 0):
        """[(tokens (B, L+1), answer_mask None)]: windows evenly spaced over the validation split."""
        n = batch_size * n_batches
        per = [max(len(s) - seq_len, 0) for s in self.val]
        total = sum(per)
        picks = np.linspace(0, total - 1, n).astype(np.int64) if n > 1 else np.zeros(1, np.int64)
        bounds = np.cumsum([0] + per)
        rows = []
        for p in picks:
            k = int(np.searchsorted(bounds, p, side="right") - 1)
            rows.append(_windows(self.val[k], np.array([p - bounds[k]]), seq_len + 1)[0])
        rows = np.stack(rows)
        return [(rows[i * batch_size:(i + 1) * batch_size], None) for i in range(n_batches)]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.train + self.val:
            h.update(np.ascontiguousarray(s[:1 << 20]).tobytes())
            h.update(str(len(s)).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "vocab_size": self.vocab_size,
                "tokenizer": self.tokenizer.name if self.tokenizer else None,
                "train_tokens": int(sum(len(s) for s in self.train)),
                "val_tokens": int(sum(len(s) for s in self.val)),
                "fingerprint": self.fingerprint(), **self.info}


class RecallData:
    """Multi-query associative recall (byte vocab): a sequence lists key-value pairs, then asks
    for keys again; the answer is the value bound to each asked key earlier in the sequence.

        k1 v1 k2 v2 ... kn vn | ki vi kj vj ... | pad
    keys are tokens 64..127 (distinct within a sequence), values 128..255, pad 0. Accuracy is
    argmax-correct values in the query half; the loss is over all tokens, as in LM training."""
    task = "recall"
    vocab_size = 256
    KEYS, VALUES, PAD = (64, 128), (128, 256), 0

    def __init__(self):
        self.token_bytes = None  # synthetic symbols, not bytes of text: no bpb
        self.tokenizer = None
        self.name = "builtin:recall"

    def check(self, seq_len: int) -> None:
        if seq_len + 1 < 8:
            raise DataError(f"builtin:recall needs seq_len >= 7, got {seq_len}")

    def _make(self, rng, batch_size: int, length: int):
        n = min(length // 4, self.KEYS[1] - self.KEYS[0])
        toks = np.full((batch_size, length), self.PAD, np.int32)
        mask = np.zeros((batch_size, length - 1), bool)
        for b in range(batch_size):
            keys = self.KEYS[0] + rng.permutation(self.KEYS[1] - self.KEYS[0])[:n]
            vals = rng.integers(*self.VALUES, size=n)
            toks[b, 0:2 * n:2], toks[b, 1:2 * n:2] = keys, vals
            ask = rng.permutation(n)
            toks[b, 2 * n:4 * n:2], toks[b, 2 * n + 1:4 * n:2] = keys[ask], vals[ask]
            mask[b, 2 * n:4 * n:2] = True  # target index t predicts token t+1: the values
        return toks, mask

    def train_batch(self, step, batch_size, seq_len, n_micro=1, seed=0):
        rng = np.random.default_rng([seed, step])
        return np.stack([self._make(rng, batch_size, seq_len + 1)[0] for _ in range(n_micro)])

    def val_batches(self, batch_size, seq_len, n_batches, seed=0):
        rng = np.random.default_rng([seed, 1 << 40])  # never a train step's stream
        return [self._make(rng, batch_size, seq_len + 1) for _ in range(n_batches)]

    def describe(self):
        return {"name": self.name, "task": self.task, "vocab_size": self.vocab_size, "tokenizer": None,
                "keys": list(self.KEYS), "values": list(self.VALUES)}


class NeedleData(RecallData):
    """Needles in a haystack (byte vocab): pydoc prose (bytes >= 128 replaced by '?') with
    `n_needles` needles `1 key value` inserted at random places, then every needle asked for in
    random order at the end as `2 key value`. Keys 128..191, values 192..255. Accuracy is
    argmax-correct values after the `2 key` queries."""
    task = "needle"
    KEYS, VALUES = (128, 192), (192, 256)
    NEEDLE, QUERY = 1, 2

    def __init__(self, n_needles: int = 4):
        super().__init__()
        self.name, self.n_needles = "builtin:needle", n_needles
        hay = np.frombuffer(pydoc_text(), np.uint8).astype(np.int32)
        hay = np.where(hay >= 128, ord("?"), hay)
        cut = int(len(hay) * (1 - VAL_FRACTION))
        self.hay = {"train": hay[:cut], "val": hay[cut:]}

    def check(self, seq_len: int) -> None:
        if seq_len + 1 < 7 * self.n_needles:
            raise DataError(f"builtin:needle with {self.n_needles} needles needs seq_len >= "
                            f"{7 * self.n_needles - 1}, got {seq_len}")

    def _make(self, rng, batch_size, length, split="train"):
        k, hay = self.n_needles, self.hay[split]
        toks = np.empty((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length - 1), bool)
        body = length - 3 * k  # haystack with needles, then the queries
        for b in range(batch_size):
            keys = self.KEYS[0] + rng.permutation(self.KEYS[1] - self.KEYS[0])[:k]
            vals = rng.integers(*self.VALUES, size=k)
            start = rng.integers(0, len(hay) - body)
            row = list(hay[start:start + body - 3 * k])
            for at, key, val in sorted(zip(rng.choice(len(row) + 1, size=k, replace=False), keys, vals),
                                       reverse=True):
                row[at:at] = [self.NEEDLE, key, val]
            for j in rng.permutation(k):
                row += [self.QUERY, keys[j], vals[j]]
                mask[b, len(row) - 2] = True
            toks[b] = row
        return toks, mask

    def train_batch(self, step, batch_size, seq_len, n_micro=1, seed=0):
        rng = np.random.default_rng([seed, step])
        return np.stack([self._make(rng, batch_size, seq_len + 1)[0] for _ in range(n_micro)])

    def val_batches(self, batch_size, seq_len, n_batches, seed=0):
        rng = np.random.default_rng([seed, 1 << 40])
        return [self._make(rng, batch_size, seq_len + 1, "val") for _ in range(n_batches)]

    def describe(self):
        return {**super().describe(), "n_needles": self.n_needles}


# ---- loading ------------------------------------------------------------------------------

def _split(tokens: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    cut = int(len(tokens) * (1 - VAL_FRACTION))
    return [tokens[:cut]], [tokens[cut:]]


def _text_data(name: str, raw: bytes, tokenizer: str, tokenizer_file=None) -> TokenData:
    if not raw:
        raise DataError(f"{name}: empty corpus")
    kind, size = parse_tokenizer(tokenizer)
    cut = int(len(raw) * (1 - VAL_FRACTION))
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        tok = load_tokenizer(tokenizer_file)
        if tok.vocab_size != size:
            raise DataError(f"{tokenizer_file}: tokenizer has {tok.vocab_size} tokens, asked for {tokenizer!r}")
    elif kind == "bpe":
        tok = BPETokenizer.train(raw[:cut], size)  # trained on the training split only
    else:
        tok = ByteTokenizer()
    # split the bytes first so no token straddles train and validation
    train, val = tok.encode(raw[:cut]), tok.encode(raw[cut:])
    return TokenData(name, [train], [val], tok.vocab_size, tok.token_bytes, tok, {"bytes": len(raw)})


def _shard_data(name: str, files: list[Path], vocab_size: int | None) -> TokenData:
    loaded = [(f, *read_shard(f)) for f in files]
    stated = {v for _, _, v in loaded if v}
    if len(stated) > 1:
        raise DataError(f"{name}: shards state different vocab sizes {sorted(stated)}")
    top = max(int(t.max()) if len(t) else 0 for _, t, _ in loaded)
    vocab = vocab_size or (stated.pop() if stated else 64 * (top // 64 + 1))
    if top >= vocab:
        worst = next(f for f, t, _ in loaded if len(t) and int(t.max()) == top)
        raise DataError(f"{worst}: token id {top} is beyond the vocabulary (vocab_size {vocab})")
    val = [t for f, t, _ in loaded if "val" in f.name]
    train = [t for f, t, _ in loaded if "val" not in f.name]
    if not val or not train:
        train, val = [], []
        for _, t, _ in loaded:
            a, b = _split(t)
            train += a
            val += b
    tok_file = files[0].parent / "tokenizer.json"
    tok = load_tokenizer(tok_file) if tok_file.is_file() else None
    if tok is not None and tok.vocab_size > vocab:
        raise DataError(f"{tok_file}: tokenizer has {tok.vocab_size} tokens, beyond vocab_size {vocab}")
    token_bytes = None
    if tok is not None:
        token_bytes = np.zeros(vocab, np.int64)
        token_bytes[:tok.vocab_size] = tok.token_bytes
    return TokenData(name, train, val, vocab, token_bytes, tok, {"shards": [str(f) for f, _, _ in loaded]})


def load(spec: str = "builtin:pydoc", tokenizer: str = "byte", vocab_size: int | None = None,
         tokenizer_file=None, hf_split: str = "train", hf_column: str = "text",
         hf_max_bytes: int = HF_MAX_BYTES):
    """Open a data source (see the module docstring). `tokenizer_file`, when it exists, is a
    saved tokenizer to reuse (a resumed run reuses its own BPE instead of training it again)."""
    parse_tokenizer(tokenizer)
    if spec in ("builtin:recall", "builtin:needle"):
        if tokenizer != "byte":
            raise DataError(f"{spec} is a synthetic task over byte tokens; it takes no tokenizer {tokenizer!r}")
        data = RecallData() if spec == "builtin:recall" else NeedleData()
    elif spec == "builtin:pydoc":
        data = _text_data(spec, pydoc_text(), tokenizer, tokenizer_file)
    elif spec == "builtin:stdlib":
        data = _text_data(spec, stdlib_text(), tokenizer, tokenizer_file)
    elif spec.startswith("builtin:"):
        raise DataError(f"unknown built-in data {spec!r}, expected builtin:pydoc, builtin:stdlib, "
                        "builtin:recall or builtin:needle")
    elif spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        raw = hf_text(name, config or None, hf_split, hf_column, hf_max_bytes)
        data = _text_data(spec, raw, tokenizer, tokenizer_file)
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"{spec}: no such file or folder")
        shards = [path] if path.is_file() and (path.suffix == ".bin" or _is_shard(path)) else \
            sorted(path.rglob("*.bin")) if path.is_dir() else []
        if shards:
            if tokenizer != "byte":
                raise DataError(f"{spec}: token shards are already tokenized; drop --tokenizer {tokenizer!r}")
            data = _shard_data(spec, shards, vocab_size)
        else:
            data = _text_data(spec, read_text_path(path), tokenizer, tokenizer_file)
    if vocab_size is not None and data.vocab_size > vocab_size:
        raise DataError(f"{spec}: the data has token ids up to {data.vocab_size - 1}, beyond vocab_size {vocab_size}")
    return data

