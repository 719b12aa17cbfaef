"""Build a training corpus of general text from local files, decontaminated against the evaluation tasks.

    python -m train_mla.corpus SOURCE [SOURCE ...] --output FILE.jsonl [--eval_data DIR] [--no_decontaminate]
        [--ngram 13] [--min_words 100] [--section_words 3000] [--max_documents N] [--seed 0] [--tokenizer NAME]

A SOURCE is one of
- a WikiExtractor output folder (files of `<doc id=.. title=..> ... </doc>` records, e.g. `text/AA/wiki_00`),
- a folder of plain-text books (every `*.txt` below it, one book per file; Project Gutenberg's header, footer and
  licence are stripped, hard-wrapped lines joined into paragraphs),
- a single plain-text file (one book).
Long documents are cut at paragraph boundaries into sections of about `section_words` words; every section is one
`{"text": ...}` row of FILE.jsonl, the format `dataset_mixer` reads. The rows are shuffled (`seed`), so the first N
lines of the file are a random sample of it.

Decontamination is on by default: a document is dropped when its title is that of a WikiText-2 test or validation
article, or when it shares any `ngram`-word sequence (lower-cased words, punctuation ignored) with the text of an
evaluation task: WikiText-2 test and validation, LAMBADA test passages, ARC-Easy test questions, Social IQa dev
contexts and questions, TinyStories validation, PTB validation (all under `--eval_data`, default `../shared/data`
beside the checkout) and the held-out ShareGPT conversations (`data/sharegpt/chat_test.jsonl`) when they exist.
Evaluation items shorter than `ngram` words but of at least 8 are matched whole. Stubs (under `min_words`), exact
duplicates and repeated titles are dropped too. The builder prints, and writes to FILE.report.json, what it kept and
dropped per source and reason, and the titles it removed as evaluation articles. FILE is written under a temporary
name and renamed when complete; an existing FILE is refused.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EVAL_DATA = REPO.parent / "shared" / "data"
SHAREGPT_TEST = REPO / "data" / "sharegpt" / "chat_test.jsonl"
MIN_ITEM_WORDS = 8  # shorter evaluation items are too generic to match ("which of these is a mammal")
_PRIME = np.uint64(0x100000001B3)
_WORD = re.compile(r"[a-z0-9]+")


# --- normalising text for matching --------------------------------------------------------------------------------

WIKITEXT_JOINS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def words_of(text: str) -> list[str]:
    """Lower-cased words, punctuation and WikiText-2's tokenisation (` @-@ `, `<unk>`) ignored."""
    for k, v in WIKITEXT_JOINS.items():
        text = text.replace(k, v)
    return _WORD.findall(text.replace("<unk>", " \x00 ").lower())


def normal_title(title: str) -> str:
    return " ".join(words_of(title))


