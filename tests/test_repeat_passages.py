import json

import pytest

from train_mla.repeat_passages import main, opening_words, repeat_documents


def _texts(n, words=60):
    return [" ".join(f"d{i}w{k}" + ("\n\n" if k % 25 == 24 else "") for k in range(words)) for i in range(n)]


def test_opening_words_keeps_the_spacing_and_counts_words():
    assert opening_words("a b\n\nc  d e", 3) == "a b\n\nc"
    assert opening_words("  a b ", 2) == "a b"
    assert opening_words("a b", 3) is None


def test_every_document_repeats_its_passage_after_a_gap_from_another_row():
    texts = _texts(30)
    rows = repeat_documents(texts, documents=10, passage_words=12, gap_words=(5, 40), seed=1)
    assert len(rows) == 10 and rows == repeat_documents(texts, 10, 12, (5, 40), seed=1)
    passages = set()
    for text in rows:
        words = text.split()
        first = words[:12]
        assert words[-12:] == first  # the same passage at both ends
        source = first[0].split("w")[0]
        assert [w.split("w")[0] for w in first] == [source] * 12 and first[0] == f"{source}w0"  # one row's opening
        middle = words[12:-12]
        assert 5 <= len(middle) <= 40
        assert middle[0].endswith("w0") and all(w.split("w")[0] != source for w in middle)  # another row's opening
        passages.add(source)
    assert len(passages) == 10  # each document its own passage row


def test_too_few_long_rows_fail_naming_the_need(tmp_path):
    with pytest.raises(SystemExit, match="too few for 5 documents"):
        repeat_documents(_texts(5, words=60) + _texts(3, words=10), 5, 12, (5, 40), seed=0)


def test_main_writes_jsonl_once_and_skips_the_rows_a_recipe_reads(tmp_path, capsys):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(40)))
    out = tmp_path / "repeat.jsonl"
    main(
        [
            str(src),
            "--output",
            str(out),
            "--documents",
            "8",
            "--passage_words",
            "10",
            "--gap_words",
            "5",
            "20",
            "--skip_rows",
            "20",
        ]
    )
    rows = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(int(r.split("w")[0][1:]) >= 20 for r in rows)  # rows 21-40 only
    assert "8 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        main([str(src), "--output", str(out), "--documents", "8"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(SystemExit, match="row 2"):
        main([str(bad), "--output", str(tmp_path / "x.jsonl"), "--documents", "1"])
