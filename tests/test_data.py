"""Data sources: windows, records, caps, sharding, and errors."""

from __future__ import annotations

import json

import pytest

from linearize import data
from linearize.errors import LinearizeError


def test_builtin_windows_have_fixed_length_and_cap(tokenizer):
    seqs = list(data.token_sequences(tokenizer, "builtin", 64, 1000))
    assert sum(map(len, seqs)) == 1000
    assert all(len(s) == 64 for s in seqs[:-1]) and len(seqs[-1]) == 1000 - 64 * 15


def test_builtin_calib_and_eval_are_disjoint():
    calib = set(data.iter_documents(data.resolve_source("builtin:calib")))
    held = set(data.iter_documents(data.resolve_source("builtin:eval")))
    assert calib and held and not calib & held
    # a tenth of the characters, not only of the topics (the long topics hold most of the text)
    share = sum(map(len, held)) / (sum(map(len, held)) + sum(map(len, calib)))
    assert 0.07 < share < 0.13


def test_text_file_and_directory(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha beta gamma " * 50)
    (tmp_path / "d" / "b.txt").write_text("delta epsilon " * 50)
    f = tmp_path / "one.txt"
    f.write_text("alpha beta gamma " * 50)
    from_file = list(data.token_sequences(tokenizer, str(f), 16))
    from_dir = list(data.token_sequences(tokenizer, str(tmp_path / "d"), 16))
    assert all(len(s) == 16 for s in from_file[:-1])
    assert sum(map(len, from_dir)) > sum(map(len, from_file))


def test_jsonl_records_are_never_packed(tokenizer, tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["one two", "three " * 40, "four"]))
    seqs = list(data.token_sequences(tokenizer, str(p), 20))
    assert len(seqs) == 3
    assert len(seqs[1]) == 20  # truncated, the rest is not carried into the next record
    assert seqs[2] == tokenizer("four", add_special_tokens=False)["input_ids"]


def test_jsonl_errors_name_the_line(tmp_path, tokenizer):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(LinearizeError, match=":2: not valid JSON"):
        list(data.token_sequences(tokenizer, str(p), 8))
    p.write_text('{"body": "no text field"}\n')
    with pytest.raises(LinearizeError, match="no 'text'"):
        list(data.token_sequences(tokenizer, str(p), 8))


def test_shards_partition_the_single_process_stream(tokenizer):
    whole = list(data.token_sequences(tokenizer, "builtin", 32, 700))
    shards = [list(data.token_sequences(tokenizer, "builtin", 32, 700, r, 3)) for r in range(3)]
    assert sorted(map(tuple, whole)) == sorted(tuple(s) for sh in shards for s in sh)


def test_bos_is_prepended_when_the_tokenizer_adds_one():
    class Tok:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": ([7] if add_special_tokens else []) + ids}

    seqs = list(data.token_sequences(Tok(), "builtin", 10, 30))
    assert all(s[0] == 7 for s in seqs) and all(len(s) == 10 for s in seqs)


def test_pad_batch_masks_padding():
    b = data.pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(LinearizeError, match="not found"):
        data.resolve_source(str(tmp_path / "nothing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LinearizeError, match="no .txt"):
        data.resolve_source(str(tmp_path / "empty"))
    assert data.resolve_source("wikitext:wikitext-2-raw-v1:test").kind == "hf"


def test_hub_style_source_reads_a_named_field(tmp_path):
    """NAME:CONFIG:SPLIT:FIELD (a local dataset directory stands in for a Hub name)."""
    pytest.importorskip("datasets")
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text(
        '{"textbook": "chapter one", "text": "x"}\n{"textbook": "two"}\n'
    )
    assert list(data._hf_documents(f"{ds}:::textbook")) == ["chapter one", "two"]
    with pytest.raises(LinearizeError, match="has no 'body' field"):
        list(data._hf_documents(f"{ds}:::body"))


def test_licenses_are_a_source_of_distinct_legal_texts(tmp_path, monkeypatch):
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "GPL-3").write_text("This program is free software.\n")
    (lic / "MIT").write_text("Permission is hereby granted.\n")
    (lic / "GPL").symlink_to(lic / "GPL-3")  # an alias, read once
    monkeypatch.setattr(data, "LICENSES_DIR", lic)
    docs = list(data.iter_documents(data.resolve_source("licenses")))
    assert docs == ["This program is free software.\n\n\n", "Permission is hereby granted.\n\n\n"]
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "none")
    with pytest.raises(LinearizeError, match="base-files"):
        data.resolve_source("licenses")
