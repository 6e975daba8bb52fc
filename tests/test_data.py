"""Data: tokenizers with exact byte counts, deterministic batches, shards, retrieval tasks."""
import json
import os
import time

import numpy as np
import pytest

from diffattn import data
from diffattn.data import DataError

ODD_BYTES = "naïve café — 東京 🙂\n\ttabs  and   spaces 123 4.5e6 x=y+1;".encode() + bytes([0xff, 0xfe, 0x80, 0])


# ---- tokenizers ---------------------------------------------------------------------------

def test_byte_tokenizer_is_identity_on_bytes():
    tok = data.ByteTokenizer()
    ids = tok.encode(ODD_BYTES)
    assert ids.tolist() == list(ODD_BYTES)
    assert tok.decode(ids) == ODD_BYTES
    assert tok.token_bytes.sum() == 256  # every token one byte


@pytest.fixture(scope="module")
def bpe():
    return data.BPETokenizer.train(data.pydoc_text()[:200_000], 400)


def test_bpe_round_trips_any_bytes(bpe):
    text = data.pydoc_text()[300_000:310_000]
    for sample in (text, ODD_BYTES, b"", b" "):
        assert bpe.decode(bpe.encode(sample)) == sample
    assert len(bpe.encode(text)) < 0.7 * len(text)  # merges actually compress prose


def test_bpe_token_byte_lengths_are_the_bytes_each_token_decodes_to(bpe):
    assert bpe.vocab_size == 400
    for i in range(bpe.vocab_size):
        assert bpe.token_bytes[i] == len(bpe.decode([i]))


def test_bpe_byte_count_of_an_encoding_is_the_text_length(bpe):
    # so bits per byte over BPE tokens divides by the true number of bytes
    for sample in (data.pydoc_text()[-20_000:], ODD_BYTES):
        assert int(bpe.token_bytes[bpe.encode(sample)].sum()) == len(sample)


def test_bpe_training_is_deterministic_and_saves(tmp_path, bpe):
    again = data.BPETokenizer.train(data.pydoc_text()[:200_000], 400)
    assert again.merges == bpe.merges
    (tmp_path / "tok.json").write_text(json.dumps(bpe.to_json()))
    loaded = data.load_tokenizer(tmp_path / "tok.json")
    assert loaded.merges == bpe.merges
    assert np.array_equal(loaded.token_bytes, bpe.token_bytes)


@pytest.mark.parametrize("spec", ["bpe", "bpe:100", "wordpiece", "bpe:x"])
def test_unknown_tokenizer_is_one_line_error(spec):
    with pytest.raises(DataError) as e:
        data.parse_tokenizer(spec)
    assert "\n" not in str(e.value)


# ---- text corpora and batches --------------------------------------------------------------

def test_builtin_pydoc_corpus_is_the_cpython_help_text():
    from pydoc_data.topics import topics

    raw = data.pydoc_text()
    assert len(raw) > 300_000
    assert raw.decode().startswith(topics[sorted(topics)[0]])
    d = data.load("builtin:pydoc")
    assert d.vocab_size == 256
    assert sum(map(len, d.train)) + sum(map(len, d.val)) == len(raw)
    assert abs(sum(map(len, d.val)) / len(raw) - data.VAL_FRACTION) < 1e-3


def test_builtin_stdlib_corpus_is_capped_python_source():
    raw = data.stdlib_text()
    assert 1 << 20 < len(raw) <= data.STDLIB_BYTES
    assert b"def " in raw and b"import " in raw


@pytest.fixture(scope="module")
def pydoc():
    return data.load("builtin:pydoc")


def test_train_batches_are_a_function_of_seed_and_step(pydoc):
    a = pydoc.train_batch(7, 4, 32, n_micro=3, seed=1)
    assert a.shape == (3, 4, 33) and a.dtype == np.int32
    assert np.array_equal(a, pydoc.train_batch(7, 4, 32, n_micro=3, seed=1))
    assert not np.array_equal(a, pydoc.train_batch(8, 4, 32, n_micro=3, seed=1))
    assert not np.array_equal(a, pydoc.train_batch(7, 4, 32, n_micro=3, seed=2))


