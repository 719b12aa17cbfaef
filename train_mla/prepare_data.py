"""Tokenise and pack a stage-1 recipe's data ahead of training, into the cache that `train_distill.py` reads: on a
CPU machine before a GPU job, or beside the upcycling at the start of one, so that the GPU's time goes to training.

    python -m train_mla.prepare_data RECIPE [--key value ...]   (the overrides the training command will get)

The cache's key holds every data setting, the tokenizer, the seed and the files' modification times, so the
training command finds this work only when it would have done the same; otherwise it tokenises again itself.
"""


def main(argv=None):
    from train_mla.model.loading import ModelNotFoundError, load_tokenizer
    from train_mla.training.arguments import DataArguments, ModelArguments, PrepareDataSettings
    from train_mla.training.data import prepare_lm_dataset
    from train_mla.training.recipe import RecipeError, parse_recipe

    try:
        model_args, data_args, settings = parse_recipe(
            (ModelArguments, DataArguments, PrepareDataSettings),
            argv,
            prog="python -m train_mla.prepare_data",
            description="Tokenise and pack a stage-1 recipe's data into the cache train_distill.py reads.",
            ignore_unknown_from="train_distill",
        )
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, data_args.chat_template)
        data = prepare_lm_dataset(data_args, tokenizer, seed=settings.seed, log=lambda m: print(m, flush=True))
    except (RecipeError, ModelNotFoundError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    length = data_args.max_seq_length if data_args.packing else "up to " + str(data_args.max_seq_length)
    print(", ".join(f"{split}: {len(d)} blocks of {length} tokens" for split, d in data.items()), flush=True)


if __name__ == "__main__":
    main()
