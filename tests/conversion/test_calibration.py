"""Activation-aware and PCA-shared-key initialisation (issue: keep the upcycled model alive)."""

import pytest
import torch
from conftest import synthetic_sentences, tiny_llama, tiny_with_calibration

from train_mla.conversion.gqa_to_mla import allocate_kv_ranks, head_rows, upcycle
from train_mla.training.arguments import MLAArguments


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_calibration(tmp_path_factory.mktemp("calib"), torch.float64)


def _args(root, **kw):
    base = dict(
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_rope_head_dim=8,
        init_method="activation",
        shared_rope_key="pca",
        kv_balance=True,
        calibration_dataset=str(root / "calib.txt"),
        calibration_samples=4,
        calibration_seq_length=32,
    )
    return MLAArguments(**{**base, **kw})


@pytest.mark.parametrize("init_method", ["activation", "output"])
def test_activation_aware_full_rank_reproduces_the_projections(tiny, init_method):
    src, tok, root = tiny
    m = upcycle(src, _args(root, shared_rope_key="mean", init_method=init_method), log=lambda *_: None, tokenizer=tok)
    nope, rope = head_rows(16, 8, "keep_pairs", m.config.rope_freq_indices)
    for i in range(3):
        s, a = src.model.layers[i].self_attn, m.model.layers[i].self_attn
        Wq = s.q_proj.weight.view(4, 16, 64)
        torch.testing.assert_close(
            (a.q_b_proj.weight @ a.q_a_proj.weight).view(4, 16, 64),
            torch.cat([Wq[:, nope], Wq[:, rope]], 1),
            atol=1e-7,
            rtol=0,
        )
        kv = (a.kv_b_proj.weight @ a.kv_a_proj_with_mqa.weight[:64]).view(4, 24, 64)
        Wk = s.k_proj.weight.view(2, 16, 64).repeat_interleave(2, 0)
        Wv = s.v_proj.weight.view(2, 16, 64).repeat_interleave(2, 0)
        torch.testing.assert_close(kv[:, :8], Wk[:, nope], atol=1e-7, rtol=0)  # balancing is undone exactly
        torch.testing.assert_close(kv[:, 8:], Wv, atol=1e-7, rtol=0)


def test_activation_aware_beats_plain_svd_on_calibration_like_data(tiny):
    src, tok, root = tiny
    x = tok(" ".join(synthetic_sentences(40, seed=99)), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        ref = src(x).logits.log_softmax(-1)

        def kl(model):
            return (ref.exp() * (ref - model(x).logits.log_softmax(-1))).sum(-1).mean().item()

        plain = upcycle(
            src,
            _args(root, q_lora_rank=8, kv_lora_rank=6, init_method="svd", shared_rope_key="mean", kv_balance=False),
            log=lambda *_: None,
            tokenizer=tok,
        )
        aware = upcycle(src, _args(root, q_lora_rank=8, kv_lora_rank=6), log=lambda *_: None, tokenizer=tok)
        assert kl(aware) < kl(plain)


def test_pca_shared_key_is_exact_when_the_heads_keys_are_proportional():
    """Per frequency pair, the rotation across KV heads keeps every RoPE dot product when one direction holds all
    the key energy; the head average (the paper) does not."""
    src = tiny_llama(dtype=torch.float64)
    with torch.no_grad():
        for layer in src.model.layers:
            K = layer.self_attn.k_proj.weight.view(2, 16, 64)
            K[1] = -2.5 * K[0]  # second KV head's keys = a multiple of the first's
    x = torch.randint(3, 97, (2, 30))
    exact = dict(q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16)  # every pair is RoPE, full ranks
    pca = upcycle(src, MLAArguments(**exact, shared_rope_key="pca"), log=lambda *_: None)
    mean = upcycle(src, MLAArguments(**exact, shared_rope_key="mean"), log=lambda *_: None)
    with torch.no_grad():
        want = src(x).logits
        torch.testing.assert_close(pca(x).logits, want, atol=1e-8, rtol=0)
        assert (mean(x).logits - want).abs().max() > 1e-2


def test_initialisation_is_deterministic(tiny):
    src, tok, root = tiny
    a = upcycle(src, _args(root, q_lora_rank=16, kv_lora_rank=8), log=lambda *_: None, tokenizer=tok).state_dict()
    b = upcycle(src, _args(root, q_lora_rank=16, kv_lora_rank=8), log=lambda *_: None, tokenizer=tok).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_without_data_is_a_clear_error(tiny, tmp_path):
    src, tok, root = tiny
    with pytest.raises(ValueError, match="calibration_dataset"):
        MLAArguments(init_method="activation")
    (tmp_path / "empty.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than one block"):
        upcycle(src, _args(root, calibration_dataset=str(tmp_path / "empty.txt")), log=lambda *_: None, tokenizer=tok)


def test_rank_allocation_gives_blocks_to_the_layers_that_need_them():
    concentrated = torch.tensor([1.0] + [1e-3] * 31)  # one direction holds the energy: rank 8 is plenty
    flat = torch.ones(32)  # every block of 8 removes a quarter of the energy
    assert allocate_kv_ranks({0: concentrated, 1: flat}, mean_rank=16, multiple=8) == {0: 8, 1: 24}
    small = torch.ones(10)  # its last block is 2 wide (a fifth of its energy); no layer exceeds its matrix rank
    ranks = allocate_kv_ranks({0: small, 1: flat, 2: concentrated}, mean_rank=20, multiple=8)
    assert ranks == {0: 10, 1: 32, 2: 18}  # flat's blocks (1/4 each), then small's (1/5), the rest to the last
    with pytest.raises(ValueError, match="rank_multiple"):
        allocate_kv_ranks({0: flat}, mean_rank=4, multiple=8)


def test_allocated_ranks_fill_the_budget_and_build_a_working_model(tiny):
    src, tok, root = tiny
    m = upcycle(
        src, _args(root, kv_lora_rank=8, allocate_kv_rank=True, rank_multiple=4), log=lambda *_: None, tokenizer=tok
    )
    ranks = [m.config.ranks(i)[1] for i in range(3)]
    assert sum(ranks) == 24 and all(r % 4 == 0 for r in ranks)
    for i, r in enumerate(ranks):
        assert m.model.layers[i].self_attn.kv_b_proj.weight.shape[1] == r
    x = torch.randint(3, 97, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(m(x).logits).all()
    with pytest.raises(ValueError, match="set only one"):
        MLAArguments(allocate_kv_rank=True, kv_energy_ratio=0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_calibration_passes_run_on_the_gpu_and_leave_the_source_where_it_was(tiny, monkeypatch):
    import train_mla.conversion.gqa_to_mla as U

    src, tok, root = tiny
    seen, real = [], U.attention_input_moments
    monkeypatch.setattr(
        U,
        "attention_input_moments",
        lambda model, *a, **k: seen.append(next(model.parameters()).device) or real(model, *a, **k),
    )
    upcycle(src, _args(root), log=lambda *_: None, tokenizer=tok)
    assert [d.type for d in seen] == ["cuda"]
    assert next(src.parameters()).device.type == "cpu"
