"""Speculative decoding with the MTP module as the draft (runtime/speculative.py): greedy output identical to plain
decoding in every cache format, sampled output distributed as the model's own (chi-square against the model's
exact distribution), the cache after rejections equal to the cache of the accepted tokens alone, fixed shapes.

The model is tiny and random, but shaped so that its MTP module drafts well and not perfectly (`draft_model`):
the layers' outputs are damped, so that each prediction depends mostly on the last token (and a little on the
context, through the cache), and the MTP module predicts from the next token's embedding with the model's own
head plus noise. Drafts are then accepted often, and rejected often: both paths of the loop run.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ktjax
from ktjax.errors import KtjaxError
from ktjax.model.config import ModelConfig
from ktjax.model.decoder import DeepseekModel
from ktjax.runtime.engine import GenerateBatch
from ktjax.runtime.progress import Timeline

from hf_models import CONFIGS

FORMATS = ["float32", "bf16", "fp8", "int8", "int4"]


def draft_model(vocab: int = 97, seed: int = 0, mix: float = 0.1, head_noise: float = 0.2, sharpness: float = 3.0):
    """(cfg, model): the tiny V3 test config with an MTP layer. Random weights (std 0.1), then: the attention and
    MLP outputs of every block scaled by `mix`; lm_head scaled to logits of std ~`sharpness`; the MTP's eh_proj
    passes the next token's embedding through (the hidden-state half small), its head = lm_head + noise."""
    raw = dict(CONFIGS["v3"][1], model_type="deepseek_v3", num_nextn_predict_layers=1, vocab_size=vocab)
    cfg = ModelConfig.from_hf_dict(raw)
    model = DeepseekModel(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    d = cfg.hidden_size

    def reweight(path, x):
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(x.dtype, jnp.floating) or "norm" in name or "bias" in name:
            return x
        x = x * 5.0  # std 0.1
        if "o_proj" in name or "down" in name:
            x = x * mix
        if name.startswith("['lm_head']"):
            x = x * sharpness / (0.1 * np.sqrt(d))
        return x

    state = jax.tree_util.tree_map_with_path(reweight, state)
    lm_head = np.asarray(state["lm_head"]["kernel"][...])
    noise = rng.standard_normal(lm_head.shape).astype(np.float32) * head_noise * lm_head.std()
    state["mtp"]["head"]["kernel"][...] = jnp.asarray(lm_head + noise)[None]
    eh = 0.01 * rng.standard_normal((2 * d, d)).astype(np.float32)
    eh[:d] = np.eye(d)
    state["mtp"]["eh_proj"]["kernel"][...] = jnp.asarray(eh)[None]
    return cfg, nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    return draft_model()


def engines(model, **settings):
    cfg, m = model
    return ktjax.load_model(cfg, m, **settings)


PROMPTS = [[5, 9, 13, 2, 40], list(range(20, 33)), [3] * 30]
# Every draft_tokens value and a quantized format in the fast set (each format compiles its own programs, ~10 s
# on a quiet 2-core machine); the rest of the 5 x 3 grid runs with the slow tests.
FAST = {("float32", 1), ("float32", 2), ("float32", 3), ("int4", 2)}
GRID = [pytest.param(f, k, marks=() if (f, k) in FAST else pytest.mark.slow) for f in FORMATS for k in (1, 2, 3)]


@pytest.fixture(scope="module")
def plain_outputs(model):
    """fmt -> (stop token, tokens of plain greedy decoding with that stop), computed once per format."""
    found = {}

    def get(fmt):
        if fmt not in found:
            plain = engines(model, cache_dtype=fmt, max_new_tokens=24, ignore_eos=True)
            stop = plain.generate(PROMPTS).tokens[0][6]  # ends sequence 0 at its first occurrence (maybe others)
            plain.generation_config["eos_token_ids"] = [stop]
            found[fmt] = stop, plain.generate(PROMPTS, ignore_eos=False).tokens
        return found[fmt]

    return get


@pytest.mark.parametrize("fmt,k", GRID)
def test_greedy_output_is_plain_decodings_token_for_token(model, plain_outputs, fmt, k):
    """A batch of different prompt lengths, a stop token that ends one sequence early and max_new_tokens that
    end the others: the same tokens as decoding without speculation, and drafts both accepted and rejected."""
    stop, ref = plain_outputs(fmt)
    assert len(ref[0]) <= 7 and max(map(len, ref)) == 24
    spec = engines(model, cache_dtype=fmt, max_new_tokens=24, speculative="mtp", draft_tokens=k)
    spec.generation_config["eos_token_ids"] = [stop]
    out = spec.generate(PROMPTS)
    assert out.tokens == ref
    s = out.stats
    assert s["speculative"] == "mtp" and s["draft_tokens"] == k
    assert s["verify_passes"] == sum(s["verify_passes_per_sequence"])
    # each token after the first comes from a verifying pass, as one of its accepted drafts or its last token (a
    # pass cut by a stop or max_new_tokens inside its drafts gives no last token)
    for passes, accepted, t in zip(s["verify_passes_per_sequence"], s["accepted_drafts"], ref):
        assert len(t) - 1 <= passes + accepted <= len(t)
    assert 0.15 < s["draft_acceptance_rate"] < 0.95, s["draft_acceptance_rate"]
    assert s["accept_length"] == pytest.approx((sum(map(len, ref)) - len(ref)) / s["verify_passes"])


def exact_distribution(engine, prompt, n: int, vocab: int) -> np.ndarray:
    """The model's probability of each sequence of n tokens after prompt, [vocab] * n, from its full forward
    (no cache): p(t1) p(t2 | t1) ... at temperature 1."""
    seqs = np.array(np.meshgrid(*[np.arange(vocab)] * n, indexing="ij")).reshape(n, -1).T  # [vocab^n, n]
    ids = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1)
    logp = jax.nn.log_softmax(jnp.asarray(engine.logits(ids)), axis=-1)
    pos = len(prompt) - 1 + np.arange(n)
    steps = np.take_along_axis(np.asarray(logp)[:, pos], seqs[:, :, None], axis=-1)[..., 0]
    return np.exp(steps.sum(1)).reshape([vocab] * n)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit; cells expected fewer than 5 times pooled into one."""
    from scipy import stats

    counts, probs = counts.ravel(), probs.ravel() / probs.sum()
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


# One false alarm in 10^4 for a correct sampler: the test is deterministic (fixed seeds), and a seed that happened
# to fail a correct sampler is that unlikely. A sampler that emits the drafts' distribution fails it by far.
FALSE_ALARM = 1e-4


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sampled_tokens_keep_the_models_distribution(k):
    """4096 sequences of one prompt, sampled with speculation (temperature 1): the joint distribution of their
    first three tokens (a vocabulary of 8: 512 outcomes; the second and third come through drafts accepted or
    rejected) against the model's exact one."""
    vocab, n, rows = 8, 3, 4096
    cfg, m = draft_model(vocab=vocab, seed=3, head_noise=1.0, sharpness=1.5)
    spec = ktjax.load_model(cfg, m, speculative="mtp", draft_tokens=k, cache_dtype="float32", max_new_tokens=n,
                            ignore_eos=True, temperature=1.0)
    prompt = [3, 1, 4, 1, 5]
    out = spec.generate([prompt] * rows, seed=11)
    s = out.stats
    assert 0.2 < s["draft_acceptance_rate"] < 0.9, s["draft_acceptance_rate"]
    counts = np.zeros([vocab] * n)
    np.add.at(counts, tuple(np.array(out.tokens).T), 1)
    probs = exact_distribution(spec, prompt, n, vocab)
    assert chi_square_p_value(counts, probs) > FALSE_ALARM
    # the test has power: the drafts' own distribution (what a loop accepting every draft would give) fails it
    q = probs.sum(axis=(1, 2))[:, None, None] * mtp_joint(spec, prompt, vocab)
    assert chi_square_p_value(np.round(q * rows), probs) < FALSE_ALARM