def test_train_windows_are_contiguous_slices_of_the_train_split(pydoc):
    train = pydoc.train[0].tobytes()  # int32 stream: search for each row's bytes
    for row in pydoc.train_batch(3, 8, 48, seed=0)[0]:
        assert row.astype(np.int32).tobytes() in train


def test_val_windows_come_from_the_validation_split_only(pydoc):
    batches = pydoc.val_batches(4, 32, 3)
    assert len(batches) == 3
    val, train = pydoc.val[0].tobytes(), pydoc.train[0].tobytes()
    for tokens, mask in batches:
        assert mask is None and tokens.shape == (4, 33)
        for row in tokens:
            assert row.tobytes() in val
    assert np.array_equal(batches[0][0], pydoc.val_batches(4, 32, 3)[0][0])
    assert len(train) > 0


def test_text_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(b"alpha " * 200)
    (tmp_path / "b" / "c.md").write_bytes(b"gamma " * 200)
    (tmp_path / ".hidden").write_bytes(b"never read")
    d = data.load(str(tmp_path))
    text = data.ByteTokenizer().decode(np.concatenate(d.train + d.val))
    assert text == b"alpha " * 200 + b"\n\n" + b"gamma " * 200
    f = data.load(str(tmp_path / "a.txt"), "bpe:260")
    assert f.vocab_size == 260 and f.tokenizer.decode(np.concatenate(f.train + f.val)) == b"alpha " * 200


def test_missing_path_and_too_short_corpus_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load(str(tmp_path / "nope.txt"))
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    d = data.load(str(tmp_path / "short.txt"))
    with pytest.raises(DataError, match="fewer than one sequence") as e:
        d.check(64)
    assert "\n" not in str(e.value)
    d.check(8)


def test_vocab_size_smaller_than_the_data_is_an_error():
    with pytest.raises(DataError, match="beyond vocab_size"):
        data.load("builtin:pydoc", vocab_size=128)


# ---- token shards -------------------------------------------------------------------------

def test_shard_round_trip_uint16_and_uint32(tmp_path):
    small = np.arange(5000) % 300
    data.write_shard(tmp_path / "s16.bin", small, vocab_size=300)
    header = np.fromfile(tmp_path / "s16.bin", np.int32, 256)
    assert header[:4].tolist() == [20240520, 1, 5000, 300]
    assert os.path.getsize(tmp_path / "s16.bin") == 1024 + 2 * 5000
    tokens, vocab = data.read_shard(tmp_path / "s16.bin")
    assert tokens.dtype == np.uint16 and vocab == 300 and np.array_equal(tokens, small)
    big = np.array([0, 70000, 5, 123456])
    data.write_shard(tmp_path / "s32.bin", big)
    header = np.fromfile(tmp_path / "s32.bin", np.int32, 256)
    assert header[:3].tolist() == [20240801, 7, 4]
    tokens, _ = data.read_shard(tmp_path / "s32.bin")
    assert tokens.dtype == np.uint32 and np.array_equal(tokens, big)


def test_reads_a_modded_nanogpt_shard_written_by_hand(tmp_path):
    # the llm.c / modded-nanogpt writer: 256 int32 header (magic, version, count), uint16 tokens
    toks = (np.arange(3000) * 7919 % 50257).astype(np.uint16)
    header = np.zeros(256, np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(toks)
    with open(tmp_path / "fineweb_train_000001.bin", "wb") as f:
        f.write(header.tobytes())
        f.write(toks.tobytes())
    with open(tmp_path / "fineweb_val_000000.bin", "wb") as f:
        f.write(header.tobytes())
        f.write(toks.tobytes())
    d = data.load(str(tmp_path), vocab_size=50304)
    assert d.vocab_size == 50304 and d.token_bytes is None  # no tokenizer.json: no bpb
    assert len(d.train) == 1 and len(d.val) == 1  # split by file name
    row = d.train_batch(0, 1, 64)[0, 0]
    assert row.astype(np.uint16).tobytes() in toks.tobytes()


def test_shard_damage_is_a_one_line_error(tmp_path):
    data.write_shard(tmp_path / "ok.bin", np.arange(1000) % 256, vocab_size=256)
    raw = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="header says 1000 tokens"):
        data.read_shard(tmp_path / "trunc.bin")
    (tmp_path / "magic.bin").write_bytes(b"\x00" * 4 + raw[4:])
    with pytest.raises(DataError, match="not a token shard"):
        data.read_shard(tmp_path / "magic.bin")


