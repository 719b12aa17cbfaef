"""teacher_samples: chat rows whose replies are the teacher's own (greedy: exactly transformers' generate)."""

import json

import pytest
import torch
from conftest import make_chat_data, make_tiny_checkpoint

from train_mla import teacher_samples


def test_greedy_samples_equal_generate_and_rows_are_chat(tmp_path):
    make_tiny_checkpoint(tmp_path / "teacher")
    make_chat_data(tmp_path / "chat.jsonl", n=5)
    out = tmp_path / "samples_train.jsonl"
    teacher_samples.main(
        [
            str(tmp_path / "teacher"),
            str(tmp_path / "chat.jsonl"),
            str(out),
            "--temperature",
            "0",
            "--max_new_tokens",
            "12",
            "--batch_size",
            "3",
            "--samples_per_prompt",
            "2",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10
    prompts = [json.loads(line)["messages"][:1] for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert [r["messages"][:-1] for r in rows] == [p for _ in range(2) for p in prompts]  # in rounds
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32).eval()
    x = tok.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
    assert rows[0]["messages"][-1]["content"] == tok.decode(ref[0, x["input_ids"].shape[1] :], skip_special_tokens=True)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_bad_input_fails_before_the_model_loads_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"text": "no messages"})
        + "\n"
    )
    with pytest.raises(SystemExit, match="bad.jsonl row 2"):
        teacher_samples.main(["no/such-model", str(tmp_path / "bad.jsonl"), str(tmp_path / "o.jsonl")])
    (tmp_path / "o.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit, match="exists"):
        teacher_samples.main(["no/such-model", str(tmp_path / "bad.jsonl"), str(tmp_path / "o.jsonl")])
    assert (tmp_path / "o.jsonl").read_text() == "mine\n"


def test_text_format_continues_documents_greedy_as_generate(tmp_path):
    """--format text: prompts are the first prefix_tokens of each long-enough document (any source kind), the
    rows are {"text": prefix + continuation}, greedy continuations equal transformers' generate."""
    make_tiny_checkpoint(tmp_path / "teacher")
    make_chat_data(tmp_path / "chat.jsonl", n=3)
    (tmp_path / "book.txt").write_text(
        "the cat sat on the mat and looked at the dog for a long time\n\nshort\n\n"
        "a second paragraph that is long enough to give a prompt of eight tokens\n"
    )
    out = tmp_path / "text_train.jsonl"
    teacher_samples.main(
        [
            str(tmp_path / "teacher"),
            str(tmp_path / "chat.jsonl"),
            str(tmp_path / "book.txt"),
            str(out),
            "--format",
            "text",
            "--prefix_tokens",
            "8",
            "--temperature",
            "0",
            "--max_new_tokens",
            "10",
            "--batch_size",
            "4",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    docs = teacher_samples.documents_of(tmp_path / "chat.jsonl") + teacher_samples.documents_of(tmp_path / "book.txt")
    assert "short" in docs
    long_enough = [d for d in docs if len(tok(d, add_special_tokens=False)["input_ids"]) >= 8]
    assert 0 < len(rows) == len(long_enough) < len(docs)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32).eval()
    prefixes = {tok.decode(tok(d, add_special_tokens=False)["input_ids"][:8]): d for d in long_enough}
    for row in rows[:3]:
        prefix = next(p for p in prefixes if row["text"].startswith(p))
        x = torch.tensor([tok(prefixes[prefix], add_special_tokens=False)["input_ids"][:8]])
        with torch.no_grad():
            ref = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=tok.all_special_ids,
            )
        assert row["text"] == tok.decode(ref[0], skip_special_tokens=True)


def test_max_seconds_keeps_whole_batches(tmp_path):
    make_tiny_checkpoint(tmp_path / "teacher")
    make_chat_data(tmp_path / "chat.jsonl", n=6)
    out = tmp_path / "samples_train.jsonl"
    teacher_samples.main(
        [
            str(tmp_path / "teacher"),
            str(tmp_path / "chat.jsonl"),
            str(out),
            "--max_new_tokens",
            "4",
            "--batch_size",
            "2",
            "--max_seconds",
            "0",
        ]
    )
    assert out.read_text() == ""  # the time was up before the first batch: an empty, complete file
    with pytest.raises(SystemExit, match="one prompts file"):
        teacher_samples.main(
            [
                str(tmp_path / "teacher"),
                str(tmp_path / "chat.jsonl"),
                str(tmp_path / "chat.jsonl"),
                str(tmp_path / "o.jsonl"),
            ]
        )