def mtp_joint(engine, prompt, vocab):
    """q(t2, t3 | t1) for each t1, [vocab, vocab, vocab]: t2 drawn from the MTP module at the prompt's end, t3 from
    its chained step. What a loop that accepted every draft would sample: the wrong distribution."""
    model = engine.model
    opts = engine.run_options(False)
    out = np.zeros([vocab] * 3)
    for t1 in range(vocab):
        ids = jnp.asarray([prompt + [t1]])
        _, hidden = model(ids, opts, return_hidden=True)
        logits, h = model.mtp_forward(hidden[:, :-1], ids[:, 1:], opts)
        q2 = np.asarray(jax.nn.softmax(logits[0, -1]))
        for t2 in range(vocab):
            # the chained step: the MTP on its own hidden state and the draft t2, one position on
            ext_h = jnp.concatenate([hidden[:, :-1], h[:, -1:]], 1)
            ext_t = jnp.concatenate([ids[:, 1:], jnp.asarray([[t2]])], 1)
            logits3, _ = model.mtp_forward(ext_h, ext_t, opts)
            out[t1, t2] = q2[t2] * np.asarray(jax.nn.softmax(logits3[0, -1]))
    return out


@pytest.mark.parametrize("fmt", ["float32", "bf16"])
def test_cache_after_rejections_is_the_accepted_tokens_cache(model, fmt):
    """After a generation with rejected drafts, every layer's valid entries (the MTP slice's too) equal those a
    prefill of the accepted sequence writes: rejected drafts leave no trace."""
    spec = engines(model, cache_dtype=fmt, max_new_tokens=20, ignore_eos=True, speculative="mtp", draft_tokens=3)
    prompts = PROMPTS[:2]
    b, chunk = len(prompts), 16
    plan = spec.plan_cache(b, 64)

    def run(seqs, prefill_only: bool) -> GenerateBatch:
        cache = spec.new_cache(b, plan, extra_layers=1)
        steps = spec.step_programs(cache, b, chunk, 0, draft_tokens=3)
        batch = GenerateBatch(spec, cache, steps, seqs, spec.defaults, draft_tokens=3)
        batch.run(prefill=prefill_only)
        return batch

    batch = run(prompts, prefill_only=False)
    cache, tokens = batch.pool, batch.tokens
    accepted, passes = (sum(getattr(s, name) for s in batch.seqs) for name in ("accepted", "passes"))
    assert 0 < accepted < 3 * passes  # some drafts rejected, some accepted
    lengths, mtp_valid = [s.length for s in batch.seqs], [s.mtp_length for s in batch.seqs]
    seqs = [p + t[:-1] for p, t in zip(prompts, tokens)]  # the last token is pending: not in the cache
    assert lengths == list(map(len, seqs))
    ref = run(seqs, prefill_only=True).pool
    main, mtp = spec.cfg.num_hidden_layers, spec.cfg.num_hidden_layers
    tol = {"float32": 1e-4, "bf16": 2e-2}[fmt]
    for name in ("c_kv", "k_pe"):
        got, want = _values(getattr(cache, name), fmt), _values(getattr(ref, name), fmt)
        for i in range(b):
            for layer, n in [(lay, lengths[i]) for lay in range(main)] + [(mtp, mtp_valid[i])]:
                a, w = got[layer, i, :n], want[layer, i, :n]
                assert np.abs(a - w).max() <= tol * np.abs(w).max(), (name, i, layer)
            assert mtp_valid[i] >= lengths[i] - 4  # the MTP slice is filled to the last pass's positions


