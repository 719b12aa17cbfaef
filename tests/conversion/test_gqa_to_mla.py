"""SVD upcycling: exact identities at full rank, optimal truncation at rank r, and what is copied verbatim."""

import math

import pytest
import torch
from conftest import tiny_llama

from train_mla.conversion.gqa_to_mla import head_rows, upcycle
from train_mla.training.arguments import MLAArguments

H, G, HD, D = 4, 2, 16, 64


def _mla(**kw):
    base = dict(q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=8, svd_dtype="float64")
    return MLAArguments(**{**base, **kw})


@pytest.mark.parametrize("rope_init", ["keep_pairs", "xecomla"])
def test_full_rank_reproduces_query_keys_and_values(rope_init):
    src = tiny_llama(dtype=torch.float64)
    m = upcycle(src, _mla(rope_init=rope_init), log=lambda *_: None)
    cfg = m.config
    nope, rope = head_rows(HD, 8, rope_init, cfg.rope_freq_indices)
    for i in range(cfg.num_hidden_layers):
        s, a = src.model.layers[i].self_attn, m.model.layers[i].self_attn
        Wq = s.q_proj.weight.view(H, HD, D)
        q = (a.q_b_proj.weight @ a.q_a_proj.weight).view(H, HD, D)  # per head [nope | rope]
        torch.testing.assert_close(q, torch.cat([Wq[:, nope], Wq[:, rope]], 1), atol=1e-10, rtol=0)
        r = cfg.ranks(i)[1]
        kv = (a.kv_b_proj.weight @ a.kv_a_proj_with_mqa.weight[:r]).view(H, len(nope) + HD, D)
        Wk = s.k_proj.weight.view(G, HD, D).repeat_interleave(H // G, 0)  # GQA's repeat_kv
        Wv = s.v_proj.weight.view(G, HD, D).repeat_interleave(H // G, 0)
        torch.testing.assert_close(kv[:, : len(nope)], Wk[:, nope], atol=1e-10, rtol=0)
        torch.testing.assert_close(kv[:, len(nope) :], Wv, atol=1e-10, rtol=0)
        k_pe = a.kv_a_proj_with_mqa.weight[r:]
        torch.testing.assert_close(k_pe, s.k_proj.weight.view(G, HD, D)[:, rope].mean(0), atol=1e-12, rtol=0)
        assert torch.equal(a.o_proj.weight, s.o_proj.weight)
    src_sd, m_sd = src.state_dict(), m.state_dict()
    for k, v in src_sd.items():
        if "self_attn" not in k:
            assert torch.equal(v, m_sd[k]), k


def test_truncation_error_equals_discarded_singular_value_energy():
    src = tiny_llama(dtype=torch.float64)
    m = upcycle(src, _mla(q_lora_rank=20, kv_lora_rank=12), log=lambda *_: None)
    s, a = src.model.layers[1].self_attn, m.model.layers[1].self_attn
    nope, rope = head_rows(HD, 8, "keep_pairs", m.config.rope_freq_indices)
    Wq = s.q_proj.weight.view(H, HD, D)
    Wq = torch.cat([Wq[:, nope], Wq[:, rope]], 1).reshape(-1, D)
    S = torch.linalg.svdvals(Wq)
    err = (a.q_b_proj.weight @ a.q_a_proj.weight - Wq).norm() ** 2
    assert math.isclose(err.item(), S[20:].pow(2).sum().item(), rel_tol=1e-9)
    # KV: the factorised matrix is [K_nope; V] of the source heads; repeating to H heads scales energies by H/G
    Wk, Wv = s.k_proj.weight.view(G, HD, D), s.v_proj.weight.view(G, HD, D)
    M = torch.cat([Wk[:, nope], Wv], 1).reshape(-1, D)
    S = torch.linalg.svdvals(M)
    approx = (a.kv_b_proj.weight @ a.kv_a_proj_with_mqa.weight[:12]).view(H, -1, D)[:: H // G].reshape(-1, D)
    assert math.isclose((approx - M).norm().item() ** 2, S[12:].pow(2).sum().item(), rel_tol=1e-9)


def test_no_mla_layers_gives_identical_logits():
    src = tiny_llama()
    m = upcycle(src, _mla(mla_layers=[]), log=lambda *_: None)
    x = torch.randint(3, 97, (2, 13))
    with torch.no_grad():
        assert torch.equal(src(x).logits, m(x).logits)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        None,
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_single_kv_head_full_rope_is_function_preserving(rope_parameters):
    """With one KV head, RoPE on every pair and full ranks, keep_pairs MLA is exactly the source model,
    including Llama-3 rope scaling: the RoPE key uses the source's own (scaled) frequencies."""
    kw = {"rope_parameters": rope_parameters} if rope_parameters else {}
    src = tiny_llama(dtype=torch.float64, num_key_value_heads=1, **kw)
    m = upcycle(src, _mla(qk_rope_head_dim=HD, kv_lora_rank=32), log=lambda *_: None)
    x = torch.randint(3, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, src(x).logits, atol=1e-9, rtol=0)


def test_hybrid_layers_keep_gqa_and_mla_changes_only_its_layers():
    src = tiny_llama()
    m = upcycle(src, _mla(mla_layers=[1], kv_lora_rank=16), log=lambda *_: None)
    assert type(m.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert type(m.model.layers[1].self_attn).__name__ == "MLAAttention"
    assert m.config.layer_ranks == {"1": {"q_lora_rank": 64, "kv_lora_rank": 16}}


def test_dynamic_ranks_follow_energy_and_first_last_stay_fixed():
    src = tiny_llama(dtype=torch.float64, num_hidden_layers=4)
    args = _mla(q_lora_rank=64, kv_lora_rank=40, q_energy_ratio=0.5, kv_energy_ratio=0.5, rank_multiple=4)
    m = upcycle(src, args, log=lambda *_: None)
    ranks = {int(k): (v["q_lora_rank"], v["kv_lora_rank"]) for k, v in m.config.layer_ranks.items()}
    assert ranks[0] == (64, 40) and ranks[3] == (64, 40)  # the configured ranks, not a neighbour's
    for i in (1, 2):
        s = src.model.layers[i].self_attn
        nope, rope = head_rows(HD, 8, "keep_pairs", m.config.rope_freq_indices)
        Wq = s.q_proj.weight.view(H, HD, D)
        S2 = torch.linalg.svdvals(torch.cat([Wq[:, nope], Wq[:, rope]], 1).reshape(-1, D)).pow(2)
        k = int((S2.cumsum(0) / S2.sum() < 0.5).sum()) + 1  # smallest k holding half the energy
        assert ranks[i][0] == 4 * math.ceil(k / 4)
        assert m.model.layers[i].self_attn.q_a_proj.weight.shape[0] == ranks[i][0]
        assert m.model.layers[i].self_attn.kv_b_proj.weight.shape[1] == ranks[i][1]


def test_kv_rank_above_source_rank_pads_trainable_directions():
    # [K_nope; V] of 2 KV heads has 2 * (8 + 16) = 48 rows; ask for 64 latent dims
    src = tiny_llama(dtype=torch.float64)
    m = upcycle(src, _mla(kv_lora_rank=64), log=lambda *_: None)
    a = m.model.layers[0].self_attn
    up = a.kv_b_proj.weight
    assert a.kv_a_proj_with_mqa.weight[48:64].abs().max() == 0
    assert up[:, 48:].norm(dim=0).min() > 0.5  # fresh directions get gradients through the product


def test_non_llama_and_bias_sources_are_refused():
    src = tiny_llama(attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        upcycle(src, _mla(), log=lambda *_: None)


def test_latent_norms_of_the_exportable_layout_keep_the_fitted_scale(tmp_path, monkeypatch):
    """RMSNorm on the latents (DeepSeek-V3 layout) is initialised to the latents' typical rms, so the exportable model
    stays as close to the source as the one without norms; weights of ones (the old init) drift away."""
    from conftest import tiny_with_calibration

    import train_mla.conversion.gqa_to_mla as U

    src, tok, root = tiny_with_calibration(tmp_path, torch.float32)
    x = torch.randint(3, 300, (4, 48))
    with torch.no_grad():
        ref = torch.log_softmax(src(x).logits, -1)

    def kl(**kw):
        args = MLAArguments(
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            rope_freq_indices=list(range(8)),
            init_method="activation",
            calibration_dataset=str(root / "calib.txt"),
            calibration_samples=8,
            calibration_seq_length=64,
            **kw,
        )
        with torch.no_grad():
            lp = torch.log_softmax(U.upcycle(src, args, log=lambda *_: None, tokenizer=tok)(x).logits, -1)
        return (ref.exp() * (ref - lp)).sum(-1).mean().item()

    plain, calibrated = kl(), kl(use_lora_layer_norm=True)
    monkeypatch.setattr(U, "latent_rms", lambda down, C: torch.ones((), dtype=torch.float64))
    ones = kl(use_lora_layer_norm=True)
    assert calibrated - plain < 0.25 * (ones - plain), (plain, calibrated, ones)