def test_shard_token_beyond_its_stated_vocab_is_an_error(tmp_path):
    data.write_shard(tmp_path / "s.bin", np.array([1, 2, 300] * 100), vocab_size=256)
    with pytest.raises(DataError, match="token id 300 is beyond the vocabulary"):
        data.load(str(tmp_path / "s.bin"))


def test_shards_with_tokenizer_give_byte_lengths(tmp_path):
    tok = data.BPETokenizer.train(data.pydoc_text()[:50_000], 300)
    ids = tok.encode(data.pydoc_text()[:40_000])
    data.write_shard(tmp_path / "train.bin", ids, vocab_size=tok.vocab_size)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok.to_json()))
    d = data.load(str(tmp_path))
    assert d.vocab_size == 300
    assert int(d.token_bytes[np.concatenate(d.train + d.val)].sum()) == 40_000


# ---- synthetic retrieval tasks ------------------------------------------------------------

def test_recall_answers_are_the_values_bound_earlier():
    task = data.load("builtin:recall")
    tokens, mask = task.val_batches(4, 64, 1)[0]
    assert tokens.shape == (4, 65) and mask.shape == (4, 64) and mask.sum() == 4 * 16
    for row, m in zip(tokens, mask):
        keys = row[0:32:2]
        assert len(set(keys.tolist())) == len(keys)  # distinct keys: each has one value
        bound = dict(zip(row[0:32:2].tolist(), row[1:32:2].tolist()))
        for t in np.flatnonzero(m):
            assert row[t] in bound and row[t + 1] == bound[row[t]]
    a = task.train_batch(5, 2, 64, seed=3)
    assert np.array_equal(a, task.train_batch(5, 2, 64, seed=3))


def test_needle_answers_are_the_values_of_the_needles():
    task = data.load("builtin:needle")
    tokens, mask = task.val_batches(3, 96, 1)[0]
    assert mask.sum() == 3 * task.n_needles
    for row, m in zip(tokens, mask):
        at = np.flatnonzero(row == task.NEEDLE)
        assert len(at) == task.n_needles
        needles = {int(row[i + 1]): int(row[i + 2]) for i in at}
        for t in np.flatnonzero(m):
            assert row[t - 1] == task.QUERY and needles[int(row[t])] == row[t + 1]
        assert (row[:at[0]] < 128).all()  # haystack is ASCII prose


def test_tasks_reject_a_tokenizer_and_too_short_sequences():
    with pytest.raises(DataError):
        data.load("builtin:recall", "bpe:300")
    with pytest.raises(DataError):
        data.load("builtin:needle").check(10)
    with pytest.raises(DataError, match="unknown built-in"):
        data.load("builtin:shakespeare")


# ---- Hugging Face datasets (offline, on a local folder) ------------------------------------

def test_hf_streaming_on_a_local_dataset(tmp_path, monkeypatch):
    pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    docs = [f"document {i}: " + "words " * (20 + i) for i in range(40)]
    folder = tmp_path / "ds"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    d = data.load(f"hf:{folder}")
    got = data.ByteTokenizer().decode(np.concatenate(d.train + d.val))
    assert got == "\n\n".join(docs).encode()
    small = data.hf_text(str(folder), max_bytes=100)
    assert small == "\n\n".join(docs).encode()[:100]
    with pytest.raises(DataError, match="no column 'body'"):
        data.load(f"hf:{folder}", hf_column="body")


def test_hf_without_datasets_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install 'diffattn\\[hf\\]'"):
        data.load("hf:anything")


def test_hf_data_offline_fails_fast_with_one_line(monkeypatch):
    pytest.importorskip("datasets", reason="the hf extra is not installed (the check runs after its import)")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.time()
    with pytest.raises(data.DataError, match="unreachable") as e:
        data.load("hf:someone/some-dataset")
    # the failure guarded against is `datasets` retrying for ~30 s; 5 s is the bound
    assert time.time() - t0 < 5 and "\n" not in str(e.value)
