"""A real English corpus that needs no network: documentation and reference prose from Debian.

    diffattn corpus fetch --src SRC          apt-get download the pinned .deb files into SRC/debs
    diffattn corpus build --src SRC --out DIR [--vocab 8192]

What it is: the English documentation sets and dictionaries that Debian packages (the Linux
kernel's documentation, the Python, PostgreSQL, Django, SciPy, SQLite, Octave, Rust and Java
manuals, Perl's pod pages, the Linux man pages, the Debian handbook and policy, Git's manuals,
the GNU Collaborative International Dictionary of English, WordNet's glosses, FOLDOC, the Jargon
File, fortune cookies). It is technical English prose with code in it: the largest body of
natural-language text that the package registries this project can reach hold. Markup (HTML,
reST is kept as it is, roff, pod) is stripped to plain text.

Documents: one per source file (HTML page, reST file, man page, pod page); the single-file
dictionaries are cut at blank lines into documents of at most DOC_BYTES. Exact duplicates
(same extracted text) are kept once, the first in sorted order. The held-out split is by
document: a document is held out when the first 8 hex digits of sha256(its id) are 0 mod
VAL_MODULUS, so it never depends on file order or on what else is in the corpus.

Tokens: a byte-level BPE of this project's own kind (diffattn.data.BPETokenizer, vocabulary
8192 by default) trained once on a fixed sample of the training documents and saved as
tokenizer.json beside the shards. Token id 0 (the NUL byte, which extracted text never holds)
starts every document: it is the BOS marker document-aware packing aligns to. Shards are
llm.c-layout uint16 files, train_NNN.bin and val_000.bin, each a stream of whole documents.

Reproducible: every input .deb is pinned by name, version and sha256 in the manifest; extraction,
the sample and the tokenizer are deterministic, so a second build on the same inputs writes
byte-identical shards (manifest.json lists each shard's sha256).
"""
from __future__ import annotations

import gzip
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from fnmatch import fnmatch
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from diffattn import data
from diffattn.data import BPETokenizer, DataError, write_shard
from diffattn.params import file_sha256

DOC_BYTES = 64 << 10  # single-file dictionaries are cut into documents of at most this size
VAL_MODULUS = 100  # 1% of documents held out
BOS = 0  # the NUL byte token starts every document
SHARD_TOKENS = 32 << 20  # tokens per training shard (64 MiB as uint16)
TOKENIZER_SAMPLE_BYTES = 96 << 20  # training documents the BPE is learned from


@dataclass(frozen=True)
class Source:
    """One Debian package and the files of it that become documents, with their format."""
    package: str
    version: str
    sha256: str
    include: tuple[str, ...]  # fnmatch patterns relative to the package root
    fmt: str  # text | html | man | pod | dict | fortune
    exclude: tuple[str, ...] = ()