def _values(bits, fmt):
    import ml_dtypes

    x = np.asarray(bits)
    return x.view(ml_dtypes.bfloat16).astype(np.float32) if fmt == "bf16" else x.astype(np.float32)


def test_no_recompilation_as_acceptance_varies(model):
    """Calls whose acceptance differs (other prompts, seeds, sampling) run the programs compiled by the first."""
    spec = engines(model, max_new_tokens=16, ignore_eos=True, speculative="mtp", draft_tokens=2)
    first = spec.generate([[5, 6, 7], [8, 9, 10, 11]])
    count = spec.compile_count
    rates = {first.stats["draft_acceptance_rate"]}
    for prompts, kw in [([[40, 41, 42], [1, 2]], {}), ([[7, 7, 7, 7], [9]], dict(temperature=0.8, seed=3)),
                        ([[3, 14, 15], [92, 65, 35, 8]], dict(temperature=1.0, top_k=5, top_p=0.9, seed=4))]:
        rates.add(spec.generate(prompts, **kw).stats["draft_acceptance_rate"])
    assert spec.compile_count == count and len(rates) > 1


def test_every_program_compiles_before_the_run_whatever_the_stop_ids(model):
    """Six stop ids (a wider stop-id bucket than the default): the compile phase builds the very programs the run
    uses, the verifying pass's included; nothing compiles while it runs."""
    cfg, m = model
    spec = ktjax.load_model(cfg, m, generation_config={"eos_token_ids": [90, 91, 92, 93, 94, 95]}, max_new_tokens=8,
                            speculative="mtp", draft_tokens=2)
    out = spec.generate([[5, 6, 7]], progress=(timeline := Timeline()))
    compiled = [p for p in timeline.phases if p["phase"] == "compile"][0]["done"]
    assert compiled == spec.compile_count == 2 and out.stats["verify_passes"] > 0


