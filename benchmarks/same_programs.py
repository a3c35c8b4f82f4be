"""Are two trees' compiled programs the same? A refactor's no-regression check that no timing noise can blur.

    python benchmarks/same_programs.py --before /tmp/before            # a `git archive`d tree against this one
    python benchmarks/same_programs.py --before /tmp/a --after /tmp/b --formats bf16 int8 int4

For each cache format, each tree compiles (in its own subprocess, with PYTHONPATH set to it) the demo model's
programs on this machine: Engine.generate's prefill chunk and decode loop over the dense cache, and the server's
decode burst and prefill step over the page pool. Their optimized HLO is compared after dropping what names
only where the code lies: source locations, stack frames, and instruction and computation numbers (renumbered
in order of appearance). "same" means XLA runs the same operations in the same order; the speed is then the
same by construction. A "differs" line gives the first differing instruction.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_DUMP = r'''
import json, sys
import ktjax
from ktjax.demo import DEMO_MODEL_DIR
from ktjax.serve.scheduler import Scheduler
out = {}
for fmt in sys.argv[1].split(","):
    e = ktjax.load(DEMO_MODEL_DIR, cache_dtype=fmt)
    cache = e.new_cache(2, e.plan_cache(2, 300))
    s = Scheduler(e, max_batch=2, n_pages=16)
    if hasattr(e, "step_programs"):  # generate through runtime/batch.py's steps
        steps = e.step_programs(cache, 2, 64, 4)
        generate = {"generate decode": steps.get(2, 1, None, 4), "generate prefill": steps.get(2, 64, None)}
    else:  # a tree before them
        generate = {"generate decode": e._decode_program(cache, 2, 4),
                    "generate prefill": e._prefill_program(cache, 2, 64, False)}
    progs = {**generate, "serve decode": s.programs.get(2, 1, 4, 4), "serve prefill": s.programs.get(2, 16, 4)}
    out.update({f"{fmt} {name}": p.as_text() for name, p in progs.items()})
json.dump(out, open(sys.argv[2], "w"))
'''


def canonical(hlo: str) -> list[str]:
    """The program's instruction lines without source locations, renumbered in order of appearance."""
    lines = []
    for line in hlo.splitlines():
        if not line.startswith(("ENTRY", "%", "  ", "}")) or re.match(r'^\s*\d+ "', line):
            continue  # the module name, file and function tables
        line = re.sub(r",? ?metadata=\{[^}]*\}", "", line)
        lines.append(re.sub(r",? ?stack_frame_id=\d+", "", line))
    names: dict[str, str] = {}

    def rename(m):
        return names.setdefault(m.group(0), f"{m.group(1)}#{len(names)}")
    return [re.sub(r"([%A-Za-z_][\w-]*)\.\d+", rename, line) for line in lines]


def dump(tree: str, formats: list[str], path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    subprocess.run([sys.executable, "-c", _DUMP, ",".join(formats), path], env=env, check=True,
                   cwd=tempfile.gettempdir())  # not the tree's parent: `import ktjax` must find `tree`
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="a tree (e.g. `git archive HEAD | tar -x -C DIR`)")
    p.add_argument("--after", default=os.path.dirname(_HERE), help="the other tree (default: this one)")
    p.add_argument("--formats", nargs="+", default=["bf16", "int8"], help="cache formats (default bf16 int8)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = dump(args.before, args.formats, os.path.join(tmp, "before.json"))
        after = dump(args.after, args.formats, os.path.join(tmp, "after.json"))
    differ = 0
    for name in before:
        a, b = canonical(before[name]), canonical(after[name])
        if a == b:
            print(f"{name}: same ({len(a)} instructions)")
            continue
        differ += 1
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"{name}: differs ({len(a)} and {len(b)} instructions), first at {i}:\n"
              f"  before: {a[i] if i < len(a) else '(end)'}\n  after:  {b[i] if i < len(b) else '(end)'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