D = "usr/share/doc"
SOURCES: tuple[Source, ...] = (
    Source("linux-doc-6.12", "6.12.118-1~deb12u1", "57832c90306ded11cadafed9b6f639e54de7a392dfdacf32742d1a57fecdc8e1",
           (f"{D}/linux-doc-6.12/Documentation/*.rst.gz", f"{D}/linux-doc-6.12/Documentation/*.txt.gz"), "text",
           (f"{D}/linux-doc-6.12/Documentation/translations/*",)),
    Source("python3.11-doc", "3.11.2-6+deb12u9", "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
           (f"{D}/python3.11/html/_sources/*.txt",), "text"),
    Source("postgresql-doc-15", "15.20-0+deb12u1", "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7",
           (f"{D}/postgresql-doc-15/html/*.html",), "html"),
    Source("python-django-doc", "3:3.2.25-0+deb12u7", "87307f067916df72e17180d35b7cde5c7ea6080336cda518efd7f6e66988a7ca",
           (f"{D}/python-django-doc/html/*.html",), "html",
           (f"{D}/python-django-doc/html/_modules/*", f"{D}/python-django-doc/html/genindex*")),
    Source("python-scipy-doc", "1.10.1-2", "a237fdcef1675622f1a5d8a291c64feba140615130ee625554f94772d4ea3ad7",
           (f"{D}/python-scipy-doc/html/*.html",), "html",
           (f"{D}/python-scipy-doc/html/_modules/*", f"{D}/python-scipy-doc/html/genindex*")),
    Source("sqlite3-doc", "3.40.1-2+deb12u2", "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2",
           (f"{D}/sqlite3/*.html",), "html"),
    Source("octave-doc", "7.3.0-2", "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5",
           (f"{D}/octave/*.html",), "html"),
    Source("rust-doc", "1.63.0+dfsg1-2", "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b",
           (f"{D}/rust-doc/html/*.html",), "html"),
    Source("openjdk-17-doc", "17.0.21.1+2-1~deb12u1", "3e04db24dbcb31d598774973998f1d8212e3424e288befbfef235077325f841d",
           (f"{D}/openjdk-17-jre-headless/api/*.html",), "html",
           ("*-use.html", "*/class-use/*", "*index-files/*", "*-tree.html")),
    Source("sphinx-doc", "5.3.0-4", "1da3d08bb3a0bc82a4b8b8109410e223054bf5fb13904557ec8ea869046f65b4",
           (f"{D}/sphinx-doc/html/_sources/*.txt",), "text"),
    Source("debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
           (f"{D}/debian-handbook/html/en-US/*.html",), "html"),
    Source("debian-reference-en", "2.100", "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
           (f"{D}/debian-reference-en/*.html",), "html"),
    Source("debian-policy", "4.6.2.0", "ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39",
           (f"{D}/debian-policy/policy.txt.gz", f"{D}/debian-policy/*.txt"), "text"),
    Source("developers-reference", "12.18", "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e",
           (f"{D}/developers-reference/*.txt",), "text"),
    Source("git-doc", "1:2.39.5-0+deb12u3", "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
           (f"{D}/git-doc/*.txt",), "text"),
    Source("perl-doc", "5.36.0-7+deb12u4", "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8",
           ("usr/share/perl/*/pod/*.pod",), "pod"),
    Source("manpages", "6.03-2", "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91",
           ("usr/share/man/man*/*.gz",), "man"),
    Source("manpages-dev", "6.03-2", "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838",
           ("usr/share/man/man*/*.gz",), "man"),
    Source("bash-doc", "5.2.15-2", "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b",
           (f"{D}/bash/*.html",), "html"),
    Source("gnu-standards", "2022.03.23-0.1", "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201",
           (f"{D}/gnu-standards/*.text.gz",), "text"),
    Source("autoconf-doc", "2.71-3", "99f1cc643908a46068dc17bcbd64dbdcdbdb8c3f67058ae20e8d6b6b26fa7731",
           ("usr/share/info/*.info.gz",), "text"),
    Source("gimp-help-en", "2.10.34-2", "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36",
           ("usr/share/gimp/2.0/help/en/*.html",), "html"),
    Source("libreoffice-help-en-us", "4:7.4.7-1+deb12u14", "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
           ("usr/share/libreoffice/help/en-US/*.html",), "html"),
    Source("gnucash-docs", "4.13-1", "09979baf0ff8ddc1f9c39320c2c38ff606d6f4656e04742ff2dc51f2d562996f",
           (f"{D}/gnucash-docs/gnucash-guide-en/*.html", f"{D}/gnucash-docs/gnucash-help-en/*.html"), "html"),
    Source("qtbase5-doc-html", "5.15.8+dfsg-11+deb12u3", "e052497a7db970f002807e3543043c11e46135641b8284b0a419086ba64f5f47",
           ("usr/share/qt5/doc/*.html",), "html"),
    Source("erlang-doc", "1:25.2.3+dfsg-1+deb12u4", "7d172cecfdd9c2930b27c776ad226ffcc84670375cf830c79ee41c6944e8a1c8",
           (f"{D}/erlang-doc/lib/*/doc/html/*.html",), "html"),
    Source("maxima-doc", "5.46.0-11", "01a726b693a7e465a62040ac5ade4762194d7553524231d77cd1fcd4a69a75b9",
           (f"{D}/maxima-doc/html/*.html",), "html"),
    Source("cppreference-doc-en-html", "20170409-2", "603e9b7ef33d08b957e287b2b1f429f2338bccf75144f91b7c9e51d3cb6a14e2",
           ("usr/share/cppreference/doc/html/en/*.html",), "html"),
    Source("racket-doc", "8.7+dfsg1-1", "d50139b4bf806cd280bd18146ca2e7579cede5da23cc7f5c663044596af4e00f",
           (f"{D}/racket/*.html",), "html"),
    Source("vim-runtime", "2:9.0.1378-2+deb12u2", "6a3dd2317a593742cb247f3494d986b3127887dbe1449253b8efa6112289854e",
           ("usr/share/vim/vim90/doc/*.txt",), "text"),
    Source("nodejs-doc", "18.20.4+dfsg-1~deb12u3", "d2fbd4f3aecccea9d901a03842ef8380379e0d33010a48af5e797ed68ae874ce",
           (f"{D}/nodejs/api/*.html",), "html"),
    Source("cmake-doc", "3.25.1-1", "6e805a758ffed87cc7ea234cf0a7a1bb8ae78b93d8b5783e7fb989a6320f8133",
           (f"{D}/cmake-data/html/_sources/*.txt",), "text"),
    Source("zsh-doc", "5.9-4", "79bd75df4bf03d1021e993fd773f82b8a4c8d76649e420cd32eca940cf418ff4",
           (f"{D}/zsh-common/html/*.html",), "html"),
    Source("apache2-doc", "2.4.71-1~deb12u1", "a7b3d1131c1c63dbf9999b28e75f9a133d30f70492b419936bd51759ac77a01f",
           (f"{D}/apache2-doc/manual/en/*.html", f"{D}/apache2-doc/manual/*.html.en"), "html"),
    Source("freebsd-manpages", "12.2-1", "2d4a9606bd59d4c71e6d8355dee3d2624b0ebdab79d3ab5e9169ed7fbb0c197a",
           ("usr/share/man/man*/*.gz",), "man"),
    Source("debian-faq", "11.1", "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0",
           (f"{D}/debian/FAQ/*.html",), "html"),
    Source("dict-gcide", "0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
           ("usr/share/dictd/gcide.dict.dz",), "dict"),
    Source("dict-wn", "1:3.0-37", "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
           ("usr/share/dictd/wn.dict.dz",), "dict"),
    Source("dict-foldoc", "20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
           ("usr/share/dictd/foldoc.dict.dz",), "dict"),
    Source("dict-jargon", "4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
           ("usr/share/dictd/jargon.dict.dz",), "dict"),
    Source("fortunes", "1:1.99.1-7.3", "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
           ("usr/share/games/fortunes/*",), "fortune", ("*.dat", "*.u8", "*/off/*")),
)


