"""Text sources turned into token sequences and padded batches.

A source is one string, as on the command line:

- ``builtin``: Python's own pydoc topics (~460k characters of English, always installed);
  ``builtin:calib`` and ``builtin:eval`` are disjoint ~90% / ~10% splits of its characters
  by topic;
- ``fortunes``: English that is not code documentation, for out-of-domain evaluation: the
  non-technical files of Debian's ``fortunes`` package (literature, wisdom, people, law,
  science, …; BSD-licensed quotations and short prose), ~520k characters;
- ``licenses``: the licence texts of Debian's base-files (GPL, Apache, MPL, GFDL, …; ~270k
  characters of legal English), a second out-of-domain text;
- a text file, or a directory of ``.txt`` files (read in sorted order);
- a ``.jsonl`` file whose records have a ``text`` field;
- a Hugging Face dataset ``name[:config[:split]]`` (needs the ``datasets`` package; streamed).

Plain text (files, directories, builtin, HF datasets) is packed: the token stream of all
documents is cut into windows of ``seq_len``. A ``.jsonl`` record is one sequence on its own,
truncated at ``seq_len`` and never packed with its neighbours. When the tokenizer adds a BOS
token to ordinary text, every sequence starts with it, as the model saw text in training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from linearize.errors import LinearizeError, first_line

_CHUNK_CHARS = 1 << 20  # tokenise plain text a megabyte at a time, so huge files stream
# builtin:eval takes every 10th distinct pydoc topic in order of length, from the 5th: a tenth
# of the topics of every size, so ~10% of the characters (8 topics, 44.6k characters, 11,204
# SmolLM2 tokens on Python 3.11); every 10th in name order took only 2.3% of them
_EVAL_EVERY, _EVAL_FROM = 10, 4
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# The files of Debian's `fortunes` that are prose about the world, not about computers (no
# computers/linux/perl/debian, no ASCII art, no one-author collections).
FORTUNE_FILES = (
    "art",
    "education",
    "food",
    "humorists",
    "kids",
    "law",
    "literature",
    "love",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "people",
    "pets",
    "platitudes",
    "politics",
    "riddles",
    "science",
    "songs-poems",
    "sports",
    "wisdom",
    "work",
)


# Debian's licence texts (GPL, Apache, MPL, GFDL, …; ~270k characters of legal English), on
# every Debian system: a second out-of-domain text, of a genre neither code documentation nor
# the fortunes' prose, that no default was chosen on
LICENSES_DIR = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Source:
    """A resolved data source: ``kind`` is builtin | fortunes | licenses | text | dir | jsonl |
    hf."""

    spec: str
    kind: str
    path: Path | None = None
    split: str | None = None  # builtin: calib | eval | None (all)

    @property
    def packed(self) -> bool:
        return self.kind != "jsonl"


def resolve_source(spec: str) -> Source:
    """Turn a command-line data argument into a Source, or explain in one line why not."""
    spec = str(spec).strip()
    if spec in ("builtin", "builtin:calib", "builtin:eval"):
        split = spec.partition(":")[2] or None
        return Source(spec, "builtin", split=split)
    if spec in ("fortunes", "fortunes:calib", "fortunes:eval") and not Path(spec).exists():
        if not (FORTUNES_DIR / FORTUNE_FILES[0]).is_file():
            raise LinearizeError(
                f"data source '{spec}' needs Debian's fortunes package ({FORTUNES_DIR} is "
                "missing): apt-get install fortunes"
            )
        return Source(spec, "fortunes", FORTUNES_DIR, split=spec.partition(":")[2] or None)
    path = Path(spec).expanduser()
    if spec == "licenses" and not path.exists():
        if not _license_files():
            raise LinearizeError(
                f"data source 'licenses' needs {LICENSES_DIR} (Debian's base-files)"
            )
        return Source(spec, "licenses", LICENSES_DIR)
    if path.is_dir():
        if not any(path.rglob("*.txt")):
            raise LinearizeError(f"data directory '{spec}' has no .txt files")
        return Source(spec, "dir", path)
    if path.is_file():
        _check_text_file(path)
        return Source(spec, "jsonl" if path.suffix == ".jsonl" else "text", path)
    looks_like_path = spec.startswith((".", "/", "~")) or Path(spec).suffix in (
        ".txt",
        ".jsonl",
        ".json",
        ".md",
    )
    if looks_like_path or not spec:
        raise LinearizeError(f"data source '{spec}' not found")
    return Source(spec, "hf")


SELF = "self"  # calibration only: text sampled from the model itself (linearize.selfgen)


def calib_parts(spec: str) -> list[str]:
    """A calibration spec is one source or several joined by '+' (``builtin:calib+self``);
    checks every part and returns them."""
    spec = str(spec).strip()
    parts = [spec] if Path(spec).expanduser().exists() else [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise LinearizeError(f"empty part in calibration source '{spec}'")
    for p in parts:
        if p != SELF:
            resolve_source(p)
    return parts


def default_ood() -> str | None:
    """The out-of-domain evaluation source used by default: 'fortunes' when Debian's package
    is installed, else None (the report then says it was not measured)."""
    return "fortunes" if (FORTUNES_DIR / FORTUNE_FILES[0]).is_file() else None


def eval_sources(eval_data: str | None, ood_data: str | None) -> str | None:
    """Check the in-domain and out-of-domain evaluation sources before any work; returns the
    out-of-domain one ("default": ``default_ood()``; "" or None: not measured)."""
    ood = default_ood() if ood_data == "default" else (ood_data or None)
    for src in (eval_data, ood):
        if src:
            resolve_source(src)
    return ood


def _check_text_file(path: Path) -> None:
    """Refuse an empty, binary or non-UTF-8 file from its first 8 KB of text (leading blank
    lines skipped, however many)."""
    with path.open("rb") as f:
        head = f.read(8192)
        while head and not head.strip():  # blank so far: the first block holding text counts
            head = f.read(8192)
    if not head:
        raise LinearizeError(f"data file '{path}' is empty")
    if b"\x00" in head:
        raise LinearizeError(f"data file '{path}' is binary, not text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a cut multi-byte character at the end is fine
            raise LinearizeError(f"data file '{path}' is not UTF-8 text") from None


def _builtin_documents(split: str | None) -> Iterator[str]:
    from pydoc_data.topics import topics

    if split is None:
        yield from (topics[key] for key in sorted(topics))
        return
    names: dict[str, str] = {}  # one name per distinct text: 'if' and 'else' share theirs
    for key in sorted(topics):
        names.setdefault(topics[key], key)
    by_length = sorted(names, key=lambda t: (len(t), names[t]))
    held = set(by_length[_EVAL_FROM::_EVAL_EVERY])
    yield from (t for t in names if (split == "eval") == (t in held))


def _fortune_documents(root: Path, split: str | None) -> Iterator[str]:
    """One document per fortune file: its entries (separated by '%' lines) as paragraphs,
    indentation and attribution tabs flattened to ordinary prose layout. ``calib`` and
    ``eval`` are disjoint halves by file (so by topic): alternate files of the list."""
    for i, name in enumerate(FORTUNE_FILES):
        if split is not None and (split == "eval") != (i % 2 == 1):
            continue
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entries = (e.strip() for e in re.split(r"^%$", text, flags=re.MULTILINE))
        paras = ["\n".join(line.strip() for line in e.splitlines()) for e in entries if e]
        yield "\n\n".join(paras) + "\n\n"


def _license_files() -> list[Path]:
    """The distinct licence texts of Debian's base-files (symlinks such as GPL → GPL-3 left
    out), in name order."""
    if not LICENSES_DIR.is_dir():
        return []
    return sorted(p for p in LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink())


def _read_chunks(path: Path) -> Iterator[str]:
    """Yield a file's text in ~1 MB pieces split at line ends (a longer line at a space), so
    nothing huge is held or tokenised at once."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        carry = ""
        while True:
            block = f.read(_CHUNK_CHARS)
            if not block:
                break
            block = carry + block
            cut = block.rfind("\n") + 1
            if cut == 0:  # a line longer than a chunk: cut it at a space (or anywhere)
                cut = block.rfind(" ") + 1 or len(block)
            carry = block[cut:]
            yield block[:cut]
        if carry:
            yield carry


