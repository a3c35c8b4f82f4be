"""Convert a Hugging Face DeepSeek folder into a ktjax checkpoint. See ktjax/weights/convert.py, or run with --help.

    python convert/hf_to_ktjax.py --hf-dir DIR --out DIR [--weights {source,float32,bf16,fp8}]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from ktjax.util.process import run_command  # noqa: E402  (signal handlers before the converter's imports)

if __name__ == "__main__":
    run_command("ktjax.weights.convert")