# ---- text extraction ----------------------------------------------------------------------

class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: block tags become line breaks; scripts, styles and page
    furniture (nav, header, footer, the Sphinx sidebar) are dropped."""
    SKIP = {"script", "style", "nav", "header", "footer", "noscript", "svg", "head"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
             "table", "dt", "dd", "dl", "section", "blockquote", "hr", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        if tag in self.SKIP or "sphinxsidebar" in cls or "related" == cls:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(self.skip - 1, 0)
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre = max(self.pre - 1, 0)

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(raw: str) -> str:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    return "".join(p.parts)


_ROFF_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\[&|^%]|\\s[-+]?\d")


def man_text(raw: str) -> str:
    """A man page's words: requests dropped or reduced to their arguments, font escapes removed."""
    out = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            req, _, rest = line[1:].partition(" ")
            if req in ("SH", "SS"):
                out.append("\n" + rest.strip('"'))
            elif req in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "TP", "IP", "TQ"):
                if rest:
                    out.append(rest.replace('"', ""))
            elif req in ("PP", "LP", "P", "sp", "br"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    text = _ROFF_ESC.sub("", text)
    for a, b in ((r"\-", "-"), (r"\(em", "—"), (r"\(en", "–"), (r"\(aq", "'"), (r"\(dq", '"'),
                 (r"\(bu", "•"), (r"\e", "\\"), ("\\ ", " "), (r"\(co", "©")):
        text = text.replace(a, b)
    return text


_POD_CODE = re.compile(r"[BICFLSEXZ]<+\s*([^<>]*?)\s*>+")


def pod_text(raw: str) -> str:
    out = []
    for line in raw.splitlines():
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            if cmd.startswith(("=head", "=item")):
                out.append(rest)
            continue
        out.append(line)
    text = "\n".join(out)
    for _ in range(3):  # nested formatting codes, innermost first
        text = _POD_CODE.sub(r"\1", text)
    return text


def _chunks(text: str, limit: int = DOC_BYTES) -> list[str]:
    """Cut at blank lines into pieces of at most `limit` UTF-8 bytes (a longer paragraph is cut
    where it exceeds)."""
    pieces, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        b = len(para.encode("utf-8")) + 2
        if cur and size + b > limit:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += b
    if cur:
        pieces.append("\n\n".join(cur))
    return [p for p in pieces if p.strip()]


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


_ODD_SPACE = re.compile(r"[^\S \t\n\r\f\v]")  # Unicode whitespace beyond ASCII's six


def _clean(text: str) -> str:
    """Plain text with ASCII whitespace only (so the BPE pre-split reads the same on bytes and on
    str), no NUL (the BOS byte), no more than one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\x00", "")
    text = _ODD_SPACE.sub(" ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def extract(source: Source, path: Path) -> list[str]:
    """The documents one file of a source holds (usually one)."""
    raw = _read(path)
    if source.fmt == "html":
        docs = [html_text(raw)]
    elif source.fmt == "man":
        docs = [man_text(raw)]
    elif source.fmt == "pod":
        docs = [pod_text(raw)]
    elif source.fmt == "dict":
        docs = _chunks(raw)
    elif source.fmt == "fortune":
        docs = _chunks(raw.replace("\n%\n", "\n\n"))
    else:
        docs = [raw]
    return [d for d in (_clean(d) for d in docs) if len(d) > 64]


def source_files(source: Source, root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and any(fnmatch(rel, g) for g in source.include) \
                and not any(fnmatch(rel, g) for g in source.exclude):
            files.append(p)
    return files


def _extract_file(args):
    source, root, path = args
    rel = path.relative_to(root).as_posix()
    docs = extract(source, path)
    return [(f"{source.package}/{rel}" + (f"#{i}" if len(docs) > 1 else ""), d) for i, d in enumerate(docs)]


def is_held_out(doc_id: str) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % VAL_MODULUS == 0


# ---- fetch and build ----------------------------------------------------------------------

def deb_name(source: Source) -> str:
    return f"{source.package}_{source.version.replace(':', '%3a')}_all.deb"


def fetch(src: Path) -> list[Path]:
    """apt-get download each pinned package into src/debs (needs `apt-get update` once)."""
    debs = Path(src) / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [s for s in SOURCES if not (debs / deb_name(s)).is_file()]
    if missing:
        cmd = ["apt-get", "download", *[f"{s.package}={s.version}" for s in missing]]
        r = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
        if r.returncode:
            raise DataError(f"apt-get download failed: {r.stderr.strip().splitlines()[-1:]}")
    return [debs / deb_name(s) for s in SOURCES]


def unpack(src: Path, sources: tuple[Source, ...] = SOURCES) -> dict[str, dict]:
    """dpkg -x every pinned .deb into src/x/PACKAGE; returns {package: {deb, sha256}}."""
    src = Path(src)
    out = {}
    for s in sources:
        deb = src / "debs" / deb_name(s)
        if not deb.is_file():
            raise DataError(f"{deb}: missing; run `diffattn corpus fetch --src {src}` first")
        digest = file_sha256(deb)
        if s.sha256 and digest != s.sha256:
            raise DataError(f"{deb}: sha256 {digest[:16]}... differs from the pinned {s.sha256[:16]}...")
        root = src / "x" / s.package
        if not root.is_dir():  # unpacked beside, then renamed: a killed unpack leaves no half tree
            tmp = root.with_name(root.name + ".unpacking")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True, capture_output=True)
            tmp.rename(root)
        out[s.package] = {"deb": deb.name, "version": s.version, "sha256": digest}
    return out


def collect_documents(src: Path, workers: int | None = None,
                      sources: tuple[Source, ...] = SOURCES) -> list[tuple[str, str]]:
    """(doc_id, text) for every document, sorted by id, exact duplicates dropped."""
    src = Path(src)
    jobs = []
    for s in sources:
        root = src / "x" / s.package
        jobs += [(s, root, p) for p in source_files(s, root)]
    with Pool(workers or os.cpu_count()) as pool:
        docs = [d for part in pool.imap(_extract_file, jobs, chunksize=16) for d in part]
    docs.sort(key=lambda d: d[0])
    seen, unique = set(), []
    for doc_id, text in docs:
        h = hashlib.sha256(text.encode("utf-8")).digest()
        if h not in seen:
            seen.add(h)
            unique.append((doc_id, text))
    return unique


# ---- the tokenizer ------------------------------------------------------------------------
# The BPE is this project's own (diffattn.data.BPETokenizer: its pre-split regex, byte ids 0..255,
# merge i is id 256+i); Hugging Face `tokenizers` learns and applies it fast. Both read the same
# chunks (the corpus holds ASCII whitespace only) and merge by rank, so they give the same ids;
# build() checks that on a sample of documents and refuses to write shards if they differ.

def _byte_chars() -> list[str]:
    """The printable character ByteLevel BPE stands for each byte (GPT-2's bytes-to-unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("building the corpus needs Hugging Face `tokenizers`: pip install tokenizers") from None
    return tokenizers


def _hf_pre_tokenizer():
    tk = _hf_tokenizers()
    from diffattn.data import _CHUNK
    return tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_CHUNK.pattern.decode()), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class FastBPE:
    """A BPETokenizer learned and applied by Hugging Face `tokenizers`, ids in the project's
    numbering (`lut` maps the library's ids to them)."""

    def __init__(self, hf, bpe: BPETokenizer, lut: np.ndarray):
        self.hf, self.bpe, self.lut = hf, bpe, lut

    @classmethod
    def train(cls, texts, vocab_size: int) -> "FastBPE":
        tk = _hf_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = _hf_pre_tokenizer()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], min_frequency=2,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        hf.train_from_iterator(texts, trainer)
        model = json.loads(hf.to_str())["model"]
        to_byte = {c: b for b, c in enumerate(_byte_chars())}
        piece_id = {bytes([b]): b for b in range(256)}
        merges = []
        for m in model["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            pa, pb = (bytes(to_byte[c] for c in x) for x in (a, b))
            merges.append((piece_id[pa], piece_id[pb]))
            piece_id[pa + pb] = 255 + len(merges)
        lut = np.zeros(len(model["vocab"]), np.int64)
        for token, hf_id in model["vocab"].items():
            lut[hf_id] = piece_id[bytes(to_byte[c] for c in token)]
        return cls(hf, BPETokenizer(merges), lut)

    @classmethod
    def from_bpe(cls, bpe: BPETokenizer) -> "FastBPE":
        """The library's tokenizer for a saved BPETokenizer (ids equal, lut the identity)."""
        tk = _hf_tokenizers()
        chars = _byte_chars()
        text = ["".join(chars[b] for b in piece) for piece in bpe.pieces]
        vocab = {t: i for i, t in enumerate(text)}
        hf = tk.Tokenizer(tk.models.BPE(vocab, [(text[a], text[b]) for a, b in bpe.merges]))
        hf.pre_tokenizer = _hf_pre_tokenizer()
        return cls(hf, bpe, np.arange(bpe.vocab_size, dtype=np.int64))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.lut[np.asarray(e.ids, np.int64)] for e in self.hf.encode_batch(texts)]


