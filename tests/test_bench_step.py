"""benchmarks/bench_step.py's weight-byte count, which the closing figures on batching rest on: the bytes a decode
step of n rows must read split into the routed experts and the rest exactly, with the routed share growing with
the expected number of distinct experts."""
import sys
from pathlib import Path

import jax
import pytest

from serve_harness import demo_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_step  # noqa: E402


def test_weight_bytes_of_the_demo_model():
    engine = demo_engine()
    cfg = engine.cfg
    wb = bench_step.WeightBytes.of(engine)
    state = dict(engine.state)
    mtp = state.pop("mtp")  # the demo's MTP module: a draft model, not read by a plain decode step
    assert jax.tree.leaves(mtp)
    embed = cfg.vocab_size * cfg.hidden_size * 4  # float32, read one row per token
    assert wb.shared + wb.routed + embed == sum(x.nbytes for x in jax.tree.leaves(state))
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert wb.routed == moe_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    assert wb.per_step(1) == pytest.approx(wb.shared + wb.routed * k / e)
    assert wb.per_step(10_000) == pytest.approx(wb.shared + wb.routed)  # every expert is read
    assert wb.ceiling(1) == pytest.approx(1.0)
    # two rows read at most twice one row's bytes, so they gain at least nothing and at most 2x
    assert 1.0 < wb.ceiling(2) < 2.0