def word_ids(words: list[str]) -> np.ndarray:
    """A 64-bit hash per word (uint64[len(words)]), consistent within one process."""
    return np.fromiter((hash(w) & 0xFFFFFFFFFFFFFFFF for w in words), np.uint64, len(words))


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every run of n consecutive word ids (uint64[len(ids) - n + 1]; empty when shorter)."""
    if len(ids) < n:
        return np.empty(0, np.uint64)
    out = np.zeros(len(ids) - n + 1, np.uint64)
    for i in range(n):  # polynomial rolling hash, wrapping at 2^64
        out = out * _PRIME + ids[i : len(ids) - n + 1 + i]
    return out


# --- the evaluation text ---------------------------------------------------------------------------------------------


def _wikitext_articles(path: Path) -> list[tuple[str, str]]:
    """(title, text) of every article of a WikiText-2 file (articles start at ' = Title = ' lines)."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = re.split(r"\n(?= = [^=].* = *$)", "\n" + text, flags=re.M)
    out = []
    for part in parts:
        part = part.strip("\n")
        m = re.match(r" ?= ([^=].*?) = *$", part.split("\n", 1)[0])
        if m:
            out.append((m.group(1), part))
    return out


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def evaluation_texts(eval_data: Path, sharegpt_test: Path | None) -> tuple[dict[str, list[str]], dict[str, set]]:
    """({task: [item text, ...]}, {task: {normalised article title}}) for every evaluation task found.
    Raises FileNotFoundError naming what is missing when `eval_data` lacks the project's task files."""
    need = {
        "wikitext-2 test": eval_data / "wikitext-2" / "wiki.test.raw",
        "wikitext-2 valid": eval_data / "wikitext-2" / "wiki.valid.tokens",
        "lambada test": eval_data / "lambada" / "lambada_test.jsonl",
        "arc-easy test": eval_data / "eval" / "arc" / "ARC-Easy-Test.para.jsonl",
        "siqa dev": eval_data / "eval" / "siqa" / "dev.jsonl",
        "tinystories valid": eval_data / "tinystories" / "tinystories_valid_head.txt",
        "ptb valid": eval_data / "ptb" / "ptb.valid.txt",
    }
    missing = [str(p) for p in need.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"evaluation data missing: {', '.join(missing)} (pass --eval_data DIR, the folder "
            "holding wikitext-2/, lambada/, eval/arc, eval/siqa, tinystories/, ptb/; or "
            "--no_decontaminate to build without it)"
        )
    texts, titles = {}, {}
    for task in ("wikitext-2 test", "wikitext-2 valid"):
        articles = _wikitext_articles(need[task])
        texts[task] = [a for _, a in articles]
        titles[task] = {normal_title(t) for t, _ in articles}
    texts["lambada test"] = [r["text"] for r in _jsonl(need["lambada test"])]
    texts["arc-easy test"] = [
        r["question"]["stem"] + " " + " ".join(c["text"] for c in r["question"]["choices"])
        for r in _jsonl(need["arc-easy test"])
    ]
    texts["siqa dev"] = [r["context"] + " " + r["question"] for r in _jsonl(need["siqa dev"])]
    stories = need["tinystories valid"].read_text(encoding="utf-8").split("\n\n")
    texts["tinystories valid"] = [s for s in stories if s.strip()]
    texts["ptb valid"] = need["ptb valid"].read_text(encoding="utf-8").splitlines()
    if sharegpt_test is not None and sharegpt_test.is_file():
        texts["sharegpt test"] = [
            m["content"]
            for r in _jsonl(sharegpt_test)
            for m in r.get("messages", [])
            if isinstance(m.get("content"), str)
        ]
    return texts, titles


class EvalIndex:
    """Which evaluation task a document overlaps, by shared n-grams (shorter items matched whole) or by title."""

    def __init__(self, texts: dict[str, list[str]], titles: dict[str, set], n: int = 13):
        self.n, self.titles = n, titles
        hashes = defaultdict(list)  # length -> [(hash array, task)]
        self.items, self.short_skipped = Counter(), Counter()
        for task, items in texts.items():
            for item in items:
                w = words_of(item)
                if len(w) < MIN_ITEM_WORDS:
                    self.short_skipped[task] += 1
                    continue
                m = min(n, len(w))
                hashes[m].append((ngram_hashes(word_ids(w), m), task))
                self.items[task] += 1
        self.tables = {}  # length -> (sorted hashes, task index per hash)
        self.tasks = sorted(texts)
        for m, parts in hashes.items():
            h = np.concatenate([p for p, _ in parts])
            t = np.concatenate([np.full(len(p), self.tasks.index(task), np.int16) for p, task in parts])
            order = np.argsort(h, kind="stable")
            self.tables[m] = (h[order], t[order])

    def title_task(self, title: str | None) -> str | None:
        if title:
            key = normal_title(title)
            for task, titles in self.titles.items():
                if key in titles:
                    return task
        return None

    def overlap_task(self, words: list[str]) -> str | None:
        """The first evaluation task sharing an n-gram with `words`, or None."""
        ids = word_ids(words)  # once, for every n-gram length
        for m, (table, task_of) in self.tables.items():
            h = ngram_hashes(ids, m)
            if len(h) == 0:
                continue
            i = np.minimum(np.searchsorted(table, h), len(table) - 1)
            hit = np.flatnonzero(table[i] == h)
            if len(hit):
                return self.tasks[task_of[i[hit[0]]]]
        return None


# --- reading sources -------------------------------------------------------------------------------------------------

_DOC = re.compile(r'<doc id="[^"]*"(?: url="[^"]*")? title="([^"]*)">\n(.*?)\n</doc>', re.S)
_GUTENBERG_START = re.compile(
    r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG|^End of (?:the |this )?Project Gutenberg", re.M | re.I
)
_PRODUCED_BY = re.compile(r"^(?:produced by|e-?text prepared by|transcribed from|this e-?text was)", re.I)


