"""The training-corpus builder: sources read, Gutenberg stripped, stubs and duplicates dropped, and no evaluation text
(by title or by shared 13-word sequence) reaching the output."""

import json
import random
import textwrap

import pytest
from conftest import SHARED

from train_mla.corpus import evaluation_texts, main, strip_gutenberg, words_of

WORDS = (
    "river stone garden window winter summer market bridge letter harbour candle forest mountain village "
    "teacher kitchen doctor engine valley island castle meadow"
).split()


def prose(n_words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


WIKITEXT_TEST = [("Evaluation Castle", prose(300, 1)), ("Test Article Two", prose(200, 2))]
WIKITEXT_VALID = [("Valid Article", prose(200, 3))]
LAMBADA = [prose(80, 4), prose(70, 5)]
ARC = [("Which of the following river stones is harder than the common garden rock of a valley", ["a", "b"])]
SIQA = [("Kai walked to the market bridge with a letter for the village teacher", "What will Kai do next?")]
STORIES = [prose(120, 6), prose(90, 7)]
PTB = [prose(30, 8)]


def write_eval_data(root):
    """A folder shaped like ../shared/data, holding the made-up evaluation items above."""

    def wikitext(articles):
        return "".join(f" = {t} = \n\n {body} \n\n" for t, body in articles)

    (root / "wikitext-2").mkdir(parents=True)
    (root / "wikitext-2" / "wiki.test.raw").write_text(wikitext(WIKITEXT_TEST))
    (root / "wikitext-2" / "wiki.valid.tokens").write_text(wikitext(WIKITEXT_VALID).replace("-", " @-@ "))
    (root / "lambada").mkdir()
    (root / "lambada" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    (root / "eval" / "arc").mkdir(parents=True)
    (root / "eval" / "arc" / "ARC-Easy-Test.para.jsonl").write_text(
        "".join(
            json.dumps({"question": {"stem": q, "choices": [{"text": c, "label": c} for c in cs]}, "answerKey": "a"})
            + "\n"
            for q, cs in ARC
        )
    )
    (root / "eval" / "siqa").mkdir(parents=True)
    (root / "eval" / "siqa" / "dev.jsonl").write_text(
        "".join(json.dumps({"context": c, "question": q}) + "\n" for c, q in SIQA)
    )
    (root / "tinystories").mkdir()
    (root / "tinystories" / "tinystories_valid_head.txt").write_text("\n\n".join(STORIES) + "\n\n")
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.valid.txt").write_text("\n".join(PTB))
    return root


def wiki_doc(i, title, body):
    return f'<doc id="{i}" url="http://x?curid={i}" title="{title}">\n{title}\n\n{body}\n</doc>\n'


def middle(text, n_words, start=20):
    return " ".join(text.split()[start : start + n_words])


@pytest.fixture
def sources(tmp_path):
    wiki = tmp_path / "wiki" / "AA"
    wiki.mkdir(parents=True)
    docs = [
        wiki_doc(1, "Clean Article", prose(400, 10)),
        wiki_doc(2, "Stub", prose(20, 11)),
        wiki_doc(3, "Evaluation Castle", prose(400, 12)),  # a WikiText-2 test title
        wiki_doc(4, "Copied Elsewhere", prose(150, 13) + " " + middle(WIKITEXT_VALID[0][1], 13) + " " + prose(150, 14)),
        wiki_doc(5, "Clean Article", prose(400, 15)),  # a title seen before
        wiki_doc(6, "Story Quote", prose(200, 16) + "\n" + middle(STORIES[1], 14) + "\n" + prose(100, 17)),
        wiki_doc(7, "Question Copy", prose(200, 18) + " " + ARC[0][0] + " " + prose(100, 19)),
    ]
    (wiki / "wiki_00").write_text("".join(docs[:4]))
    (wiki / "wiki_01").write_text("".join(docs[4:]))
    books = tmp_path / "books" / "Author, Some"
    books.mkdir(parents=True)
    gutenberg = (
        "The Project Gutenberg EBook of A Book, by Some Author\n\nThis eBook is for the use of anyone\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\n\nProduced by A Volunteer\n\n"
        + textwrap.fill(prose(300, 20), 70)
        + "\n\n"
        + middle(LAMBADA[1], 40, 10)
        + "\n\n"
        + prose(300, 21)
        + "\n\n"
        + "*** END OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\n\nSection 1. Project Gutenberg licence "
        + prose(200, 22)
        + "\n"
    )
    (books / "A Book.txt").write_text(gutenberg)
    (books / "Plain.txt").write_text(prose(500, 23) + "\n\n" + prose(10, 24) + "\n")
    return tmp_path, write_eval_data(tmp_path / "eval_data")


def rows(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_builder_keeps_clean_text_and_drops_every_evaluation_passage(sources, capsys):
    root, eval_data = sources
    out = root / "corpus" / "general.jsonl"
    main(
        [
            str(root / "wiki"),
            str(root / "books"),
            "--output",
            str(out),
            "--eval_data",
            str(eval_data),
            "--section_words",
            "250",
        ]
    )
    text = rows(out)
    joined = " ".join(" ".join(words_of(t)) for t in text)
    # nothing of any evaluation item, as 13-word runs (or whole, when shorter), reached the output
    items = [b for _, b in WIKITEXT_TEST + WIKITEXT_VALID] + LAMBADA + STORIES + [ARC[0][0], SIQA[0][0]]
    for item in items:
        w = words_of(item)
        n = min(13, len(w))
        for i in range(len(w) - n + 1):
            assert " ".join(w[i : i + n]) not in joined, f"evaluation text slipped through: {w[i : i + n]}"
    assert prose(400, 10).split()[5] in joined and " ".join(words_of(prose(400, 10))[:30]) in joined  # clean article
    assert " ".join(words_of(prose(500, 23))[:30]) in joined  # the plain book
    assert "gutenberg" not in joined and "volunteer" not in joined  # header, credits and licence stripped
    assert " ".join(prose(300, 20).split()[:30]) in " ".join(text)  # hard-wrapped lines joined again
    report = json.loads(out.with_suffix(".report.json").read_text())
    wiki = report["sources"][str(root / "wiki")]
    assert wiki["documents read"] == 7
    assert wiki["dropped: stub"] == 1
    assert wiki["dropped: repeated title"] == 1
    assert wiki["dropped: title of a wikitext-2 test article"] == 1
    assert report["removed_titles"]["wikitext-2 test"] == ["Evaluation Castle"]
    assert report["removed_titles"]["wikitext-2 valid"] == ["Copied Elsewhere"]
    assert report["removed_titles"]["tinystories valid"] == ["Story Quote"]
    assert report["removed_titles"]["arc-easy test"] == ["Question Copy"]
    books = report["sources"][str(root / "books")]
    assert books["gutenberg header stripped"] == 1
    assert books["sections dropped: 13-gram overlap with lambada test"] == 1
    assert books["sections dropped: short scrap"] == 1  # the last 11 words of Plain.txt
    assert report["decontaminated"] and report["rows"] == len(text)
    console = capsys.readouterr().out
    assert "sections dropped: 13-gram overlap with lambada test 1" in console


def test_builder_refuses_before_reading(sources, tmp_path):
    root, eval_data = sources
    out = root / "general.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(SystemExit, match="exists"):
        main([str(root / "wiki"), "--output", str(out), "--eval_data", str(eval_data)])
    assert out.read_text() == "keep me\n"
    with pytest.raises(SystemExit, match="wiki.test.raw"):
        main([str(root / "wiki"), "--output", str(root / "new.jsonl"), "--eval_data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="'test' or 'valid'"):
        main([str(root / "wiki"), "--output", str(root / "wiki_test.jsonl"), "--eval_data", str(eval_data)])
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(root / "missing"), "--output", str(root / "new.jsonl"), "--eval_data", str(eval_data)])
    assert not (root / "new.jsonl").exists()


def test_no_decontaminate_keeps_the_overlap(sources):
    root, _ = sources
    out = root / "all.jsonl"
    main([str(root / "books"), "--output", str(out), "--no_decontaminate", "--section_words", "250"])
    assert " ".join(words_of(LAMBADA[1])[10:50]) in " ".join(" ".join(words_of(t)) for t in rows(out))


def test_strip_gutenberg_old_small_print_header():
    text = (
        "Project Gutenberg's Etext\n\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
        "Chapter one begins here.\n\nEnd of the Project Gutenberg etext\n\nlicence text"
    )
    body, found = strip_gutenberg(text)
    assert found and body == "Chapter one begins here."


needs_eval_data = pytest.mark.skipif(
    not (SHARED / "data" / "wikitext-2").is_dir(), reason="../shared/data is not beside the checkout"
)


@needs_eval_data
def test_real_evaluation_passages_are_removed(tmp_path):
    """Real WikiText-2 test and LAMBADA text planted in otherwise clean documents never reaches the output."""
    texts, titles = evaluation_texts(SHARED / "data", None)
    article = texts["wikitext-2 test"][3]
    wiki_paragraph = max(article.split("\n"), key=len)
    lambada = texts["lambada test"][100]
    title = next(iter(titles["wikitext-2 test"])).title()
    wiki = tmp_path / "wiki" / "AA"
    wiki.mkdir(parents=True)
    (wiki / "wiki_00").write_text(
        wiki_doc(1, "Harmless", prose(300, 1) + "\n" + wiki_paragraph.replace(" @-@ ", "-"))
        + wiki_doc(2, title, prose(300, 2))
        + wiki_doc(3, "Clean", prose(300, 3))
    )
    (tmp_path / "book.txt").write_text(prose(300, 4) + "\n\n" + lambada + "\n\n" + prose(300, 5))
    out = tmp_path / "general.jsonl"
    main(
        [
            str(tmp_path / "wiki"),
            str(tmp_path / "book.txt"),
            "--output",
            str(out),
            "--eval_data",
            str(SHARED / "data"),
            "--section_words",
            "100000",
        ]
    )
    kept = rows(out)
    assert len(kept) == 1 and " ".join(words_of(prose(300, 3))[:20]) in " ".join(words_of(kept[0]))
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["removed_titles"]["wikitext-2 test"] == sorted(["Harmless", title])
    assert report["sources"][str(tmp_path / "book.txt")]["sections dropped: 13-gram overlap with lambada test"] == 1
