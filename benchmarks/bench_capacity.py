"""Per-step cost against the cache's capacity: the same prompt and tokens (the same fill) in a small and a large
cache, side by side, alternating runs. Cost should follow the fill, not the capacity.

    python benchmarks/bench_capacity.py                         # demo model, capacities 128 and 65536, bf16
    python benchmarks/bench_capacity.py --formats bf16 int8 int4 --capacities 128 65536 --tokens 64 --runs 3

Each run is `python -m ktjax.generate --json` in its own process (compilation excluded from the speeds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def run(fmt: str, capacity: int, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "ktjax.cli.generate", "--json", "--ignore-eos", "--max-new-tokens", str(tokens),
           "--cache-dtype", fmt, "--cache-lens", str(capacity)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["stats"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["bf16"])
    p.add_argument("--capacities", type=int, nargs=2, default=[128, 65536], metavar=("SMALL", "LARGE"))
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens generated per run")
    p.add_argument("--runs", type=int, default=3, help="runs per capacity (alternating); medians are reported")
    a = p.parse_args(argv)
    small, large = a.capacities
    print("| cache | capacity | decode tok/s | prefill tok/s | decode large vs small | prefill large vs small |")
    print("|---|---|---|---|---|---|")
    for fmt in a.formats:
        stats = {small: [], large: []}
        for _ in range(a.runs):
            for capacity in (small, large):
                stats[capacity].append(run(fmt, capacity, a.tokens))
        med = {c: {k: statistics.median(s[k] for s in runs) for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
               for c, runs in stats.items()}
        for c in (small, large):
            ratios = ("", "") if c == small else (
                f"{med[large]['decode_tokens_per_s'] / med[small]['decode_tokens_per_s']:.2f}x",
                f"{med[large]['prefill_tokens_per_s'] / med[small]['prefill_tokens_per_s']:.2f}x")
            print(f"| {fmt} | {stats[c][0]['cache_lens']} | {med[c]['decode_tokens_per_s']:.1f} | "
                  f"{med[c]['prefill_tokens_per_s']:.1f} | {ratios[0]} | {ratios[1]} |", flush=True)
        held = stats[large][0]["cache_lens"]
        if held != large:  # the engine never plans past the model's window (the demo's is 1024 tokens)
            print(f"note: capacity {large} was cut to {held}, the model's window", flush=True)


if __name__ == "__main__":
    main()
