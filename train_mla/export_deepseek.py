"""Export an MLA checkpoint to the stock DeepSeek-V3 format (`DeepseekV3ForCausalLM`, dense MLPs only).

    python -m train_mla.export_deepseek CKPT OUT

What is exported and what is refused: train_mla/conversion/deepseek_export.py.
"""

import argparse
import sys

from train_mla.conversion.deepseek_export import ExportError, export_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="MLA checkpoint directory (LlamaMLAForCausalLM)")
    p.add_argument("output", help="new directory for the DeepSeek-V3 checkpoint")
    a = p.parse_args(argv)
    try:
        export_checkpoint(a.checkpoint, a.output)
    except ExportError as e:
        raise SystemExit(f"error: cannot export {a.checkpoint} to DeepSeek-V3: {e}") from None
    print(f"wrote a DeepseekV3ForCausalLM checkpoint to {a.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
