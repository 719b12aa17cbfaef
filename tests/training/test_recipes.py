"""Every shipped recipe parses and validates; a misspelled key or a bad value fails with a message naming it."""

import pytest
from conftest import REPO

from train_mla.training.arguments import (
    DataArguments,
    DistillConfig,
    DPOArguments,
    MLAArguments,
    ModelArguments,
    PreferenceDataArguments,
)
from train_mla.training.recipe import RecipeError, parse_recipe

DISTILL = (ModelArguments, MLAArguments, DataArguments, DistillConfig)
DPO = (ModelArguments, PreferenceDataArguments, DPOArguments)
RECIPES = sorted(
    p
    for p in REPO.glob("*/*.yaml")
    if p.parent.name not in (".ci", "tests", "eval_tasks") and not p.name.startswith("default_run")
)


def _types(path):
    return DPO if "dpo" in path.name else DISTILL


def test_there_are_recipes_for_each_model_folder():
    folders = {p.parent.name for p in RECIPES}
    assert {"llama3.2_1B", "llama3.2_3B", "smollm2_135M"} <= folders
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    for want in [
        "llama3.2_1B/mla_kv_rank_64_8bt.yaml",
        "llama3.2_1B/mla_kv_rank_128_8bt.yaml",
        "llama3.2_1B/mla_kv_rank_48_8bt.yaml",
        "llama3.2_1B/mla_kv_rank_64_1bt.yaml",
        "llama3.2_1B/mla_kv_rank_64_3bt.yaml",
        "llama3.2_1B/dpo.yaml",
        "llama3.2_3B/mla_kv_rank_96_8bt.yaml",
        "llama3.2_3B/dpo.yaml",
        "llama3.2_1B/mla_dynamic_0.95_1bt.yaml",
        "llama3.2_1B/mla_kv_rank_64_pretrain.yaml",
    ]:
        assert want in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_and_validates(path, tmp_path):
    parsed = parse_recipe(_types(path), [str(path), "--output_dir", str(tmp_path / "o"), "--bf16", "false"])
    assert parsed[0].model_name_or_path
    if "dpo" not in path.name:
        mla = parsed[1]
        assert mla.kv_lora_rank >= 1 and mla.qk_rope_head_dim % 2 == 0


@pytest.mark.parametrize("path", [REPO / "llama3.2_1B" / "mla_kv_rank_64_8bt.yaml", REPO / "llama3.2_1B" / "dpo.yaml"])
def test_misspelled_key_and_bad_value_are_named(path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text() + "\nlearnig_rate: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'learnig_rate'.*did you mean 'learning_rate'"):
        parse_recipe(_types(path), [str(bad)])
    with pytest.raises(RecipeError, match="per_device_train_batch_size"):
        parse_recipe(_types(path), [str(path), "--per_device_train_batch_size", "many"])
    with pytest.raises(RecipeError, match="learning_rate"):
        parse_recipe(_types(path), [str(path), "--learning_rate", "[1, 2]"])


def test_cli_overrides_win_and_values_are_checked():
    path = REPO / "llama3.2_1B" / "mla_kv_rank_64_8bt.yaml"
    _, mla, data, args = parse_recipe(
        DISTILL, [str(path), "--kv_lora_rank", "128", "--learning_rate=2e-5", "--bf16", "false"]
    )
    assert mla.kv_lora_rank == 128 and args.learning_rate == 2e-5
    with pytest.raises(RecipeError, match="rope_init"):
        parse_recipe(DISTILL, [str(path), "--rope_init", "magic", "--bf16", "false"])
    with pytest.raises(RecipeError, match="dataset_mixer"):
        parse_recipe(DISTILL, [str(path), "--dataset_mixer", "{a: 2.5}", "--bf16", "false"])
    with pytest.raises(RecipeError, match="does not exist"):
        parse_recipe(DISTILL, ["no/such/recipe.yaml"])


# ---------------------------------------------------------------- run lifecycle: flags, YAML, checkpoints, lock


def _distill(argv):
    from train_mla.training.arguments import DISTILL_RECIPE
    from train_mla.training.recipe import parse_recipe

    return parse_recipe(DISTILL_RECIPE, argv)


