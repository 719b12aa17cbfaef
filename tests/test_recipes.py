"""Every shipped recipe parses and validates; a misspelled key or a bad value fails with a message naming it."""


import pytest

from conftest import REPO
from train_mla.arguments import DataArguments, DistillConfig, MLAArguments, ModelArguments
from train_mla.recipe import RecipeError, parse_recipe
from train_mla.train_dpo import DPOArguments, PreferenceDataArguments

DISTILL = (ModelArguments, MLAArguments, DataArguments, DistillConfig)
DPO = (ModelArguments, PreferenceDataArguments, DPOArguments)
RECIPES = sorted(p for p in REPO.glob("*/*.yaml") if p.parent.name not in (".ci", "tests", "eval_tasks"))


def _types(path):
    return DPO if "dpo" in path.name else DISTILL


def test_there_are_recipes_for_each_model_folder():
    folders = {p.parent.name for p in RECIPES}
    assert {"llama3.2_1B", "llama3.2_3B", "smollm2_135M"} <= folders
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    for want in ["llama3.2_1B/mla_kv_rank_64_8bt.yaml", "llama3.2_1B/mla_kv_rank_128_8bt.yaml",
                 "llama3.2_1B/mla_kv_rank_48_8bt.yaml", "llama3.2_1B/mla_kv_rank_64_1bt.yaml",
                 "llama3.2_1B/mla_kv_rank_64_3bt.yaml", "llama3.2_1B/dpo.yaml", "llama3.2_3B/mla_kv_rank_96_8bt.yaml",
                 "llama3.2_3B/dpo.yaml", "llama3.2_1B/mla_dynamic_0.95_1bt.yaml",
                 "llama3.2_1B/mla_kv_rank_64_pretrain.yaml"]:
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
    _, mla, data, args = parse_recipe(DISTILL, [str(path), "--kv_lora_rank", "128", "--learning_rate=2e-5",
                                                "--bf16", "false"])
    assert mla.kv_lora_rank == 128 and args.learning_rate == 2e-5
    with pytest.raises(RecipeError, match="rope_init"):
        parse_recipe(DISTILL, [str(path), "--rope_init", "magic", "--bf16", "false"])
    with pytest.raises(RecipeError, match="dataset_mixer"):
        parse_recipe(DISTILL, [str(path), "--dataset_mixer", "{a: 2.0}", "--bf16", "false"])
    with pytest.raises(RecipeError, match="does not exist"):
        parse_recipe(DISTILL, ["no/such/recipe.yaml"])