def test_a_model_without_an_mtp_module_is_refused(hf_folder):
    folder, _ = hf_folder("v3")
    with pytest.raises(KtjaxError, match="this model has no MTP module"):
        ktjax.load(folder, speculative="mtp")
    with pytest.raises(KtjaxError, match="draft_tokens=4"):
        ktjax.load(folder, speculative="mtp", draft_tokens=4)


def test_cli_speculation_on_the_demo_model(capsys):
    """python -m ktjax.generate --speculative mtp: the demo model's completion as without it, with the acceptance
    in --json's stats (or, for a demo model without an MTP module, one clear refusal)."""
    import json

    from ktjax.cli.generate import main
    from ktjax.model.config import ModelConfig
    from ktjax.demo import DEMO_MODEL_DIR

    flags = ["--max-new-tokens", "12", "--json", "--no-progress", "--cache-dtype", "float32"]
    if not ModelConfig.from_file(DEMO_MODEL_DIR + "/config.json").num_nextn_predict_layers:
        assert main(flags + ["--speculative", "mtp"]) == 2
        assert "this model has no MTP module" in capsys.readouterr().err
        return
    assert main(flags) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(flags + ["--speculative", "mtp", "--draft-tokens", "2"]) == 0
    spec = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert spec["completion_ids"] == plain["completion_ids"] and spec["completion"] == plain["completion"]
    assert spec["stats"]["speculative"] == "mtp" and plain["stats"]["speculative"] == "off"
    assert 0 < spec["stats"]["draft_acceptance_rate"] <= 1 and spec["stats"]["accept_length"] > 1


MESH_CHECK = """
import sys
sys.path.insert(0, {here!r})
import ktjax
from test_speculative import PROMPTS, draft_model
cfg, m = draft_model()
for mesh in ("8", "2x4"):
    kw = dict(mesh=mesh, max_new_tokens=12, ignore_eos=True, cache_dtype="float32")
    ref = ktjax.load_model(cfg, m, **kw).generate(PROMPTS).tokens
    out = ktjax.load_model(cfg, m, speculative="mtp", draft_tokens=2, **kw).generate(PROMPTS)
    assert out.tokens == ref and out.stats["devices"] == 8, (mesh, out.tokens, ref)
print("ok")
"""


@pytest.mark.slow  # 1-8 min on the 2-core machine (8 forced devices compile every program; JAX cache warm: 1)
def test_greedy_output_is_plain_decodings_on_a_sequence_sharded_mesh():
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_CHECK.format(here=here)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
