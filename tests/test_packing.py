"""bos-best-fit packing (diffattn/packing.py): rows begin at a BOS, hold whole documents and at most
one cropped one at their end, the crop fraction is what the rows leave out, and batches stay a
function of (data_seed, step)."""
from collections import Counter

import numpy as np
import pytest

from diffattn import data, packing
from diffattn.config import TrainConfig
from diffattn.data import DataError

BOS = 0


def doc(n, tag):
    """A document of n tokens: BOS, then n - 1 copies of tag."""
    return np.array([BOS] + [tag] * (n - 1), np.int32)


def test_best_fit_places_the_largest_that_fits_and_crops_only_when_none_does():
    docs = [doc(6, 1), doc(4, 2), doc(3, 3), doc(12, 4), doc(5, 5)]
    rows, cropped = packing.best_fit_rows(docs, 10)
    # row 1: 6 (the largest that fits; 12 never does), then 4 fills it. Row 2: 5, then 3, then
    # 2 tokens left and only the 12 remains: cropped to 2, its 10 other tokens dropped.
    want = [np.concatenate([docs[0], docs[1]]), np.concatenate([docs[4], docs[2], docs[3][:2]])]
    np.testing.assert_array_equal(rows, np.stack(want))
    assert cropped == 10


def test_a_last_row_that_cannot_be_filled_is_dropped_and_counted():
    rows, cropped = packing.best_fit_rows([doc(4, 1), doc(3, 2)], 10)
    assert rows.shape == (0, 10) and cropped == 7


def segments(row):
    starts = np.flatnonzero(row == BOS)
    return np.split(row, starts[1:])


@pytest.fixture(scope="module")
def packed():
    base = data.load("builtin:pydoc")
    return packing.for_run(base, TrainConfig(seq_len=255, packing="bos-best-fit", data_seed=3))


def test_no_row_starts_or_resumes_inside_a_document(packed):
    """Every row begins with a BOS; split at its BOS tokens, each piece is a training document from
    its start: whole, except possibly the row's last piece (cropped). No document is used more
    often in an epoch than the corpus holds it (pydoc has two identical topics)."""
    docs = {d.tobytes(): d for d in packed.docs.train}
    held = Counter(d.tobytes() for d in packed.docs.train)
    assert all(d[0] == BOS and (d[1:] != BOS).all() for d in docs.values())  # NUL never occurs in text
    rows = packed._epoch(0)
    assert rows.shape[1] == 256 and (rows[:, 0] == BOS).all()
    used = []
    for row in rows:
        pieces = segments(row)
        for k, piece in enumerate(pieces):
            if k < len(pieces) - 1:
                assert piece.tobytes() in docs
                used.append(piece.tobytes())
            else:
                match = [d.tobytes() for d in docs.values() if len(d) >= len(piece) and (d[:len(piece)] == piece).all()]
                assert match, "a row's last piece is not the start of a document"
                used.append(next((m for m in match if used.count(m) < held[m]), match[0]))  # shared starts
    assert all(n <= held[d] for d, n in Counter(used).items())


def test_crop_fraction_is_the_share_of_document_tokens_left_out(packed):
    total = sum(map(len, packed.docs.train))
    rows = packed._epoch(0)
    assert packed.crop_fraction == pytest.approx(1 - rows.size / total, abs=1e-12)
    info = packed.describe()
    assert info["crop_fraction"] == packed.crop_fraction and info["packing"] == "bos-best-fit"
    assert 0 < info["crop_fraction"] < 1 and info["document_mask"].startswith("none")
    # bits per byte: the BOS is no text
    assert packed.token_bytes[BOS] == 0 and packed.token_bytes[ord("a")] == 1


def test_batches_are_a_function_of_seed_and_step(packed):
    a = packed.train_batch(7, 4, 255, 2, seed=3)
    assert a.shape == (2, 4, 256) and (a[..., 0] == BOS).all()
    np.testing.assert_array_equal(a, packed.train_batch(7, 4, 255, 2, seed=3))
    again = packing.for_run(data.load("builtin:pydoc"), TrainConfig(seq_len=255, packing="bos-best-fit", data_seed=3))
    np.testing.assert_array_equal(a, again.train_batch(7, 4, 255, 2, seed=3))
    # steps run on across epochs, each epoch in its own order
    n = len(packed._epoch(0))
    late = packed.train_batch(n, 1, 255, 1, seed=3)[0, 0]
    np.testing.assert_array_equal(late, packed._epoch(1)[0])
    with pytest.raises(DataError, match="packed for seq_len=255"):
        packed.train_batch(0, 4, 127, 1, seed=3)


def test_text_documents_split_where_random_windows_split(tmp_path):
    for i, text in enumerate([b"alpha " * 30, b"beta " * 20, b"gamma " * 10]):
        (tmp_path / f"{i}.txt").write_bytes(text)
    raw = data.read_text_path(tmp_path)
    cut = int(len(raw) * (1 - data.VAL_FRACTION))
    docs = packing.documents_for(data.load(str(tmp_path)))
    text = lambda ds: [data.ByteTokenizer().decode(d[1:]) for d in ds]  # noqa: E731
    assert b"\n\n".join(text(docs.train)) == raw[:cut]
    assert b"\n\n".join(text(docs.val)) == raw[cut:]


def test_sources_without_documents_are_one_line_errors(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"text with a \x00 byte")
    with pytest.raises(DataError, match="NUL byte"):
        packing.documents_for(data.load(str(tmp_path / "a.txt")))
    with pytest.raises(DataError, match="has none here"):
        packing.documents_for(data.load("builtin:recall"))
    data.write_shard(tmp_path / "train.bin", np.arange(200) % 50, vocab_size=64)
    with pytest.raises(DataError, match="state no BOS token"):
        packing.documents_for(data.load(str(tmp_path / "train.bin")))


def test_shards_split_before_every_bos():
    stream = np.array([5, 5, 9, 1, 2, 9, 3, 9, 4, 4, 4])
    docs = packing.documents_from_stream(stream, bos=9)
    assert [d.tolist() for d in docs] == [[9, 5, 5], [9, 1, 2], [9, 3], [9, 4, 4, 4]]


def test_a_packed_corpus_is_repacked_for_another_data_seed_from_the_same_documents():
    """A paired run's next seed (data_seed = seed) packs its own order without tokenising again.
    600 documents: more than WINDOW, so the order reaches the rows (with fewer, every row is
    chosen from all documents and the shuffle only breaks ties between equal lengths)."""
    rng = np.random.default_rng(0)
    docs = packing.Documents([doc(int(n), 1 + i % 200) for i, n in enumerate(rng.integers(20, 300, 600))],
                             [doc(100, 7)] * 4, BOS)
    base = data.load("builtin:pydoc")
    packed = packing.PackedData(base, 127, 3, docs)
    other = packing.for_run(packed, TrainConfig(seq_len=127, packing="bos-best-fit", data_seed=4))
    assert isinstance(other, packing.PackedData) and other.seed == 4 and other.docs is docs
    assert packing.for_run(packed, TrainConfig(seq_len=127, packing="bos-best-fit", data_seed=3)) is packed
    fresh = packing.PackedData(base, 127, 4, docs)
    np.testing.assert_array_equal(other.train_batch(0, 4, 127, 1, seed=4), fresh.train_batch(0, 4, 127, 1, seed=4))
    assert not np.array_equal(other.train_batch(0, 4, 127, 1, seed=4), packed.train_batch(0, 4, 127, 1, seed=3))