def _minimal(tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "x/y",
                "dataset_mixer": {"a.jsonl": 1.0},
                "use_cpu": True,
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    return str(path)


def test_a_flag_without_a_value_is_an_error_unless_the_key_is_boolean(tmp_path):
    from train_mla.training.recipe import RecipeError

    recipe = _minimal(tmp_path)
    with pytest.raises(RecipeError, match=r"'--output_dir' has no value"):
        _distill([recipe, "--output_dir"])
    with pytest.raises(RecipeError, match=r"'--kv_lora_rank' has no value"):
        _distill([recipe, "--kv_lora_rank", "--packing", "false"])
    assert _distill([recipe, "--kv_balance"])[1].kv_balance is True


def test_malformed_yaml_and_command_line_typos_name_their_place(tmp_path):
    from train_mla.training.recipe import RecipeError

    bad = tmp_path / "bad.yaml"
    bad.write_text("kv_lora_rank: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*not valid YAML"):
        _distill([str(bad)])
    with pytest.raises(RecipeError, match=r"'kv_lora_rnak' on the command line"):
        _distill([_minimal(tmp_path), "--kv_lora_rnak", "8"])


def _save_ckpt(path, step, complete=True):
    import json

    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.ones(64)}, path / "model.safetensors")
    (path / "config.json").write_text("{}")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_bad_ones(tmp_path, caplog):
    import types

    from train_mla.training.run_folder import resume_point

    out = tmp_path / "run"
    _save_ckpt(out / "checkpoint-10", 10)
    _save_ckpt(out / "checkpoint-20", 20)
    _save_ckpt(out / "checkpoint-30", 30, complete=False)  # killed before trainer_state.json
    data = (out / "checkpoint-20" / "model.safetensors").read_bytes()
    (out / "checkpoint-20" / "model.safetensors").write_bytes(data[:-40])  # truncated weights
    (out / "checkpoint-40").mkdir()  # empty
    args = types.SimpleNamespace(resume_from_checkpoint=None, output_dir=str(out), overwrite_output_dir=False)
    with caplog.at_level("WARNING", logger="train_mla"):
        assert resume_point(args) == str(out / "checkpoint-10")
    text = caplog.text
    assert "checkpoint-40" in text and "checkpoint-30" in text and "trainer_state.json is missing" in text
    assert "checkpoint-20" in text and "model.safetensors" in text and "cut short" in text

    # a final save cut short (config written, weights not) resumes from the checkpoint instead of refusing
    (out / "config.json").write_text("{}")
    assert resume_point(args) == str(out / "checkpoint-10")
    _save_ckpt(tmp_path / "whole", 0)  # a complete final model is refused
    (tmp_path / "whole" / "trainer_state.json").unlink()
    for name in ("tokenizer_config.json", "README.md"):
        (tmp_path / "whole" / name).write_text("{}")
    args.output_dir = str(tmp_path / "whole")
    from train_mla.training.recipe import RecipeError

    with pytest.raises(RecipeError, match="finished model"):
        resume_point(args)


def test_a_final_save_killed_before_the_tokenizer_or_card_is_not_a_finished_model(tmp_path, caplog):
    import types

    from train_mla.training.run_folder import resume_point

    out = tmp_path / "run"
    _save_ckpt(out / "checkpoint-30", 30)
    _save_ckpt(out / "final", 30, complete=False)
    for f in (out / "final").iterdir():  # config and whole weights, killed before the tokenizer and model card
        f.rename(out / f.name)
    (out / "final").rmdir()
    (out / "upcycled.tmp-999999999").mkdir()  # killed while the upcycled model was written (process gone)
    args = types.SimpleNamespace(resume_from_checkpoint=None, output_dir=str(out), overwrite_output_dir=False)
    with caplog.at_level("WARNING", logger="train_mla"):
        assert resume_point(args) == str(out / "checkpoint-30")
    assert "tokenizer_config.json and README.md missing" in caplog.text
    assert "upcycled.tmp-999999999" in caplog.text and not (out / "upcycled.tmp-999999999").exists()


