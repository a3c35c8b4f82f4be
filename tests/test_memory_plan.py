"""Memory at real size, checked by its mechanism at tiny size: loading never holds a weight twice (per-layer
loading, per-expert splits and kernel layouts free each original as its copy is made), and the planner accounts
the device side and the host side (experts: host) as two memories, one RAM on a CPU-only machine."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from ktjax.cpu import weights as cw  # noqa: E402
from ktjax.model.decoder import PerLayer, unstack_layers  # noqa: E402
from ktjax.model.moe import PerExpert  # noqa: E402
from ktjax.model.quantized import QuantizedArray  # noqa: E402
from ktjax.runtime import memory  # noqa: E402


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def _int8_param(rng, layers: int, experts: int, d_in: int, d_out: int):
    """One int8 expert parameter held per layer and expert, [in, out] as the model stores it."""
    def one():
        return (jnp.asarray(rng.integers(-128, 128, (d_in, d_out)), jnp.int8),
                jnp.asarray(rng.uniform(0.01, 0.02, (1, d_out)), jnp.float32))
    pairs = [[one() for _ in range(experts)] for _ in range(layers)]
    return QuantizedArray(PerLayer(tuple(PerExpert(tuple(v for v, _ in layer)) for layer in pairs)),
                          PerLayer(tuple(PerExpert(tuple(s for _, s in layer)) for layer in pairs)))


def test_kernel_layouts_free_each_original_as_its_copy_is_made(rng, monkeypatch):
    """hold_for_kernels(consume=True): at every copy the live arrays exceed the weights by at most that copy (the
    old code held a whole parameter of every layer twice), every original ends deleted, and the copies are the
    originals transposed."""
    state = {"moe_layers": {"mlp": {name: _int8_param(rng, layers=4, experts=3, d_in=64, d_out=96)
                                    for name in ("w_gate", "w_up")}}}
    originals = jax.tree.leaves(state)
    expected = [np.asarray(a).T for a in originals]
    weights = sum(a.nbytes for a in originals)
    base = _live_bytes()
    over = []
    copy = cw.out_in_copy

    def watched(a, consume):
        out = copy(a, consume)
        over.append(_live_bytes() - base - out.nbytes)  # what besides the weights and this one copy is alive
        return out

    monkeypatch.setattr(cw, "out_in_copy", watched)
    held = cw.hold_for_kernels(state, consume=True)
    assert len(over) == len(originals) and max(over) <= 0, (max(over), weights)
    assert all(a.is_deleted() for a in originals)
    leaves = jax.tree.leaves(held)
    assert len(leaves) == len(expected)
    for got, want in zip(leaves, expected):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert _live_bytes() - base <= 0  # the held copies replaced the originals, byte for byte


def test_split_experts_of_a_per_layer_state_frees_each_layer(rng):
    """unstack_layers over a state loaded per layer (load_checkpoint per_layer): each layer's expert stack is
    split per expert and deleted (consume), never copied whole beside its parts; without consume it stays."""
    def state():
        stacks = {name: tuple(jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32) for _ in range(2))
                  for name in ("w_gate", "w_up", "w_down")}
        return {"moe_layers": {"mlp": {k: PerLayer(v) for k, v in stacks.items()}}}, stacks["w_gate"]

    owned, layers = state()
    want = [np.asarray(x) for x in layers]
    out = unstack_layers(owned, stacks=("moe_layers",), consume=True, split_experts=True)
    parts = out["moe_layers"]["mlp"]["w_gate"].arrays
    assert all(isinstance(p, PerExpert) and len(p.arrays) == 3 for p in parts)
    assert all(x.is_deleted() for x in layers)
    for layer, w in zip(parts, want):
        for e, a in enumerate(layer.arrays):
            np.testing.assert_array_equal(np.asarray(a), w[e])
    shared, layers = state()
    unstack_layers(shared, stacks=("moe_layers",), consume=False, split_experts=True)
    assert not any(x.is_deleted() for x in layers)


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    from random_checkpoint import smoke_config, write_random_checkpoint

    folder = str(tmp_path_factory.mktemp("ckpt") / "int8")
    write_random_checkpoint(folder, smoke_config(3), "int8")
    return folder


def test_per_layer_load_holds_the_stacked_values_layer_by_layer(smoke_checkpoint):
    from ktjax.weights.checkpoint import load_checkpoint
    from flax import nnx

    _, stacked = load_checkpoint(smoke_checkpoint)
    _, per_layer = load_checkpoint(smoke_checkpoint, per_layer=True)
    a, b = nnx.state(stacked).to_pure_dict(), nnx.state(per_layer).to_pure_dict()
    is_per_layer = lambda x: isinstance(x, PerLayer)  # noqa: E731
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b, is_leaf=is_per_layer))
    n_per_layer = 0
    for path, x in flat_a:
        y = flat_b[path]
        if isinstance(y, PerLayer):
            n_per_layer += 1
            assert len(y.arrays) == x.shape[0]
            for i, layer in enumerate(y.arrays):
                np.testing.assert_array_equal(np.asarray(layer), np.asarray(x[i]))
        else:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert n_per_layer > 10  # every parameter of both stacks


def test_engine_from_a_per_layer_load_computes_as_from_a_stacked_one(smoke_checkpoint):
    """ktjax.load reads per layer (one device); ktjax.load_model takes a stacked model: the same logits."""
    import ktjax
    from ktjax.weights.checkpoint import load_checkpoint

    prompt = [list(range(3, 15))]
    loaded = ktjax.load(smoke_checkpoint).logits(prompt)
    cfg, model = load_checkpoint(smoke_checkpoint)
    np.testing.assert_array_equal(loaded, ktjax.load_model(cfg, model).logits(prompt))


def test_generate_compiles_every_program_before_the_cache_takes_memory(smoke_checkpoint, monkeypatch):
    """Engine.generate lowers its programs for the cache's shapes and allocates the cache after them, so that a
    compile's heap (1-2 GB at V2-Lite's size) and the cache never peak together (docs/results.md, "Memory at real
    size"; Engine._run, which speculative generation shares). Recorded: each compile, and each LatentCache.create,
    as an allocation or (traced) as shapes only."""
    import ktjax
    from ktjax.kv.cache import LatentCache

    events, create, compile_ = [], LatentCache.create.__func__, jax.stages.Lowered.compile

    def recorded_create(cls, *args, **kwargs):
        cache = create(cls, *args, **kwargs)
        events.append("shapes" if isinstance(cache.c_kv, jax.core.Tracer) else "allocate")
        return cache

    def recorded_compile(self, *args, **kwargs):
        events.append("compile")
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(LatentCache, "create", classmethod(recorded_create))
    monkeypatch.setattr(jax.stages.Lowered, "compile", recorded_compile)
    engine = ktjax.load(smoke_checkpoint)
    events.clear()
    engine.generate([list(range(3, 15))], max_new_tokens=4, ignore_eos=True)
    assert events.count("allocate") == 1 and events.count("compile") >= 2, events
    assert events.index("shapes") < events.index("compile") and events[-1] == "allocate", events


def test_plan_counts_host_experts_in_the_same_ram_on_a_cpu(smoke_checkpoint, monkeypatch):
    """On a CPU-only machine the experts in host RAM and the device side share one budget: auto plans
    host_bytes / bytes-per-token fewer tokens, and the stats report both memories."""
    import ktjax
    from ktjax.runtime.engine import Engine

    engine = ktjax.load(smoke_checkpoint, cache_lens="auto", memory_budget="64MiB", cache_dtype="int8")
    per_token = engine.runtime.cache_dtype.bytes_per_token(engine.cfg)
    alone = engine.plan_cache(batch=1, needed=20)
    assert alone.memory.host == 0 and alone.memory.device == (engine.weight_bytes + alone.memory.cache
                                                             + alone.memory.activations)
    host = 64 * 1024 * per_token  # the experts of a model 64k tokens of cache wide
    monkeypatch.setattr(Engine, "host_bytes", property(lambda self: host))
    assert memory.one_memory()
    budget = (engine.weight_bytes + host + alone.memory.activations + 1000 * per_token) / memory.HEADROOM
    engine.runtime = engine.runtime.from_overrides(engine.runtime, memory_budget=int(budget))
    shared = engine.plan_cache(batch=1, needed=20)
    assert shared.memory.host == host and shared.memory.one_memory
    assert 20 <= shared.cache_lens <= 1000 < alone.cache_lens
    assert "same RAM" in shared.note
    stats = shared.memory.stats()
    assert stats["host_memory"]["total"] == host
    assert stats["device_memory"]["total"] == shared.memory.device
    assert shared.memory.budgeted == shared.memory.device + host <= budget


@pytest.mark.parametrize("experts,gpu_experts", [("device", 0), ("host", "0,1")])
def test_dry_run_plans_from_the_headers_what_the_loaded_engine_plans(smoke_checkpoint, capsys, experts,
                                                                    gpu_experts):
    """--dry-run reads no weight: its device and host memory (from the headers, gpu_experts' device copies
    included) and its cache_lens auto equal the plan of the engine once loaded."""
    import json

    import ktjax
    from ktjax.cli.generate import main
    from tokenizer_fixture import write_tokenizer

    if not os.path.exists(os.path.join(smoke_checkpoint, "tokenizer.json")):
        write_tokenizer(smoke_checkpoint)
    settings = dict(cache_lens="auto", memory_budget="1.5MiB", cache_dtype="int8", experts=experts,
                    gpu_experts=gpu_experts, max_new_tokens=8)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["--model", smoke_checkpoint, "--prompt", "the quick brown fox", "--dry-run", "--json", *flags]) == 0
    planned = json.loads(capsys.readouterr().out.splitlines()[-1])
    engine = ktjax.load(smoke_checkpoint, **settings)
    loaded = engine.plan_cache(1, planned["prompt_tokens"] + 8)
    assert planned["cache_lens"] == loaded.cache_lens < engine.cfg.max_position_embeddings  # the budget capped it
    assert planned["device_memory"] == loaded.memory.stats()["device_memory"]
    assert planned["host_memory"] == loaded.memory.stats()["host_memory"]
    assert (planned["host_memory"]["total"] > 0) == (experts == "host")


def test_server_metrics_report_both_memories(smoke_checkpoint):
    """The server's gauges: the device side (weights held on the device plus the page pool) and the host side
    (the experts' store under experts host)."""
    pytest.importorskip("prometheus_client")
    import ktjax
    from ktjax.serve.metrics import planned_memory

    engine = ktjax.load(smoke_checkpoint, experts="host")
    gauges = {g.name: g.samples[0].value for g in planned_memory(engine, cache_bytes=12345)}
    assert gauges["ktjax_planned_device_memory_bytes"] == engine.weight_bytes + 12345
    assert gauges["ktjax_host_memory_bytes"] == engine.host_bytes > 0


def test_budget_check_counts_the_device_side_where_experts_live_in_host_ram(smoke_checkpoint, monkeypatch):
    """Before any read: with experts host on a machine whose host RAM is not the device's, a budget that holds
    the non-expert weights but not the experts passes; with experts device it is refused; on one RAM, refused."""
    from ktjax.errors import KtjaxError

    device, host = memory.weight_sides_on_load(smoke_checkpoint, 4, "host", 0, 8)
    assert host > 0 and device + host == memory.weight_bytes_on_load(smoke_checkpoint, 4)
    budget = device + host // 2
    with pytest.raises(KtjaxError, match="smaller than the weights"):
        memory.check_budget_holds_weights(smoke_checkpoint, budget, 4, 1, "host")  # a CPU: one RAM
    monkeypatch.setattr(memory, "one_memory", lambda: False)
    memory.check_budget_holds_weights(smoke_checkpoint, budget, 4, 1, "host")
    with pytest.raises(KtjaxError, match="smaller than the weights"):
        memory.check_budget_holds_weights(smoke_checkpoint, budget, 4, 1, "device")
