"""One decode step of the server's compiled program (forward over the paged cache, per-row sampling and top-20
logprobs) timed directly at a few batch sizes: the figures of docs/results.md, "Decode step".

    python benchmarks/bench_step.py                                # bench_generate's 2-layer V2-Lite-width model
    python benchmarks/bench_step.py --rows 1 16 --weight-layout in-out --moe-impl gather
    python benchmarks/bench_step.py --trace /tmp/trace             # also a jax.profiler trace of each
    python benchmarks/bench_step.py --weights int8 --cpu-kernels off   # XLA's dot on int8 weights
    python benchmarks/bench_step.py --weights int4 --lm-head int8 --activation-quant int8   # integer products

Best of --repeats steps after a warm one; run it on a quiet machine. Each line also gives the weight bytes the
step must read and the ceiling they set on batching (WeightBytes): n rows' tokens/s over one row's when both read
their weights at the same rate and do nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate  # noqa: E402  (the model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_generate.add_model_args(p)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=100, help="tokens already in each row's cache")
    p.add_argument("--cache-dtype", default="bf16")
    p.add_argument("--moe-impl", default="auto")
    p.add_argument("--weight-layout", help="in-out or out-in (unset: the default; older checkouts have no setting)")
    p.add_argument("--cpu-kernels", help="auto, on or off (unset: the default; older checkouts have no setting)")
    p.add_argument("--attention", help="auto or xla (unset: the default; auto runs decode attention in the C++ "
                                       "kernel where cpu_kernels run)")
    p.add_argument("--activation-quant", help="off or int8 (int8/int4 weights: the kernels' int8-activation path)")
    p.add_argument("--weights", default="float32", help="float32, int8 or int4 (converted with convert/hf_to_ktjax.py)")
    p.add_argument("--lm-head", default=None, help="int8: also quantize lm_head (older checkouts have no flag)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace", help="write a jax.profiler trace of each batch size under this folder")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import ktjax
    from ktjax.runtime.decode import RowSampling
    from ktjax.serve.scheduler import Scheduler

    with tempfile.TemporaryDirectory() as folder:
        bench_generate.build(os.path.join(folder, "hf"), a)
        converted = bench_generate.convert_checkpoint(os.path.join(folder, "hf"), os.path.join(folder, "kt"),
                                                      a.weights, a.lm_head)
        settings = {k: v for k, v in (("weight_layout", a.weight_layout), ("cpu_kernels", a.cpu_kernels),
                                      ("attention", a.attention), ("activation_quant", a.activation_quant))
                    if v}
        engine = ktjax.load(converted, cache_dtype=a.cache_dtype, moe_impl=a.moe_impl, **settings)
    weight_bytes = WeightBytes.of(engine)
    page = 64
    per_row = -(-(a.context + 1) // page)
    sched = Scheduler(engine, max_batch=max(a.rows), page_size=page, n_pages=max(a.rows) * per_row + 8)
    pool = sched.pool
    for b in a.rows:
        width = max(sched.programs.widths[0], per_row)
        program = sched.programs.get(b, 1, width, sched.programs.stops)
        table = (np.arange(b * width).reshape(b, width) % pool.n_pages).astype(np.int32)
        cache = pool.with_table(jnp.asarray(table))
        tokens = jnp.asarray(np.random.default_rng(0).integers(2, min(a.vocab, 2048), (b,)), jnp.int32)
        lengths = jnp.full((b,), a.context, jnp.int32)  # the step writes position `context`
        rows = RowSampling(jnp.zeros(b), jnp.zeros(b, jnp.int32), jnp.ones(b), jnp.zeros(b, jnp.uint32),
                           jnp.zeros(b, jnp.int32), jnp.ones(b, bool))  # with top-20 logprobs
        stops = jnp.full((b, sched.programs.stops), -1, jnp.int32)  # one step, whatever it samples
        args = (tokens, lengths, jnp.ones((b,), jnp.int32), stops, rows, jnp.int32(1))
        times = []
        for i in range(a.repeats + 1):
            t = time.perf_counter()
            cache, out = program(engine.state, cache, *args)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
        if a.trace:
            with jax.profiler.trace(os.path.join(a.trace, f"rows{b}")):
                cache, out = program(engine.state, cache, *args)
                jax.block_until_ready(out)
        pool = dataclasses.replace(cache, page_table=pool.page_table)
        best = min(times[1:])
        print(f"{b:3d} rows: {best * 1e3:7.1f} ms per step, {b / best:6.1f} tokens/s; weights read "
              f"{weight_bytes.per_step(b) / 1e6:.0f} MB, at most {weight_bytes.ceiling(b):.2f}x one row's tokens/s "
              "at equal bandwidth", flush=True)


@dataclasses.dataclass
class WeightBytes:
    """The weight bytes a decode step of n rows must read, for the ceiling that bandwidth sets on batching: every
    weight but the embedding (n rows of it) once, and of each MoE layer's routed experts only those the rows
    select, E (1 - (1 - k/E)^n) distinct ones in expectation under independent routing (a random model's). The
    MTP module (a draft model for speculative decoding) is no part of a plain decode step, so it is not counted."""
    shared: int       # read by every step whatever n
    routed: int       # all routed experts of all layers
    n_experts: int
    top_k: int

    @classmethod
    def of(cls, engine):
        import jax

        from ktjax.model.moe import PerExpert

        shared = routed = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(engine.state, is_leaf=lambda x: isinstance(x, PerExpert))[0]:
            name = jax.tree_util.keystr(path)
            if name.startswith("['mtp']"):
                continue
            nbytes = sum(x.nbytes for x in jax.tree.leaves(leaf))
            if any(w in name for w in ("'w_gate'", "'w_up'", "'w_down'")):
                routed += nbytes
            elif "'embed'" not in name:
                shared += nbytes
        return cls(shared, routed, engine.cfg.n_routed_experts, engine.cfg.num_experts_per_tok)

    def per_step(self, n: int) -> float:
        if not self.n_experts:
            return self.shared
        distinct = self.n_experts * (1 - (1 - self.top_k / self.n_experts) ** n)
        return self.shared + self.routed * distinct / self.n_experts

    def ceiling(self, n: int) -> float:
        """n rows' tokens/s over one row's, both reading their weights at the same rate and doing nothing else."""
        return n * self.per_step(1) / self.per_step(n)


if __name__ == "__main__":
    main()
