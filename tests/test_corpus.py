"""The offline corpus: text extraction, the document split, the tokenizer, and a whole build
from a small package made here with dpkg-deb (the same path the Debian packages take)."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from diffattn import corpus, data

pytest.importorskip("tokenizers", reason="the corpus build needs the `tokenizers` package (dev extra)")


def test_html_keeps_visible_text_and_drops_scripts_styles_and_navigation():
    page = ("<html><head><title>T</title><style>p{}</style></head><body><nav>Home | Next</nav>"
            "<h1>Locks</h1><p>A spin&nbsp;lock <b>never</b> sleeps.</p><script>var x;</script>"
            "<pre>int  x = 1;\nx++;</pre></body></html>")
    text = corpus._clean(corpus.html_text(page))
    assert "Locks" in text and "A spin lock never sleeps." in text
    assert "int  x = 1;\nx++;" in text  # preformatted text keeps its spacing
    assert "var x" not in text and "p{}" not in text and "Home" not in text
    assert "\xa0" not in text  # Unicode spaces become ASCII spaces


def test_man_page_requests_reduce_to_their_words():
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.B \\-a\ndo not ignore \\fIentries\\fR\n'
    text = corpus.man_text(page)
    assert "NAME" in text and "ls - list directory contents" in text
    assert "-a" in text and "do not ignore entries" in text
    assert "comment" not in text and "\\f" not in text


def test_pod_commands_and_formatting_codes_are_stripped():
    text = corpus.pod_text("=head1 NAME\n\nperlfunc - B<built-in> I<functions> C<< $x >>\n\n=cut\n")
    assert "NAME" in text and "perlfunc - built-in functions $x" in text and "=cut" not in text


def test_dictionaries_are_cut_into_documents_at_blank_lines():
    entries = "\n\n".join(f"word{i}\n  a definition of word {i}" for i in range(4000))
    docs = corpus._chunks(entries, limit=4096)
    assert len(docs) > 10 and all(len(d.encode()) <= 4096 for d in docs)
    assert "\n\n".join(docs) == entries  # nothing lost, nothing reordered


def test_held_out_documents_are_chosen_by_their_id_alone():
    ids = [f"pkg/doc{i}.html" for i in range(20000)]
    held = [i for i in ids if corpus.is_held_out(i)]
    assert held == [i for i in ids if corpus.is_held_out(i)]  # no state
    assert 0.006 < len(held) / len(ids) < 0.014  # 1% by construction, binomial spread at n=20000


def test_fast_bpe_gives_the_project_tokenizers_ids():
    raw = data.pydoc_text().decode("utf-8")
    docs = [corpus._clean(d) for d in raw.split("\n\n\n") if len(d) > 100]
    fast = corpus.FastBPE.train(docs, 600)
    assert fast.bpe.vocab_size == 600
    for text, ids in zip(docs, fast.encode_batch(docs)):
        np.testing.assert_array_equal(ids, fast.bpe.encode(text))
        assert fast.bpe.decode(ids) == text.encode("utf-8")  # byte-level: lossless


def test_pinned_sources_are_the_committed_manifests():
    """`diffattn corpus build` reads the packages, patterns and hashes from corpus.SOURCES; they
    must be the ones the committed corpus was built from, or a build from the .debs makes another
    corpus than the one the manifest (and every result on it) describes."""
    from pathlib import Path
    manifest = json.loads((Path(__file__).parent.parent / "benchmarks" / "corpus" / "debian-docs-en" /
                           "manifest.json").read_text())
    committed = [(s["package"], s["version"], s["sha256"], tuple(s["include"]), s["format"], tuple(s["exclude"]))
                 for s in manifest["sources"]]
    pinned = [(s.package, s.version, s.sha256, s.include, s.fmt, s.exclude) for s in corpus.SOURCES]
    assert pinned == committed
    assert all(len(s.sha256) == 64 for s in corpus.SOURCES)
    assert [corpus.deb_name(s) for s in corpus.SOURCES] == [s["deb"] for s in manifest["sources"]]


def _make_deb(tmp_path, package, version, files: dict[str, str]):
    root = tmp_path / "pkgroot" / package
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n")
    debs = tmp_path / "src" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    source = corpus.Source(package, version, "", ("usr/share/doc/*.html",), "html")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(debs / corpus.deb_name(source))],
                   check=True, capture_output=True)
    return source


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian's dpkg) to make a package")
def test_build_writes_shards_that_load_and_rebuild_byte_identical(tmp_path):
    words = data.pydoc_text().decode("utf-8").split()
    pages = {f"usr/share/doc/page{i:03d}.html": "<p>" + " ".join(words[i * 300:(i + 1) * 300]) + "</p>"
             for i in range(200)}
    assert len(words) > 200 * 300  # every page distinct and non-empty
    source = _make_deb(tmp_path, "testdoc", "1.0", pages)
    m1 = corpus.build(tmp_path / "src", tmp_path / "a", vocab_size=512, workers=1, log=lambda *_: None,
                      sources=(source,))
    m2 = corpus.build(tmp_path / "src", tmp_path / "b", vocab_size=512, workers=1, log=lambda *_: None,
                      sources=(source,))
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert m1["tokenizer_sha256"] == m2["tokenizer_sha256"]
    assert m1["splits"]["val"]["documents"] >= 1
    assert m1["sources"][0]["sha256"] and m1["sources"][0]["documents"] == 200
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1

    d = data.load(str(tmp_path / "a"))
    assert d.vocab_size == 512 and d.tokenizer.vocab_size == 512
    train, val = np.concatenate(d.train), np.concatenate(d.val)
    assert train[0] == corpus.BOS and val[0] == corpus.BOS
    # every document starts with BOS and decodes back to its extracted text
    n_docs = m1["splits"]["train"]["documents"] + m1["splits"]["val"]["documents"]
    assert int((train == corpus.BOS).sum() + (val == corpus.BOS).sum()) == n_docs == 200
    first = np.split(val, np.flatnonzero(val == corpus.BOS)[1:])[0][1:]
    assert d.tokenizer.decode(first).decode("utf-8").split()[:5] in \
        [p[3:-4].split()[:5] for p in pages.values()]


def test_build_refuses_a_folder_that_holds_shards(tmp_path):
    (tmp_path / "out").mkdir()
    data.write_shard(tmp_path / "out" / "train_000.bin", np.arange(10))
    with pytest.raises(data.DataError, match="already holds shards"):
        corpus.build(tmp_path / "src", tmp_path / "out")


def test_a_missing_package_is_named(tmp_path):
    with pytest.raises(data.DataError, match="missing; run `diffattn corpus fetch"):
        corpus.unpack(tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian's dpkg) to make a package")
def test_rebuild_from_saved_documents_gives_the_same_shards(tmp_path):
    words = data.pydoc_text().decode("utf-8").split()
    pages = {f"usr/share/doc/p{i:02d}.html": "<p>" + " ".join(words[i * 500:(i + 1) * 500]) + "</p>"
             for i in range(100)}
    source = _make_deb(tmp_path, "testdoc", "1.0", pages)
    docs = tmp_path / "documents.jsonl.xz"
    corpus.build(tmp_path / "src", tmp_path / "a", vocab_size=400, workers=1, log=lambda *_: None,
                 sources=(source,), save_documents=docs)
    rebuilt = corpus.rebuild(docs, tmp_path / "a" / "tokenizer.json", tmp_path / "b",
                             expect=tmp_path / "a" / "manifest.json", log=lambda *_: None)
    assert rebuilt["shards"] == json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"]
    # a tampered manifest is caught
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    m["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "bad.json").write_text(json.dumps(m))
    with pytest.raises(data.DataError, match="differ"):
        corpus.rebuild(docs, tmp_path / "a" / "tokenizer.json", tmp_path / "c", expect=tmp_path / "bad.json",
                       log=lambda *_: None)
