import importlib.util
import sys

from ktjax.demo.train import main

# optax is the train extra's only dependency (pyproject.toml): say so before any work, not as a traceback mid-run.
MISSING_OPTAX = "error: python -m ktjax.train needs optax: pip install -e '.[train]' (or: pip install optax)"

if importlib.util.find_spec("optax") is None and not {"-h", "--help"} & set(sys.argv[1:]):
    print(MISSING_OPTAX, file=sys.stderr)
    sys.exit(2)
main()
