"""Upcycle a Llama-family model to MLA without training: `python -m train_mla.upcycle [recipe.yaml] [--key value ...]
--output DIR`. The conversion itself is train_mla/conversion/gqa_to_mla.py.

With `--torch_dtype float32 --output RUN/upcycled` it writes the folder stage 1 would write, which `train_distill.py
RECIPE --output_dir RUN` then reuses: upcycle once, e.g. while the GPU does something else, and train from it.
"""

from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.conversion.upcycled_folder import save_mla_checkpoint, upcycle_record
from train_mla.model.kv_cache_size import format_kv_table, kv_cache_table
from train_mla.training.arguments import MLAArguments, ModelArguments, UpcycleOutput


def main(argv=None):
    from train_mla.model.loading import ModelNotFoundError, dtype_of, load_causal_lm, load_tokenizer
    from train_mla.training.hardware import fit_attention_to_machine
    from train_mla.training.recipe import RecipeError, parse_recipe
    from train_mla.training.run_folder import refuse_existing_output

    try:
        model_args, mla, out_args = parse_recipe(
            (ModelArguments, MLAArguments, UpcycleOutput),
            argv,
            prog="python -m train_mla.upcycle",
            description="Convert a Llama-family checkpoint to MLA by SVD and save it, without training.",
            ignore_unknown_from="train_distill",
        )
        if not out_args.output:
            raise RecipeError("--output DIR is required")
        refuse_existing_output(out_args.output, overwrite=False)
        if problem := mla.calibration_problem():
            raise RecipeError(problem)
        if note := fit_attention_to_machine(model_args):
            print(note, flush=True)
        print(f"Loading {model_args.model_name_or_path} ...", flush=True)
        source = load_causal_lm(
            model_args.model_name_or_path, "float32", model_args.attn_implementation, model_args.model_revision
        )
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    except (RecipeError, ModelNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    model = upcycle(source, mla, tokenizer=tokenizer).to(dtype_of(model_args.torch_dtype))  # factorised in float32
    save_mla_checkpoint(model, tokenizer, out_args.output, source.config, extra=upcycle_record(model_args, mla))
    print(format_kv_table(kv_cache_table(source.config, model.config)))
    print(f"Saved MLA checkpoint to {out_args.output}")


if __name__ == "__main__":
    main()
