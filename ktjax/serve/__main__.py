"""`python -m ktjax.serve`: the OpenAI-compatible server (ktjax/cli/serve.py). Signal handlers come first, so
that Ctrl-C while JAX and uvicorn are imported stops cleanly too."""
from ktjax.util.process import run_command

if __name__ == "__main__":
    run_command("ktjax.cli.serve", huge_pages=True)
