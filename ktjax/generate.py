"""`python -m ktjax.generate`: the main command (ktjax/cli/generate.py). Signal handlers come first, so that
Ctrl-C while JAX is being imported stops cleanly too."""
from ktjax.util.process import run_command

if __name__ == "__main__":
    run_command("ktjax.cli.generate", huge_pages=True)
