"""Training documents that repeat a passage far back, for distilling long-range copying.

    python -m train_mla.repeat_passages data/corpus/wikipedia.jsonl --output data/corpus/repeat.jsonl \
        --documents 4000 [--passage_words 120] [--gap_words 200 1000] [--skip_rows 72000] [--seed 0]

Each row of OUTPUT is PASSAGE, a blank line, GAP, a blank line and PASSAGE again: the passage is the opening
`passage_words` words of one row of INPUT, the gap the opening words of another row, as many as a number drawn
uniformly from the `gap_words` range. A teacher continues the second copy almost exactly from a thousand and more
tokens back, while a student with a compressed KV cache loses that first (`benchmarks/copy_probe.py`,
docs/results.md); natural text repeats itself that far back too rarely to train it. INPUT is a corpus that
`train_mla.corpus` built and decontaminated, so the rows are too; `skip_rows` leaves out the rows a recipe already
reads (the long recipes read the first 72,000 of `wikipedia.jsonl`), so the passages are new text. OUTPUT is
written under a temporary name and renamed when complete; an existing OUTPUT is refused.
"""

import argparse
import json
import os
import random
import re
from pathlib import Path


def opening_words(text: str, n: int) -> str | None:
    """The first n words of text with its own spacing and line breaks kept, or None if it has fewer."""
    pieces = re.split(r"(\s+)", text.strip())  # word, space, word, ...
    if (len(pieces) + 1) // 2 < n:
        return None
    return "".join(pieces[: 2 * n - 1])


def repeat_documents(
    texts: list[str], documents: int, passage_words: int, gap_words: tuple[int, int], seed: int
) -> list[str]:
    """`documents` rows PASSAGE + GAP + PASSAGE, each passage from its own row of texts, the gap from another one."""
    lo, hi = gap_words
    rng = random.Random(seed)
    usable = [t for t in texts if len(t.split()) >= max(passage_words, hi)]  # the words opening_words counts
    if len(usable) < documents + 1:
        raise SystemExit(
            f"{len(usable)} rows have at least {max(passage_words, hi)} words: too few for {documents} documents "
            "(each needs its own passage, and a gap from another row)"
        )
    passages = rng.sample(range(len(usable)), documents)
    out = []
    for i in passages:
        j = rng.randrange(len(usable) - 1)
        j += j >= i  # any row but the passage's
        passage = opening_words(usable[i], passage_words)
        gap = opening_words(usable[j], rng.randint(lo, hi))
        out.append(f"{passage}\n\n{gap}\n\n{passage}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="a {'text': ...} JSONL corpus (python -m train_mla.corpus)")
    p.add_argument("--output", required=True)
    p.add_argument("--documents", type=int, required=True)
    p.add_argument("--passage_words", type=int, default=120)
    p.add_argument("--gap_words", type=int, nargs=2, default=[200, 1000], metavar=("MIN", "MAX"))
    p.add_argument("--skip_rows", type=int, default=0, help="leave out INPUT's first rows (those a recipe reads)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.documents < 1 or a.passage_words < 1 or not 0 < a.gap_words[0] <= a.gap_words[1]:
        raise SystemExit(
            f"--documents {a.documents}, --passage_words {a.passage_words}, --gap_words {a.gap_words}: "
            "need documents >= 1, passage_words >= 1 and 0 < MIN <= MAX"
        )
    out = Path(a.output)
    if out.exists():
        raise SystemExit(f"{out} exists: not overwritten")
    texts = []
    with open(a.input) as f:
        for n, line in enumerate(f, 1):
            if n <= a.skip_rows:
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"{a.input} row {n}: not a {{'text': ...}} JSON object ({e})") from None
    rows = repeat_documents(texts, a.documents, a.passage_words, tuple(a.gap_words), a.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)
    words = sum(len(t.split()) for t in rows)
    print(
        f"{out}: {len(rows):,} documents, {words:,} words ({words / len(rows):,.0f} a document), passages of "
        f"{a.passage_words} words {a.gap_words[0]}-{a.gap_words[1]} words apart, from {len(texts):,} rows of "
        f"{a.input} after its first {a.skip_rows:,}"
    )


if __name__ == "__main__":
    main()