@pytest.mark.parametrize("damage", ["null", "{}", "zeros"])
def test_damaged_checkpoint_state_is_skipped_for_the_previous_one(tmp_path, caplog, damage):
    import types

    import torch

    from train_mla.training.run_folder import resume_point

    out = tmp_path / "run"
    _save_ckpt(out / "checkpoint-10", 10)
    _save_ckpt(out / "checkpoint-20", 20)
    for c in ("checkpoint-10", "checkpoint-20"):
        torch.save({"state": {}}, out / c / "optimizer.pt")
    if damage == "zeros":  # what a power loss leaves: the right length, all zeros
        opt = out / "checkpoint-20" / "optimizer.pt"
        opt.write_bytes(bytes(opt.stat().st_size))
    else:
        (out / "checkpoint-20" / "trainer_state.json").write_text(damage)
    args = types.SimpleNamespace(resume_from_checkpoint=None, output_dir=str(out), overwrite_output_dir=False)
    with caplog.at_level("WARNING", logger="train_mla"):
        assert resume_point(args) == str(out / "checkpoint-10")
    assert "checkpoint-20" in caplog.text
    assert ("optimizer.pt is not a torch.save archive" if damage == "zeros" else "no global_step") in caplog.text


def test_one_run_per_output_dir(tmp_path, caplog):
    import json
    import os
    import socket
    import subprocess
    import sys

    from train_mla.training.recipe import RecipeError
    from train_mla.training.run_folder import OutputLock

    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process holds it
    with pytest.raises(RecipeError, match=r"in use by process"):
        OutputLock(out).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": host}))
    lock = OutputLock(out)
    with caplog.at_level("WARNING", logger="train_mla"):
        lock.acquire()
    assert "stale lock" in caplog.text and json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / ".lock").exists()


def test_lock_left_empty_by_a_kill_is_taken_over_and_bad_folders_are_one_line(tmp_path, caplog):
    import os

    from train_mla.training.recipe import RecipeError
    from train_mla.training.run_folder import OutputLock

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_bytes(b"")  # killed between creating the lock and writing it
    lock = OutputLock(out)
    with caplog.at_level("WARNING", logger="train_mla"):
        lock.acquire()
    assert "empty or unreadable" in caplog.text
    lock.release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match="exists and is not a directory"):
        OutputLock(tmp_path / "file").acquire()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(RecipeError, match="cannot be written"):
            OutputLock(ro / "run").acquire()
    fresh = tmp_path / "checkpoints" / "new_run"  # a run that fails before writing anything leaves no folder
    lock = OutputLock(fresh)
    lock.acquire()
    lock.release()
    assert not fresh.exists() and (tmp_path / "checkpoints").exists()


def test_a_key_written_twice_in_a_recipe_is_refused(tmp_path):
    from train_mla.training.arguments import DataArguments
    from train_mla.training.recipe import RecipeError, parse_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset_mixer: {a.jsonl: 1.0}\nmax_seq_length: 128\nmax_seq_length: 256\n")
    with pytest.raises(RecipeError, match=r"key 'max_seq_length' appears twice \(lines 2 and 3\)"):
        parse_recipe((DataArguments,), [str(recipe)])