def is_wikiextractor_folder(path: Path) -> bool:
    for f in sorted(path.rglob("wiki_*"))[:1]:
        with open(f, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith("<doc ")
    return False


def wikiextractor_documents(folder: Path):
    """(title, text) of every `<doc>` record in the folder's `wiki_*` files; the title line WikiExtractor repeats
    at the top of the text is kept as the article's first line."""
    for f in sorted(folder.rglob("wiki_*")):
        raw = f.read_text(encoding="utf-8", errors="replace")
        for m in _DOC.finditer(raw):
            yield m.group(1), m.group(2).strip()


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """(the book's own text, whether a Project Gutenberg header was found and removed). The text between the
    START and END markers, without 'Produced by' credits and without paragraphs that mention Project Gutenberg."""
    start = _GUTENBERG_START.search(text)
    found = start is not None
    if start:
        text = text[start.end() :]
        small_print_end = _GUTENBERG_START.search(text)  # older files: a licence block ending '*END*THE SMALL PRINT'
        if small_print_end and small_print_end.start() < 30000:
            text = text[small_print_end.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    paras = [
        p for p in re.split(r"\n\s*\n", text) if "gutenberg" not in p.lower() and not _PRODUCED_BY.match(p.strip())
    ]
    return "\n\n".join(p.strip("\n") for p in paras if p.strip()), found


def unwrap(text: str) -> str:
    """Hard-wrapped lines joined into one line per paragraph; paragraphs separated by a blank line."""
    paras = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


def book_documents(path: Path):
    """(title, text, had a Gutenberg header) of every *.txt book under `path` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    for f in files:
        raw = f.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        text, found = strip_gutenberg(raw) if "project gutenberg" in raw[:20000].lower() else (raw, False)
        yield f.stem, unwrap(text), found


def sections(text: str, max_words: int) -> list[str]:
    """`text` cut at line boundaries (paragraphs: books are unwrapped) into pieces of about `max_words` words at most;
    a piece is closed only once it holds a quarter of that, so headings stay with the text after them."""
    out, cur, count = [], [], 0
    for line in text.split("\n"):
        n = len(line.split())
        if count >= max(1, max_words // 4) and count + n > max_words:
            out.append("\n".join(cur).strip("\n"))
            cur, count = [], 0
        cur.append(line)
        count += n
    if count:
        out.append("\n".join(cur).strip("\n"))
    return out


# --- the builder -----------------------------------------------------------------------------------------------------


def source_documents(source: Path):
    """(kind, title, text, note) of every document of one SOURCE; kind 'wikipedia' or 'book'."""
    if source.is_dir() and is_wikiextractor_folder(source):
        for title, text in wikiextractor_documents(source):
            yield "wikipedia", title, text, None
    else:
        for title, text, gutenberg in book_documents(source):
            yield "book", title, text, ("gutenberg header stripped" if gutenberg else None)


def build(
    sources: list[Path],
    index: EvalIndex | None,
    min_words: int = 100,
    section_words: int = 3000,
    max_documents: int | None = None,
    log=print,
) -> tuple[list[str], dict]:
    """(kept section texts in source order, report {source: {reason: count}, 'removed_titles': {...}})."""
    kept, seen_titles, seen_text = [], set(), set()
    report = {"sources": {}, "removed_titles": defaultdict(list)}
    for source in sources:
        counts = Counter()
        words_kept = 0
        for kind, title, text, note in source_documents(source):
            counts["documents read"] += 1
            if note:
                counts[note] += 1
            if len(text.split()) < min_words:
                counts["dropped: stub"] += 1
                continue
            if kind == "wikipedia":
                key = normal_title(title)
                task = index.title_task(title) if index else None
                if task:
                    counts[f"dropped: title of a {task} article"] += 1
                    report["removed_titles"][task].append(title)
                    continue
                if key in seen_titles:
                    counts["dropped: repeated title"] += 1
                    continue
                seen_titles.add(key)
            for piece in sections(text, section_words):
                words = words_of(piece)
                digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
                if digest in seen_text:
                    counts["sections dropped: duplicate text"] += 1
                    continue
                task = index.overlap_task(words) if index else None
                if task:
                    counts[f"sections dropped: {index.n}-gram overlap with {task}"] += 1
                    if kind == "wikipedia":
                        report["removed_titles"][task].append(title)
                    continue
                n_words = len(piece.split())
                if n_words < min_words // 2:
                    counts["sections dropped: short scrap"] += 1  # e.g. a book's last lines
                    continue
                seen_text.add(digest)
                kept.append(piece)
                words_kept += n_words
                counts["sections kept"] += 1
            if max_documents and counts["documents read"] >= max_documents:
                break
        counts["words kept"] = words_kept
        report["sources"][str(source)] = dict(counts)
        log(f"[corpus] {source}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    report["removed_titles"] = {k: sorted(set(v)) for k, v in report["removed_titles"].items()}
    return kept, report


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m train_mla.corpus",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", type=Path, help="WikiExtractor folders, folders of .txt books, .txt files")
    p.add_argument("--output", required=True, type=Path, help="FILE.jsonl to write ({'text': ...} rows)")
    p.add_argument(
        "--eval_data",
        type=Path,
        default=DEFAULT_EVAL_DATA,
        help="folder of the evaluation tasks' files (default: ../shared/data beside the checkout)",
    )
    p.add_argument("--no_decontaminate", action="store_true", help="keep text that overlaps the evaluation tasks")
    p.add_argument("--ngram", type=int, default=13, help="words per matched sequence (default 13)")
    p.add_argument("--min_words", type=int, default=100, help="documents with fewer words are stubs (default 100)")
    p.add_argument("--section_words", type=int, default=3000, help="longest row, in words (default 3000)")
    p.add_argument("--max_documents", type=int, default=None, help="read at most this many documents per source")
    p.add_argument("--seed", type=int, default=0, help="shuffle of the rows (default 0)")
    p.add_argument("--tokenizer", default=None, help="also count the kept text's tokens with this tokenizer")
    a = p.parse_args(argv)

    # -- every check before the minutes of reading
    if a.output.exists():
        raise SystemExit(f"error: {a.output} exists; choose another --output (nothing was changed)")
    if a.output.suffix != ".jsonl" or any(w in a.output.name for w in ("test", "valid")):
        raise SystemExit(
            f"error: --output {a.output}: name a .jsonl file without 'test' or 'valid' in its name "
            "(dataset_mixer treats such files as evaluation splits)"
        )
    for s in a.sources:
        if not s.exists():
            raise SystemExit(f"error: source {s} does not exist")
        if s.is_dir() and not is_wikiextractor_folder(s) and next(s.rglob("*.txt"), None) is None:
            raise SystemExit(f"error: source {s} holds neither WikiExtractor files (wiki_*) nor .txt books")
    if a.ngram < MIN_ITEM_WORDS:
        raise SystemExit(f"error: --ngram {a.ngram}: use at least {MIN_ITEM_WORDS}")
    index = None
    if not a.no_decontaminate:
        try:
            texts, titles = evaluation_texts(a.eval_data, SHAREGPT_TEST)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        index = EvalIndex(texts, titles, a.ngram)
        print(
            f"[corpus] decontaminating against {sum(index.items.values()):,} evaluation items ("
            + ", ".join(f"{t} {n:,}" for t, n in sorted(index.items.items()))
            + f"; shorter than {MIN_ITEM_WORDS} "
            f"words, not matched: {sum(index.short_skipped.values()):,}) and {sum(map(len, titles.values()))} "
            "WikiText-2 article titles"
        )
    else:
        print("[corpus] --no_decontaminate: evaluation text is NOT removed")
    tokenizer = None
    if a.tokenizer:
        from train_mla.model.loading import load_tokenizer

        tokenizer = load_tokenizer(a.tokenizer)

    kept, report = build(a.sources, index, a.min_words, a.section_words, a.max_documents)
    random.Random(a.seed).shuffle(kept)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.output.with_name(f"{a.output.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for text in kept:
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode())
    report.update(
        rows=len(kept),
        words=sum(r["words kept"] for r in report["sources"].values()),
        sha256=digest.hexdigest(),
        ngram=a.ngram,
        min_words=a.min_words,
        section_words=a.section_words,
        seed=a.seed,
        decontaminated=index is not None,
        eval_items=dict(index.items) if index else None,
    )
    if tokenizer is not None:
        report["tokens"] = sum(
            len(ids)
            for i in range(0, len(kept), 1000)
            for ids in tokenizer(kept[i : i + 1000], add_special_tokens=False)["input_ids"]
        )
        report["tokenizer"] = a.tokenizer
    tmp.replace(a.output)
    a.output.with_suffix(".report.json").write_text(json.dumps(report, indent=1) + "\n")
    removed = sum(len(v) for v in report["removed_titles"].values())
    print(
        f"[corpus] wrote {a.output}: {len(kept):,} rows, {report['words']:,} words"
        + (f", {report['tokens']:,} tokens" if "tokens" in report else "")
        + f"; {removed} Wikipedia articles removed as evaluation text (list: {a.output.with_suffix('.report.json')})"
    )


if __name__ == "__main__":
    sys.exit(main())
