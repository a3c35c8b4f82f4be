"""`python -m ktjax.chat`: a conversation with a model in the terminal (ktjax/cli/chat.py). Signal handlers come
first, so that Ctrl-C while JAX is being imported stops cleanly too."""
from ktjax.util.process import run_command

if __name__ == "__main__":
    run_command("ktjax.cli.chat", huge_pages=True)