def build(src: Path, out: Path, vocab_size: int = 8192, workers: int | None = None, log=print,
          sources: tuple[Source, ...] = SOURCES, save_documents: Path | None = None) -> dict:
    """Unpack, extract, split by document, train the BPE, write shards and manifest.json.
    `save_documents` also writes the extracted documents (documents.jsonl.xz), from which
    `rebuild` makes the same shards on a machine without the packages."""
    src, out = Path(src), Path(out)
    _check_out(out)
    debs = unpack(src, sources)
    docs = collect_documents(src, workers, sources)
    if save_documents is not None:
        write_documents(save_documents, docs)
    train = [(i, t) for i, t in docs if not is_held_out(i)]
    log(f"{len(docs):,} documents ({len(train):,} train, {len(docs) - len(train):,} held out), "
        f"{sum(len(t.encode()) for _, t in docs) / 1e6:.1f} MB of text")
    # the tokenizer sample: every k-th training document, k fixed by the sample size wanted
    total = sum(len(t.encode()) for _, t in train)
    every = max(1, total // TOKENIZER_SAMPLE_BYTES)
    sample = [t for _, t in train[::every]]
    sample_bytes = sum(len(t.encode()) for t in sample)
    log(f"training BPE {vocab_size} on {sample_bytes / 1e6:.1f} MB (every {every}th training document)")
    fast = FastBPE.train(sample, vocab_size)
    manifest = {
        "name": "debian-docs-en", "tokenizer": f"bpe:{vocab_size}", "bos": BOS,
        "val_rule": f"sha256(doc_id)[:8] % {VAL_MODULUS} == 0", "doc_bytes_max_for_dicts": DOC_BYTES,
        "tokenizer_sample": {"every": every, "bytes": sample_bytes},
        "sources": [{"package": s.package, **debs[s.package], "include": list(s.include),
                     "exclude": list(s.exclude), "format": s.fmt,
                     "documents": sum(1 for i, _ in docs if i.startswith(s.package + "/"))} for s in sources],
    }
    return _write_shards(out, docs, fast, manifest, log)


def rebuild(documents: Path, tokenizer: Path, out: Path, expect: Path | None = None, log=print) -> dict:
    """The shards of a saved documents file and tokenizer (no packages, no training); with
    `expect` (the original manifest.json) every shard's sha256 must equal the original's."""
    out = Path(out)
    _check_out(out)
    docs = read_documents(documents)
    tok = data.load_tokenizer(tokenizer)
    if not isinstance(tok, BPETokenizer):
        raise DataError(f"{tokenizer}: not a BPE tokenizer")
    manifest = json.loads(Path(expect).read_text()) if expect else {"name": "debian-docs-en"}
    keep = {k: manifest[k] for k in ("name", "tokenizer", "bos", "val_rule", "doc_bytes_max_for_dicts",
                                     "tokenizer_sample", "sources") if k in manifest}
    built = _write_shards(out, docs, FastBPE.from_bpe(tok), keep, log)
    if expect:
        want = [(x["file"], x["sha256"]) for x in manifest["shards"]]
        got = [(x["file"], x["sha256"]) for x in built["shards"]]
        if want != got or built["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
            raise DataError(f"rebuilt shards differ from {expect}: "
                            f"{next((w for w, g in zip(want, got) if w != g), 'tokenizer or shard count')}")
        log(f"all {len(got)} shards byte-identical to {expect}")
    return built


def _check_out(out: Path) -> None:
    if out.exists() and any(out.glob("*.bin")):
        raise DataError(f"--out {out}: already holds shards; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)


def _write_shards(out: Path, docs: list[tuple[str, str]], fast: "FastBPE", manifest: dict, log) -> dict:
    vocab_size = fast.bpe.vocab_size
    check = [t for _, t in docs[::max(1, len(docs) // 64)]][:64]
    for text, ids in zip(check, fast.encode_batch(check)):
        if not np.array_equal(ids, fast.bpe.encode(text)):
            raise DataError("the fast BPE and diffattn.data.BPETokenizer disagree on a document; no shards written")
    (out / "tokenizer.json").write_text(json.dumps(fast.bpe.to_json()))
    shards, stats = [], {}
    for split in ("train", "val"):
        part = [(i, t) for i, t in docs if is_held_out(i) == (split == "val")]
        buf, n_buf, index, n_tok, n_bytes = [], 0, 0, 0, 0
        for lo in range(0, len(part), 512):
            texts = [t for _, t in part[lo:lo + 512]]
            for text, ids in zip(texts, fast.encode_batch(texts)):
                buf.append(np.concatenate([[BOS], ids]).astype(np.uint16))
                n_buf += len(ids) + 1
                n_tok += len(ids) + 1
                n_bytes += len(text.encode("utf-8"))
                if split == "train" and n_buf >= SHARD_TOKENS:
                    shards.append(_flush(out, split, index, buf, vocab_size))
                    buf, n_buf, index = [], 0, index + 1
        if buf:
            shards.append(_flush(out, split, index, buf, vocab_size))
        stats[split] = {"documents": len(part), "tokens": n_tok, "bytes": n_bytes,
                        "bytes_per_token": n_bytes / max(n_tok - len(part), 1)}
        log(f"{split}: {len(part):,} documents, {n_tok / 1e6:.1f}M tokens, {n_bytes / 1e6:.1f} MB")
    manifest = {**manifest, "tokenizer": f"bpe:{vocab_size}", "splits": stats, "shards": shards,
                "tokenizer_sha256": file_sha256(out / "tokenizer.json")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_documents(path: Path, docs: list[tuple[str, str]]) -> None:
    """One JSON object {"id", "text"} a line, xz-compressed."""
    import lzma

    tmp = Path(str(path) + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=6) as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_documents(path: Path) -> list[tuple[str, str]]:
    import lzma

    try:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return [(d["id"], d["text"]) for d in map(json.loads, f)]
    except (OSError, lzma.LZMAError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable documents file ({e})") from None


def _flush(out: Path, split: str, index: int, buf: list, vocab_size: int) -> dict:
    path = out / f"{split}_{index:03d}.bin"
    tokens = np.concatenate(buf)
    write_shard(path, tokens, vocab_size)
    return {"file": path.name, "tokens": int(tokens.size), "sha256": file_sha256(path)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="diffattn corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="apt-get download the pinned packages into SRC/debs")
    f.add_argument("--src", required=True)
    b = sub.add_parser("build", help="extract, split by document, train the BPE, write shards + manifest")
    b.add_argument("--src", required=True, help="the folder `fetch` filled")
    b.add_argument("--out", required=True, help="an empty folder for the shards")
    b.add_argument("--vocab", type=int, default=8192)
    b.add_argument("--workers", type=int, default=None)
    b.add_argument("--save-documents", default=None, help="also write the documents (jsonl.xz) for `rebuild`")
    r = sub.add_parser("rebuild", help="the same shards from a documents file and tokenizer (no packages)")
    r.add_argument("--documents", required=True)
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--expect", default=None, help="the original manifest.json: shards must be byte-identical")
    args = ap.parse_args(argv)
    try:
        if args.command == "fetch":
            debs = fetch(Path(args.src))
            print(f"{len(debs)} packages in {Path(args.src) / 'debs'}")
        else:
            m = build(Path(args.src), Path(args.out), args.vocab, args.workers,
                      save_documents=args.save_documents) if args.command == "build" else \
                rebuild(Path(args.documents), Path(args.tokenizer), Path(args.out),
                        Path(args.expect) if args.expect else None)
            print(f"wrote {len(m['shards'])} shards, {m['splits']['train']['tokens']:,} training and "
                  f"{m['splits']['val']['tokens']:,} held-out tokens, to {args.out} (manifest.json)")
    except (DataError, OSError, subprocess.CalledProcessError) as e:
        print(f"diffattn corpus {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
