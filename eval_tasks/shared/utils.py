"""Turn the raw files in ../shared/data into the rows the task YAMLs beside this file expect."""

import re
from pathlib import Path

SIQA_LABELS = Path("../shared/data/eval/siqa/dev-labels.lst")


def arc_docs(dataset):
    def fix(doc):
        choices = doc["question"]["choices"]
        labels = [c["label"] for c in choices]
        return {
            "query": doc["question"]["stem"],
            "choices": [c["text"] for c in choices],
            "gold": labels.index(doc["answerKey"]),
        }

    return dataset.map(fix, remove_columns=dataset.column_names)


def siqa_docs(dataset):
    labels = [int(x) - 1 for x in SIQA_LABELS.read_text().split()]
    if len(labels) != len(dataset):
        raise ValueError(f"{SIQA_LABELS}: {len(labels)} labels for {len(dataset)} questions")
    dataset = dataset.add_column("gold", labels)
    return dataset.map(lambda d: {"choices": [d["answerA"], d["answerB"], d["answerC"]]})


def wikitext_docs(dataset):
    """The raw test file as one row per line -> one row per article (split at ' = Title = ' headings)."""
    text = "\n".join(dataset["text"])
    parts = re.split(r"\n(?= = [^=].* = $)", "\n" + text, flags=re.M)
    articles = [p.strip("\n") for p in parts if p.strip()]
    return dataset.from_dict({"page": articles})
