"""Convert a Hugging Face DeepSeek folder into a ktjax checkpoint. See ktjax/convert.py, or run with --help.

    python convert/hf_to_ktjax.py --hf-dir DIR --out DIR [--weights {source,float32,bf16,fp8}]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from ktjax.convert import main  # noqa: E402  (main turns SIGTERM into a clean interruption, as Ctrl-C)


if __name__ == "__main__":
    sys.exit(main())