def _hf_documents(spec: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise LinearizeError(
            f"data source '{spec}' is neither a file nor a directory; to read it as a Hugging "
            "Face dataset install the 'datasets' package (pip install 'linearize[datasets]')"
        ) from None
    # NAME[:CONFIG[:SPLIT[:FIELD]]], e.g. "nampdn-ai/tiny-textbooks:::textbook"
    name, config, split, field = (spec.split(":") + [None, None, None])[:4]
    field = field or "text"
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for rec in ds:
            if field not in rec:
                raise LinearizeError(f"dataset '{spec}' has no '{field}' field")
            yield rec[field]
    except LinearizeError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs one line
        raise LinearizeError(f"cannot load dataset '{spec}': {first_line(e)}") from None


def iter_documents(source: Source) -> Iterator[str]:
    """The source's plain-text pieces, in a fixed order."""
    if source.kind == "builtin":
        yield from _builtin_documents(source.split)
    elif source.kind == "fortunes":
        yield from _fortune_documents(source.path, source.split)
    elif source.kind == "licenses":
        for p in _license_files():
            yield p.read_text(encoding="utf-8", errors="replace") + "\n\n"
    elif source.kind == "text":
        yield from _read_chunks(source.path)
    elif source.kind == "dir":
        for p in sorted(source.path.rglob("*.txt")):
            yield from _read_chunks(p)
            yield "\n\n"
    elif source.kind == "hf":
        yield from _hf_documents(source.spec)
    else:
        raise ValueError(f"{source.kind} sources are records, not documents")


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a
    JSON object is a one-line error naming it."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise LinearizeError(f"{path}:{lineno}: not UTF-8 text") from None
            except RecursionError:
                raise LinearizeError(f"{path}:{lineno}: JSON nested too deeply") from None
            except json.JSONDecodeError:
                raise LinearizeError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(rec, dict):
                raise LinearizeError(f"{path}:{lineno}: not a JSON object")
            yield lineno, rec


def iter_records(source: Source) -> Iterator[str]:
    """Texts of a .jsonl source, one per record; a broken line is a one-line error."""
    for lineno, rec in jsonl_records(source.path):
        if not isinstance(rec.get("text"), str):
            raise LinearizeError(f"{source.path}:{lineno}: record has no 'text' string")
        yield rec["text"]


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer puts BOS in front of ordinary text, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_head(tokenizer, text: str, need: int) -> list[int]:
    """The first ``need`` tokens of ``text`` (or all, if it has fewer), tokenising a growing
    prefix cut at a space instead of the whole text: a record that is one 20 MB line costs
    what its first tokens cost. The prefix ends well past the tokens kept, so they are the
    ones the whole text gives."""
    chars = 16 * need + 64
    while chars < len(text):
        cut = text.rfind(" ", 0, chars) + 1 or chars
        ids = _encode(tokenizer, text[:cut])
        if len(ids) >= need + 16:
            return ids[:need]
        chars *= 4
    return _encode(tokenizer, text)[:need]


def token_sequences(
    tokenizer,
    source: Source | str,
    seq_len: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[list[int]]:
    """Token sequences of at most ``seq_len`` tokens, ``max_tokens`` in all (across ranks).

    The global order of sequences is fixed; sequence j goes to rank j mod world_size, so a
    sharded run sees exactly the tokens of a single-process run.
    """
    if seq_len < 1:
        raise LinearizeError(f"--seq-len must be at least 1, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise LinearizeError(f"--tokens must be at least 1, got {max_tokens}")
    if isinstance(source, str):
        source = resolve_source(source)
    prefix = bos_prefix(tokenizer)
    if len(prefix) >= seq_len:
        prefix = []
    body = seq_len - len(prefix)

    def all_sequences() -> Iterator[list[int]]:
        if source.packed:
            buf: list[int] = []
            for doc in iter_documents(source):
                buf.extend(_encode(tokenizer, doc))
                start = 0
                while len(buf) - start >= body:
                    yield prefix + buf[start : start + body]
                    start += body
                del buf[:start]
            if buf:
                yield prefix + buf
        else:
            for text in iter_records(source):
                ids = prefix + _encode_head(tokenizer, text, body)
                if len(ids) > len(prefix):
                    yield ids

    used = 0
    for j, seq in enumerate(all_sequences()):
        if max_tokens is not None:
            seq = seq[: max_tokens - used]
        used += len(seq)
        if j % world_size == rank:
            yield seq
        if max_tokens is not None and used >= max_tokens:
            return


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sequence; attention_mask marks the real tokens."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(seqs: Iterable[list[int]], batch_size: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
    """Group sequences into padded batches of ``batch_size``."""
    if batch_size < 1:
        raise LinearizeError(f"--batch-size must be at least 1, got {batch_size}")
    group: list[list[int]] = []
    for s in seqs:
        group.append(s)
        if len(group) == batch_size:
            yield pad_batch(group, pad_id)
            group = []
    if group:
        yield pad_batch(group, pad_id)


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0
