"""`python -m ktjax.convert`: Hugging Face folder -> ktjax checkpoint (ktjax/weights/convert.py). Signal handlers
come first, so that Ctrl-C while the converter's modules are imported stops cleanly too."""
from ktjax.util.process import run_command

if __name__ == "__main__":
    run_command("ktjax.weights.convert")
