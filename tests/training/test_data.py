"""dataset_mixer shares: fractions of a random permutation, or whole numbers of rows; hub ids with a configuration,
streamed when a number of rows is asked for."""

import json

import pytest

from train_mla.training.arguments import DataArguments
from train_mla.training.data import mix_datasets


def _jsonl(path, n, start=0):
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(start, start + n)))
    return str(path)


def test_a_row_count_takes_the_first_rows_and_equals_a_head_of_the_file(tmp_path):
    whole = _jsonl(tmp_path / "corpus.jsonl", 50)
    head = _jsonl(tmp_path / "corpus_head.jsonl", 20)
    by_count = mix_datasets({whole: 20}, ["train"], seed=3)["train"]["text"]
    by_file = mix_datasets({head: 1.0}, ["train"], seed=3)["train"]["text"]
    assert sorted(by_count, key=lambda t: int(t.split()[1])) == [f"document {i}" for i in range(20)]
    assert by_count == by_file  # the same rows in the same order as `head -n 20` with fraction 1.0
    assert len(mix_datasets({whole: 0.5}, ["train"], seed=3)["train"]) == 25
    with pytest.raises(ValueError, match=r"asks for 60 rows; split 'train' has 50"):
        mix_datasets({whole: 60}, ["train"])


@pytest.mark.parametrize("share", [0, -1, 1.5, 2.5, True, "all"])
def test_a_share_is_a_fraction_or_a_whole_number_of_rows(share):
    with pytest.raises(ValueError, match="a fraction in \\(0, 1\\] or a whole number of rows"):
        DataArguments(dataset_mixer={"x.jsonl": share})
    DataArguments(dataset_mixer={"x.jsonl": 36000})
    DataArguments(dataset_mixer={"x.jsonl": 0.25})


def test_a_hub_dataset_with_a_config_and_a_row_count_is_streamed_and_read_no_further(tmp_path, monkeypatch):
    import datasets

    import train_mla.training.data as data

    calls, read = [], []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))

        def rows():
            for i in range(1000):
                read.append(i)
                yield {"text": f"web page {i}", "url": f"u{i}"}

        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_check_hub_reachable_dataset", lambda name: calls.append(("checked", name)))
    out = mix_datasets({"owner/web-corpus:sample-10BT": 30}, ["train", "test"], columns=("messages", "text"))
    assert calls == [("checked", "owner/web-corpus"), ("owner/web-corpus", "sample-10BT", "train", True)]
    assert len(read) == 30 and len(out["train"]) == 30 and out["train"].column_names == ["text"]
    with pytest.raises(ValueError, match=r"asks for 5000 rows; split 'train' has 1000"):
        mix_datasets({"owner/web-corpus": 5000}, ["train"])
    with pytest.raises(FileNotFoundError, match="owner/name:config"):
        mix_datasets({"owner/web-corpus:": 10}, ["train"])
