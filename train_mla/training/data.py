"""Training data: mix sources, tokenise (chat template for `messages`, plain for `text`), pack, cache, collate.

Packed blocks carry `position_ids`; with `separate_documents` they restart at every document, and transformers
then masks attention across documents (for SDPA/eager and flash-attention varlen alike). The tail of a batch
is padded as a separate "document" of pad tokens with labels -100, so no attention mask is needed. Blocks do not
cross map batches (1000 documents), so the last block of each such batch may be shorter than max_seq_length.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from train_mla.model.loading import ModelNotFoundError, _check_hub_reachable
from train_mla.training.arguments import is_row_count

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".raw": "text",
    ".tokens": "text",
}  # .raw, .tokens: WikiText-2 files


def load_source(source: str, splits: list[str], rows: int | None = None) -> dict:
    """{split name: Dataset} for one mixer entry: a local file or directory, or a hub id (`owner/name`, or
    `owner/name:config` for a dataset with configurations). With `rows`, a hub dataset is streamed and only the first
    `rows` rows of its train split are read (a large corpus is never downloaded whole)."""
    from datasets import load_dataset, load_from_disk

    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"dataset file {source!r}: unsupported extension (use one of {sorted(FILE_BUILDERS)})")
        extra = {"sample_by": "paragraph"} if builder == "text" else {}  # .txt: one document per paragraph
        split = "test" if any(w in path.name for w in ("test", "valid")) else "train"  # e.g. chat_test.jsonl
        if path.suffix != ".gz" and path.suffix != ".parquet":
            with open(path, "rb") as f:
                if not f.read(1 << 16).strip():
                    raise ValueError(f"dataset file {source!r} is empty")
                f.seek(0)
                for i, line in enumerate(f, 1):  # the json and text readers' own errors name neither file nor line
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(
                            f"dataset file {source!r} line {i}: not UTF-8 text (byte {line[e.start]:#04x} "
                            f"at column {e.start + 1})"
                        ) from None
        return {split: load_dataset(builder, data_files=str(path), split="train", **extra)}
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            loaded = load_from_disk(str(path))
            return dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
        loaded = load_dataset(str(path))
        return {s: loaded[s] for s in splits if s in loaded} or dict(loaded)
    if "sharegpt" in source and source.endswith(".jsonl"):
        raise FileNotFoundError(
            f"dataset {source!r} does not exist; build it with "
            f"`python -m train_mla.sharegpt --output_dir {Path(source).parent}`"
        )
    name, _, config = source.partition(":")
    if source.startswith((".", "/", "~")) or name.count("/") != 1 or source.endswith(":"):
        raise FileNotFoundError(
            f"dataset {source!r} is neither an existing local path nor a hub id (owner/name or owner/name:config)"
        )
    _check_hub_reachable_dataset(name)
    if rows is not None:
        return {"train": first_rows(load_dataset(name, config or None, split="train", streaming=True), rows)}
    out = {}
    for split in splits:
        try:
            out[split] = load_dataset(name, config or None, split=split)
        except ValueError as e:  # unknown split
            if "split" not in str(e).lower():
                raise
    if not out:
        raise ValueError(f"dataset {source!r} has none of the splits {splits}")
    return out


def first_rows(stream, rows: int):
    """At most the first `rows` rows of a streamed dataset as a Dataset (mix_datasets checks there were enough);
    reading stops there."""
    from itertools import islice

    from datasets import Dataset

    return Dataset.from_list(list(islice(stream, rows)))


def _check_hub_reachable_dataset(repo_id: str) -> None:
    try:
        _check_hub_reachable(repo_id)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(str(e).replace("Download it", "Download the dataset")) from None


ROW_RULES = {  # what a usable row holds, by the columns a script reads
    ("messages", "text"): (
        lambda r: (
            _chat_ok(r.get("messages")) if r.get("messages") else isinstance(r.get("text"), str) and bool(r.get("text"))
        ),
        "non-empty 'text', or 'messages' as a list of {'role': str, 'content': str}",
    ),
    ("prompt", "chosen", "rejected"): (
        lambda r: bool(r.get("chosen")) and bool(r.get("rejected")),
        "non-empty 'chosen' and 'rejected'",
    ),
}


def _chat_ok(messages) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )


def first_bad_row(ds, columns) -> int | None:
    """Index of the first row that lacks what the `columns` rule asks for, or None."""
    rule = ROW_RULES.get(tuple(columns)) if columns is not None else None
    if rule is None:
        return None
    ok = rule[0]
    return next((i for i, row in enumerate(ds) if not ok(row)), None)


def mix_datasets(mixer: dict, splits: list[str], test_split_size: float = 0.0, seed: int = 42, columns=None):
    """DatasetDict(train=..., test=...): each source's train rows subsampled by its share (a fraction in (0, 1]: that
    share of a random permutation; a whole number > 1: the first that many rows, in the source's own order), then
    shuffled. Every row is checked first: an empty source, or the first row without the fields it needs, is an error
    naming both."""
    from datasets import DatasetDict, concatenate_datasets

    train, test = [], []
    for source, share in mixer.items():
        rows = int(share) if is_row_count(share) else None
        for split, ds in load_source(source, splits, rows).items():
            if columns is not None:
                keep = [c for c in ds.column_names if c in columns]
                if not keep:
                    raise ValueError(
                        f"dataset {source!r} split {split!r} has none of the columns {columns} "
                        f"(it has {ds.column_names})"
                    )
                ds = ds.select_columns(keep)
                if len(ds) == 0:
                    raise ValueError(f"dataset {source!r} split {split!r} has no rows")
                bad = first_bad_row(ds, columns)
                if bad is not None:
                    raise ValueError(
                        f"dataset {source!r} split {split!r}: row {bad} (counting from 0) has no "
                        f"{ROW_RULES[tuple(columns)][1]}: {str(ds[bad])[:200]}"
                    )
            if "test" in split or "valid" in split:
                test.append(ds)
            elif "train" in split and rows is not None:
                if len(ds) < rows:
                    raise ValueError(f"dataset_mixer[{source!r}] asks for {rows} rows; split {split!r} has {len(ds)}")
                train.append(ds.select(range(rows)).shuffle(seed=seed))
            elif "train" in split:
                ds = ds.shuffle(seed=seed)
                train.append(ds.select(range(max(1, int(share * len(ds))))))
    if not train:
        raise ValueError(f"dataset_mixer {list(mixer)} gave no training split (looked for names containing 'train')")
    out = DatasetDict(train=concatenate_datasets(train).shuffle(seed=seed))
    if test:
        out["test"] = concatenate_datasets(test).shuffle(seed=seed)
    elif test_split_size > 0:
        parts = out["train"].train_test_split(test_size=test_split_size, seed=seed)
        out = DatasetDict(train=parts["train"], test=parts["test"])
    return out


def tokenize_document(row: dict, tokenizer) -> list[int]:
    """Token ids of one row: `messages` through the chat template (which adds its own BOS), else `text`."""
    if row.get("messages"):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids


def pack(docs: list[list[int]], block: int, separate_documents: bool) -> dict:
    """Concatenate documents and cut them into blocks of `block` tokens (the last one may be shorter).

    With `separate_documents`, positions count from 0 inside each document, and again from 0 where a block cut
    splits one (the piece in the next block cannot attend to the part before the cut, so it starts afresh: positions
    never exceed the block length); otherwise each block is one sequence 0..block-1.
    """
    flat = [t for d in docs for t in d]
    doc_pos = [p for d in docs for p in range(len(d))]
    starts = range(0, len(flat), block)
    blocks = [flat[i : i + block] for i in starts]
    positions = []
    for i, b in zip(starts, blocks):
        pos = doc_pos[i : i + block] if separate_documents else list(range(len(b)))
        first = pos[0]  # > 0 when the block starts inside a document: shift that piece to start at 0
        k = 0
        while k < len(pos) and pos[k] - first == k:
            pos[k] -= first
            k += 1
        positions.append(pos)
    return {"input_ids": blocks, "position_ids": positions, "labels": blocks}


def prepare_lm_dataset(data_args, tokenizer, seed: int = 42, log=print):
    """Mixed, tokenised and (optionally) packed DatasetDict, cached on disk under a key of everything it depends on."""
    from datasets import DatasetDict, load_from_disk

    key = json.dumps(
        {
            "data": {
                k: v
                for k, v in vars(data_args).items()
                if k not in ("preprocessing_num_workers", "processed_cache_dir")
            },
            "tokenizer": [
                tokenizer.name_or_path,
                len(tokenizer),
                tokenizer.chat_template,
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
            ],
            "seed": seed,
            "mtimes": _mtimes(data_args.dataset_mixer),
            "version": 2,
        },
        sort_keys=True,
    )
    root = Path(
        data_args.processed_cache_dir
        or Path(os.environ.get("TRAIN_MLA_CACHE", Path.home() / ".cache" / "train_mla")) / "processed"
    )
    cache = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (cache / "dataset_dict.json").is_file():
        log(f"Using tokenised data cached in {cache}")
        return load_from_disk(str(cache))

    raw = mix_datasets(
        data_args.dataset_mixer, data_args.dataset_splits, data_args.test_split_size, seed, columns=("messages", "text")
    )

    def tokenize_and_pack(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        docs = [tokenize_document(r, tokenizer) for r in rows]
        if data_args.packing:
            return pack(docs, data_args.max_seq_length, data_args.separate_documents)
        docs = [d[: data_args.max_seq_length] for d in docs]
        return {"input_ids": docs, "position_ids": [list(range(len(d))) for d in docs], "labels": docs}

    out = DatasetDict(
        {
            split: ds.map(
                tokenize_and_pack,
                batched=True,
                batch_size=1000,
                remove_columns=ds.column_names,
                num_proc=data_args.preprocessing_num_workers,
                desc=f"Tokenising {split}",
            )
            for split, ds in raw.items()
        }
    )
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    out.save_to_disk(str(tmp))
    if cache.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.replace(cache)
    log(f"Tokenised data: {', '.join(f'{s} {len(d)} blocks' for s, d in out.items())}; cached in {cache}")
    return load_from_disk(str(cache))


def _mtimes(mixer: dict) -> dict:
    return {k: os.path.getmtime(k) for k in mixer if os.path.exists(k)}


class PackedCollator:
    """Pads a batch to its longest row (or to `pad_to`, for static shapes under torch.compile). Padding is a separate
    pseudo-document (positions restart at 0, labels -100); without packing an attention mask is added as well."""

    def __init__(self, pad_token_id: int, with_attention_mask: bool, pad_to: int | None = None):
        self.pad, self.with_mask, self.pad_to = pad_token_id, with_attention_mask, pad_to

    def __call__(self, features: list[dict]) -> dict:
        L = max(max(len(f["input_ids"]) for f in features), self.pad_to or 0)
        ids, pos, labels, mask = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad] * (L - n))
            pos.append(list(f["position_ids"]) + list(range(L - n)))
            labels.append(list(f["labels"]) + [-100] * (L - n))
            mask.append([1] * n + [0] * (L - n))
        batch = {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels)}
        if self.with_mask:
            batch["attention_mask"] = torch.tensor(mask)
        return batch