def test_bad_dataset_files_are_named_with_the_row(tmp_path):
    from train_mla.training.data import mix_datasets

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty"):
        mix_datasets({str(empty): 1.0}, ["train"], columns=("messages", "text"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": null}\n')
    with pytest.raises(
        ValueError, match=r"rows\.jsonl.*row 1 \(counting from 0\) has no non-empty 'text', or 'messages'"
    ):
        mix_datasets({str(rows): 1.0}, ["train"], columns=("messages", "text"))
    for bad in ('{"messages": "hello"}', '{"messages": [{"role": "user", "content": 1}]}'):
        rows.write_text(bad + "\n")
        with pytest.raises(ValueError, match=r"row 0 .*'messages' as a list of \{'role': str, 'content': str\}"):
            mix_datasets({str(rows): 1.0}, ["train"], columns=("messages", "text"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl' line 2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        mix_datasets({str(latin): 1.0}, ["train"], columns=("messages", "text"))
    with pytest.raises(FileNotFoundError, match=r"python -m train_mla\.sharegpt --output_dir .*data/sharegpt`"):
        mix_datasets({str(tmp_path / "data/sharegpt/chat_train.jsonl"): 1.0}, ["train"], columns=("messages", "text"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_flex_attention_recipes_train_through_sdpa_without_a_gpu():
    from train_mla.training.hardware import fit_attention_to_machine

    model_args = parse_recipe(
        DISTILL, [str(REPO / "smollm2_135M/mla_kv_rank_80_rope_16.yaml"), "--output_dir", "unused", "--bf16", "false"]
    )[0]
    assert model_args.attn_implementation == "flex_attention"  # the recipe's GPU setting
    note = fit_attention_to_machine(model_args)
    assert model_args.attn_implementation == "sdpa" and "flex_attention -> sdpa" in note
    assert fit_attention_to_machine(model_args) is None  # nothing left to change
    model_args.attn_implementation = "flex_attention"
    assert fit_attention_to_machine(model_args, on_gpu=True) is None  # a GPU run keeps it
    assert model_args.attn_implementation == "flex_attention"
    assert fit_attention_to_machine(model_args, on_gpu=False) and model_args.attn_implementation == "sdpa"  # use_cpu
    for zero_stage, compiled, kept in ((2, True, True), (None, True, True), (3, False, True), (3, True, False)):
        model_args.attn_implementation = "flex_attention"
        note = fit_attention_to_machine(model_args, on_gpu=True, zero_stage=zero_stage, compiled=compiled)
        assert (model_args.attn_implementation == "flex_attention") == kept and (note is None) == kept
    assert "ZeRO-3" in note and "--zero_stage 2" in note  # compiled layers under ZeRO-3: SDPA, and how to keep flex


def test_liger_loss_falls_back_to_chunked_off_a_gpu_and_under_zero3():
    from train_mla.training.hardware import fit_loss_to_machine

    args = parse_recipe(
        DISTILL,
        [
            str(REPO / "smollm2_135M/mla_kv_rank_80_rope_16.yaml"),
            "--output_dir",
            "unused",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
        ],
    )[-1]
    assert args.loss_implementation == "liger"  # the recipe's GPU setting
    assert fit_loss_to_machine(args, on_gpu=True, zero_stage=2) is None and args.loss_implementation == "liger"
    assert fit_loss_to_machine(args, on_gpu=True, zero_stage=None) is None and args.loss_implementation == "liger"
    note = fit_loss_to_machine(args, on_gpu=True, zero_stage=3)
    assert args.loss_implementation == "chunked" and "ZeRO-3" in note
    args.loss_implementation = "liger"
    note = fit_loss_to_machine(args, on_gpu=False, zero_stage=2)
    assert args.loss_implementation == "chunked" and "CPU" in note
    assert fit_loss_to_machine(args, on_gpu=False, zero_stage=2) is None  # nothing left to change


def test_teacher_fp8_under_zero3_is_refused_before_any_model_loads():
    from train_mla.training.hardware import check_teacher_fp8
    from train_mla.training.recipe import RecipeError

    args = parse_recipe(
        DISTILL,
        [
            str(REPO / "smollm2_135M/mla_kv_rank_80_rope_16.yaml"),
            "--output_dir",
            "unused",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--teacher_fp8",
            "true",
        ],
    )[-1]
    assert args.teacher_fp8
    check_teacher_fp8(args, on_gpu=False, zero_stage=2)  # CPU (torch._scaled_mm runs there) and ZeRO-2: fine
    check_teacher_fp8(args, on_gpu=False, zero_stage=None)
    with pytest.raises(RecipeError, match="teacher_fp8.*ZeRO-3"):
        check_teacher_fp8(args, on_gpu=False, zero_stage=3)
    args.teacher_fp8 = False
    check_teacher_fp8(args, on_gpu=False, zero_stage=3)  # off: nothing to check


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_default_run_settings_and_their_overrides_parse(kind, tmp_path):
    """run_default.sh's two settings recipes parse, and every override they add is a valid key and value of the
    stage-1 and DPO recipes they run (QUICK=1's too), so a typo fails here and not minutes into a run."""
    from train_mla.training.arguments import DefaultRunSettings

    (s,) = parse_recipe((DefaultRunSettings,), [str(REPO / "smollm2_135M" / f"default_run_{kind}.yaml")])
    out = ["--output_dir", str(tmp_path / "o"), "--bf16", "false"]
    for recipe, types, extra in [
        (s.recipe, DISTILL, s.stage1_args + s.quick_stage1_args),
        (s.dpo_recipe, DPO, s.dpo_args + s.quick_dpo_args),
    ]:
        parse_recipe(types, [str(REPO / recipe), *extra, *out])
    if s.paper_init_recipe:
        parse_recipe(DISTILL, [str(REPO / s.paper_init_recipe), *out])
    with pytest.raises(RecipeError, match="launcher"):
        parse_recipe(
            (DefaultRunSettings,), [str(REPO / "smollm2_135M" / f"default_run_{kind}.yaml"), "--launcher", "srun"]
        )
