"""Every command in the README's code blocks refers to files that exist."""

import re
import shlex

from conftest import REPO

OUTPUTS = ("checkpoints/", "runs/", "outputs/", "docs/summary", "data/")


def _commands():
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line:
                yield line


def test_readme_commands_reference_existing_files():
    cmds = list(_commands())
    assert any("train_distill.py llama3.2_1B/mla_kv_rank_64_8bt.yaml" in c for c in cmds)
    assert any("train_dpo.py llama3.2_1B/dpo.yaml" in c for c in cmds)
    assert "bash install.sh" in cmds
    ci = [line.split("#")[0].strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    ci_tests = [line for line in ci if line.startswith("python -m pytest")]
    assert ci_tests and all(line in cmds for line in ci_tests)  # CI runs the README's test command, as written
    checked = 0
    for cmd in cmds:
        for tok in shlex.split(cmd):
            if "=" in tok or tok.startswith("-") or tok.startswith(OUTPUTS):
                continue
            if tok.endswith((".py", ".sh", ".yaml")) or ("/" in tok and not tok.startswith("http")):
                assert (REPO / tok).exists(), f"README command {cmd!r} names {tok!r}, which does not exist"
                checked += 1
        for module in re.findall(r"-m (train_mla\.\w+)", cmd):
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    assert checked >= 8


def test_readme_recipe_table_names_existing_recipes():
    text = (REPO / "README.md").read_text()
    for path in set(re.findall(r"`((?:llama3\.2_[13]B|smollm2_135M)/[\w.]+\.yaml)`", text)):
        assert (REPO / path).is_file(), path
