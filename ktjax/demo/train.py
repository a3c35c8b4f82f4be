"""Train ktjax's small demo model on this CPU: a DeepSeek-V3-architecture model (MLA, MoE with a shared
expert, sigmoid routing) on English text mixed with a synthetic pass-key retrieval task
(ktjax/demo/passkey.py), then export it in Hugging Face format (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) so that transformers, the converter and ktjax
all read it.

    apt-get install python3.11-doc          # the text: the Python documentation's reST sources (PSF licence)
    python -m ktjax.train --out /tmp/demo_model                       # DEFAULT_STAGES, ~25 min
    python -m ktjax.train --init /tmp/demo_model --out /tmp/more --stages 256:16:300:0.7 --lr 1.5e-3

--out is required and an existing, non-empty --out is only replaced with --overwrite, so that no run replaces
the shipped ktjax/demo_model by accident. The folder is written beside --out and renamed into place at the end.

Training runs in stages (--stages): language first, then many pass keys in short contexts, where a model
finds the key most easily and learns to copy it, then the full length. Every
--eval-every steps a check on fresh pass-key examples prints the share of keys the model would copy.

Text: /usr/share/doc/python3*/html/_sources/**/*.rst.txt (Debian's python3.11-doc; the Python documentation
is under the PSF licence, which permits redistribution of derived works with the licence notice).

The multi-token-prediction (MTP) stage (--mtp-steps N, ktjax/model/mtp.py) trains only the MTP module, the main
model frozen: the loss is the cross-entropy of t_{p+2} from the MTP's logits at p, whose inputs are the frozen
model's final-normed hidden state h_p and the text's t_{p+1} (--mtp-target model: the main model's own
distribution at p+1 instead, a distillation). A model without one gets the module initialised from its last
decoder layer (the block), lm_head (shared_head.head) and final norm (shared_head.norm), eh_proj passing hnorm(h)
through. With --init and --mtp-steps, the main stages run only if --stages is given. The shipped demo's MTP module:

    python -m ktjax.train --init ktjax/demo_model --out /tmp/demo_mtp --mtp-steps 270 --eval-every 30 --mtp-lr 2e-3

(run on the demo model as shipped before it had the module; run now, it continues the shipped module's training;
17.5 min of steps, 21 min in all, on the loaded 2-core CPU; docs/results.md, "The demo model's MTP module"). Every
--eval-every MTP steps it prints the draft accuracy on held-out text (ktjax/data/stdlib_docstrings.txt, Python
docstrings the training text does not hold): the share of positions where the MTP's argmax is the main model's
greedy token after next (what speculative decoding's one-token draft is accepted by): 6% at the start, 51% after
those 270 steps.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

from ktjax.demo.tokens import CHAT_TEMPLATE, SPECIALS
from ktjax.demo.passkey import passkey_example, teacher_forced_accuracy

BOS, EOS = SPECIALS[:2]
# One run of ~25 minutes on a 2-core CPU that learns retrieval (54% of keys at 256 tokens). The shipped demo
# model trained about an hour, in three runs (94%; docs/results.md has both recipes).
DEFAULT_STAGES = "128:32:200:0.2,64:64:500:0.85,256:16:250:0.7"
MIN_PASSKEY_LEN = 32  # shortest pass-key example


def model_config(vocab_size: int, max_len: int) -> dict:
    """The demo model: ~3.6M parameters, V3 layout (q_lora, noaux_tc routing over 4 groups, 1 dense layer), and a
    multi-token-prediction module (1.3M more; trained by its own stage, after the model: see train)."""
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=vocab_size,
        hidden_size=192, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=6, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.0, first_k_dense_replace=1,
        scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-6, hidden_act="silu",
        max_position_embeddings=max_len, rope_interleave=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, initializer_range=0.02, num_nextn_predict_layers=1)


def max_positions(stages: str = DEFAULT_STAGES) -> int:
    """A model's max_position_embeddings: 4x its longest training sequence, room to generate past it."""
    return 4 * max(seq_len for seq_len, _, _, _ in parse_stages(stages))


def load_corpus(text_dir: str | None) -> str:
    pattern = os.path.join(text_dir, "**", "*.txt") if text_dir else "/usr/share/doc/python3*/html/_sources/**/*.txt"
    files = sorted({os.path.realpath(f) for f in glob.glob(pattern, recursive=True)})  # symlinked doc dirs
    if not files:
        raise SystemExit(f"no text under {pattern}: apt-get install python3.11-doc, or pass --text-dir")
    parts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            # reST markup lines (directives, underlines) teach nothing useful: keep prose and code.
            lines = [ln for ln in f.read().splitlines() if not ln.startswith("..") and len(set(ln.strip())) > 1]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer)
    return tok


def batches(rng, tok, corpus_ids: np.ndarray, batch: int, seq_len: int, passkey_fraction: float):
    """Endless (tokens [batch, seq_len + 1], loss weights [batch, seq_len]): text windows, and pass-key
    examples of MIN_PASSKEY_LEN..seq_len tokens (padding weighs 0, the answer 4)."""
    bos = tok.token_to_id(BOS)
    while True:
        rows, weights = [], []
        for _ in range(batch):
            if rng.random() < passkey_fraction:
                length = int(rng.integers(min(MIN_PASSKEY_LEN, seq_len), seq_len + 1))
                ids, answer_at, _ = passkey_example(rng, tok, corpus_ids, length)
                w = np.ones(len(ids) - 1, np.float32)
                w[answer_at - 1:] = 4.0  # the answer is what the task is about
            else:
                start = rng.integers(0, len(corpus_ids) - seq_len)
                ids = [bos] + corpus_ids[start:start + seq_len].tolist()
                w = np.ones(len(ids) - 1, np.float32)
            ids, w = ids[:seq_len + 1], w[:seq_len]
            pad = seq_len + 1 - len(ids)
            rows.append(ids + [0] * pad)
            weights.append(np.concatenate([w, np.zeros(pad, np.float32)]))
        yield np.array(rows, np.int32), np.stack(weights)


def parse_stages(spec: str) -> list[tuple[int, int, int, float]]:
    """"SEQ_LEN:BATCH:STEPS:PASSKEY_FRACTION,..." -> [(seq_len, batch, steps, fraction), ...]."""
    stages = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            seq_len, batch, steps, fraction = int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
        except (ValueError, IndexError):
            raise SystemExit(f"--stages: {part!r} is not SEQ_LEN:BATCH:STEPS:PASSKEY_FRACTION") from None
        if len(fields) != 4 or min(seq_len, batch, steps) < 1 or not 0 <= fraction <= 1:
            raise SystemExit(f"--stages: {part!r} is not SEQ_LEN:BATCH:STEPS:PASSKEY_FRACTION (positive "
                             "integers and a fraction in [0, 1])")
        stages.append((seq_len, batch, steps, fraction))
    return stages


def learning_rate(peak: float, step: int, total: int) -> float:
    """Linear warm-up over 30 steps, then cosine decay to 10% of the peak at `total`."""
    warmup = min(30, max(1, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def prepare(args):
    """(tokenizer, raw HF config, model, corpus token ids): fresh, or continued from --init."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ktjax.model.config import ModelConfig
    from ktjax.util.jsonio import read_json
    from ktjax.model.decoder import DeepseekModel

    text = load_corpus(args.text_dir)
    if args.init:  # continue training an exported model, with its tokenizer
        from tokenizers import Tokenizer

        from ktjax.weights.loader import load_hf_model
        tok = Tokenizer.from_file(os.path.join(args.init, "tokenizer.json"))
        raw = read_json(os.path.join(args.init, "config.json"), "model config")
        raw.pop("torch_dtype", None)  # export_hf writes the dtype it is asked for
        model = load_hf_model(args.init, ModelConfig.from_hf_dict(raw))
    else:
        tok = train_tokenizer(text, args.vocab_size)
        raw = model_config(tok.get_vocab_size(), max_positions(args.stages))
        # The MTP module is added by its own stage (with_mtp), from the trained model's last layer.
        cfg = ModelConfig.from_hf_dict(dict(raw, num_nextn_predict_layers=0))
        model = DeepseekModel(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), params))  # --init may hold bf16
    corpus_ids = np.array(tok.encode(text).ids, np.int32)
    print(f"corpus: {len(text) / 1e6:.1f}M characters, {len(corpus_ids) / 1e6:.2f}M tokens; "
          f"vocab {tok.get_vocab_size()}", flush=True)
    return tok, raw, model, corpus_ids


def fit(model, tok, corpus_ids: np.ndarray, args):
    """Train `model` through the stages of args.stages (or until args.minutes); returns the trained model."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ktjax.model.decoder import RunOptions

    graphdef, params = nnx.split(model)
    print(f"model: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M parameters", flush=True)
    # The learning rate is set from the host at each step (one compiled step serves the whole schedule).
    opt = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.01)))(learning_rate=0.0)
    opt_state = opt.init(params)

    def forward(p, tokens):
        return nnx.merge(graphdef, p)(tokens, RunOptions(absorb=False, moe_impl="ragged"))

    def loss_fn(p, tokens, weights):
        nll = optax.softmax_cross_entropy_with_integer_labels(forward(p, tokens[:, :-1]), tokens[:, 1:])
        return (nll * weights).sum() / weights.sum()

    @jax.jit
    def step(p, o, tokens, weights):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, weights)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    predict = jax.jit(lambda p, tokens: forward(p, tokens).argmax(-1))
    stages = parse_stages(args.stages)
    total, i, losses, t0 = sum(s[2] for s in stages), 0, [], time.time()
    eval_rng, rng = np.random.default_rng(args.seed + 1), np.random.default_rng(args.seed)
    shortest = len(passkey_example(eval_rng, tok, corpus_ids, 0)[0])  # the task's own tokens
    for seq_len, batch, steps, fraction in stages:
        print(f"stage: {steps} steps of {batch} x {seq_len} tokens, {fraction:.0%} pass-key rows", flush=True)
        if fraction and shortest > seq_len + 1:
            print(f"warning: the pass-key task takes {shortest} tokens with this tokenizer; {seq_len}-token rows "
                  "cut its answer off", flush=True)
        data = batches(rng, tok, corpus_ids, batch, seq_len, fraction)
        for _ in range(steps):
            if time.time() - t0 > args.minutes * 60:
                print(f"stopping early after {i} steps: the {args.minutes:g}-minute budget is spent", flush=True)
                return nnx.merge(graphdef, params)
            opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate(args.lr, i, total), jnp.float32)
            tokens, weights = next(data)
            params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens), jnp.asarray(weights))
            losses.append(float(loss))
            i += 1
            if i % args.eval_every == 0 or i == total:
                acc = teacher_forced_accuracy(lambda t: predict(params, jnp.asarray(t)), eval_rng, tok,
                                              corpus_ids, seq_len)
                print(f"step {i}/{total} loss {np.mean(losses[-args.eval_every:]):.3f} pass-key@{seq_len} "
                      f"{acc:.0%} {time.time() - t0:.0f}s", flush=True)
    print(f"trained {i} steps in {(time.time() - t0) / 60:.1f} min, final loss {np.mean(losses[-20:]):.3f}")
    return nnx.merge(graphdef, params)


def train(args):
    """prepare, fit (the main stages), the MTP stage (--mtp-steps), export to args.out; returns the trained model
    and its raw config."""
    tok, raw, model, corpus_ids = prepare(args)
    if args.stages:
        model = fit(model, tok, corpus_ids, args)
    if args.mtp_steps:
        model, raw = with_mtp(model, raw, args.seed)
        model = fit_mtp(model, tok, corpus_ids, args)
    if model.mtp is None:  # the config says what the weights hold
        raw = {k: v for k, v in raw.items() if k != "num_nextn_predict_layers"}
    export_hf(model, raw, tok, args.out, args.dtype)
    return model, raw


# ---- the multi-token-prediction stage ---------------------------------------------------------------------

def with_mtp(model, raw: dict, seed: int = 0):
    """(model, raw config) with an MTP module: the model's own where it has one; else one initialised from the
    last decoder layer (its block, where that layer's kind matches the MTP's, else random), lm_head
    (shared_head.head), the final norm (shared_head.norm), enorm and hnorm ones, and eh_proj passing hnorm(h)
    through (identity on the hidden half; small random on the embedding half)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ktjax.model.config import ModelConfig
    from ktjax.model.decoder import DeepseekModel

    if model.mtp is not None:
        return model, raw
    raw = dict(raw, num_nextn_predict_layers=1)
    cfg = ModelConfig.from_hf_dict(raw)
    graphdef, state = nnx.split(DeepseekModel(cfg, rngs=nnx.Rngs(seed)))
    fresh, old = state.to_pure_dict(), nnx.state(model).to_pure_dict()
    fresh.update(old)  # the main model, unchanged
    last = old.get("moe_layers" if cfg.mtp_moe else "dense_layers")  # None: no layer of the MTP's kind
    mtp = fresh["mtp"]
    if last is not None:
        mtp.update(jax.tree.map(lambda x: x[-1:], last))
    mtp["head"]["kernel"] = old["lm_head"]["kernel"][None] if old.get("lm_head") else old["embed"].T[None]
    mtp["head_norm"]["weight"] = old["norm"]["weight"][None]
    d = cfg.hidden_size
    mtp["eh_proj"]["kernel"] = mtp["eh_proj"]["kernel"].at[0, d:].set(jnp.eye(d, dtype=jnp.float32))
    nnx.replace_by_pure_dict(state, fresh)
    return nnx.merge(graphdef, state), raw


def held_out_windows(tok, seq_len: int, limit: int = 64) -> np.ndarray:
    """Windows [n, seq_len + 1] of the held-out text's tokens (at most `limit`)."""
    from ktjax.demo.passkey import HELDOUT_TEXT

    with open(HELDOUT_TEXT, encoding="utf-8") as f:
        ids = np.array(tok.encode(f.read()).ids, np.int32)
    n = min(limit, (len(ids) - 1) // (seq_len + 1))
    return ids[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def fit_mtp(model, tok, corpus_ids: np.ndarray, args):
    """Train the MTP module only (the rest frozen) for args.mtp_steps steps of args.mtp_batch x args.mtp_seq text
    tokens; prints the loss and the held-out draft accuracy every args.eval_every steps. Returns the model."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ktjax.model.decoder import RunOptions

    graphdef, mtp_params, frozen = nnx.split(model, nnx.PathContains("mtp"), ...)
    print(f"MTP module: {sum(x.size for x in jax.tree.leaves(mtp_params)) / 1e6:.2f}M parameters trained, "
          f"{sum(x.size for x in jax.tree.leaves(frozen)) / 1e6:.2f}M frozen", flush=True)
    opt = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.01)))(learning_rate=0.0)
    opt_state = opt.init(mtp_params)
    # The frozen model runs forward only, its experts as inference runs them (moe_impl auto); the MTP's ragged_dot
    # has a gradient. A step of 16 x 256 tokens: ~5.5 s on the loaded 2-core CPU, either way within 10%.
    main_opts, mtp_opts = RunOptions(absorb=False, moe_impl="auto"), RunOptions(absorb=False, moe_impl="ragged")

    def drafts(p, rest, tokens):
        """(MTP logits at p = 0..L-2 for t_{p+2}, the main model's logits at 1..L-1), tokens [b, L + 1]."""
        m = nnx.merge(graphdef, p, rest)
        main_logits, hidden = m(tokens[:, :-1], main_opts, return_hidden=True)
        logits, _ = m.mtp_forward(jax.lax.stop_gradient(hidden[:, :-1]), tokens[:, 1:-1], mtp_opts)
        return logits, jax.lax.stop_gradient(main_logits[:, 1:])

    def loss_fn(p, rest, tokens, weights):
        logits, main_logits = drafts(p, rest, tokens)
        if args.mtp_target == "model":  # the main model's own next-token distribution at p + 1
            nll = optax.softmax_cross_entropy(logits, jax.nn.softmax(main_logits, axis=-1))
        else:
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 2:])
        w = weights[:, 1:]
        return (nll * w).sum() / w.sum()

    @jax.jit
    def step(p, o, rest, tokens, weights):
        loss, grads = jax.value_and_grad(loss_fn)(p, rest, tokens, weights)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    @jax.jit
    def accuracy(p, rest, tokens):
        """(draft == the main model's greedy token after next, draft == the text's, main == the text's next)."""
        logits, main_logits = drafts(p, rest, tokens)
        draft, greedy = logits.argmax(-1), main_logits.argmax(-1)
        return ((draft == greedy).mean(), (draft == tokens[:, 2:]).mean(), (greedy == tokens[:, 2:]).mean())

    held_out = jnp.asarray(held_out_windows(tok, args.mtp_seq))

    def report(i, losses, t0):
        agree, text, main = (float(x) for x in accuracy(mtp_params, frozen, held_out))
        loss = f"loss {np.mean(losses[-args.eval_every:]):.3f} " if losses else ""
        print(f"mtp step {i}/{args.mtp_steps} {loss}draft accuracy {agree:.1%} (the text's t+2: {text:.1%}; "
              f"main model's next token: {main:.1%}; {held_out.size} held-out tokens) {time.time() - t0:.0f}s",
              flush=True)

    rng = np.random.default_rng(args.seed + 2)
    data = batches(rng, tok, corpus_ids, args.mtp_batch, args.mtp_seq, args.mtp_passkey)
    losses, t0 = [], time.time()
    report(0, losses, t0)
    for i in range(args.mtp_steps):
        if time.time() - t0 > args.minutes * 60:
            print(f"stopping the MTP stage after {i} steps: the {args.minutes:g}-minute budget is spent", flush=True)
            break
        opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate(args.mtp_lr, i, args.mtp_steps),
                                                             jnp.float32)
        tokens, weights = next(data)
        mtp_params, opt_state, loss = step(mtp_params, opt_state, frozen, jnp.asarray(tokens), jnp.asarray(weights))
        losses.append(float(loss))
        if (i + 1) % args.eval_every == 0 or i + 1 == args.mtp_steps:
            report(i + 1, losses, t0)
    print(f"MTP stage: {len(losses)} steps in {(time.time() - t0) / 60:.1f} min, final loss "
          f"{np.mean(losses[-20:]):.3f}", flush=True)
    return nnx.merge(graphdef, mtp_params, frozen)


def _hf_tensors(model, cfg) -> dict[str, np.ndarray]:
    """Our parameters under Hugging Face names and layouts: the parameter table's inverse (ktjax/weights/params.py)."""
    from flax import nnx

    from ktjax.weights.params import hf_tensors

    return hf_tensors(cfg, nnx.state(model).to_pure_dict())


def export_hf(model, raw_config: dict, tok, folder: str, dtype: str = "bfloat16"):
    """Write a Hugging Face folder: weights in `dtype` (router and its bias in float32, as transformers
    keeps them), tokenizer and configs. Written into a hidden temporary folder beside `folder` and renamed
    into place at the end: an interrupted export leaves `folder` as it was."""
    import tempfile

    from ktjax.util.units import format_bytes

    out = os.path.abspath(folder)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        weight_bytes = _write_hf_folder(model, raw_config, tok, tmp, dtype)
        _swap_in(tmp, out)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {folder} ({format_bytes(weight_bytes)} of weights)")


def _write_hf_folder(model, raw_config: dict, tok, tmp: str, dtype: str) -> int:
    """export_hf's files, written into `tmp`; returns the bytes of weights written."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from ktjax.model.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(raw_config)
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    tensors = {k: (v.astype(np.float32) if "mlp.gate." in k else v.astype(target))
               for k, v in _hf_tensors(model, cfg).items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(dict(raw_config, torch_dtype=dtype), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, f, indent=2)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
                   "chat_template": CHAT_TEMPLATE, "model_max_length": raw_config["max_position_embeddings"],
                   "tokenizer_class": "TokenizersBackend", "clean_up_tokenization_spaces": False},
                  f, ensure_ascii=False, indent=2)
    return sum(v.nbytes for v in tensors.values())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ktjax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--text-dir", help="a folder of .txt files (default: the Python docs' reST sources)")
    p.add_argument("--stages", default=None,
                   help="SEQ_LEN:BATCH:STEPS:PASSKEY_FRACTION,... trained in order; pass-key examples are "
                        f"{MIN_PASSKEY_LEN}..SEQ_LEN tokens long (default: {DEFAULT_STAGES}; none with --init "
                        "and --mtp-steps)")
    p.add_argument("--minutes", type=float, default=60.0, help="stop early (and still export) after this long")
    p.add_argument("--eval-every", type=int, default=25, help="steps between pass-key checks on fresh examples")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of a new tokenizer")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak AdamW learning rate: 30 warm-up steps, then cosine decay to 10%% over all stages")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="exported weights")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    p.add_argument("--init", help="continue from an exported model folder (its tokenizer and config)")
    p.add_argument("--mtp-steps", type=int, default=0,
                   help="then train the multi-token-prediction module alone for this many steps (0: none)")
    p.add_argument("--mtp-seq", type=int, default=256, help="tokens per row of the MTP stage")
    p.add_argument("--mtp-batch", type=int, default=16, help="rows per step of the MTP stage")
    p.add_argument("--mtp-lr", type=float, default=1e-3, help="peak learning rate of the MTP stage")
    p.add_argument("--mtp-passkey", type=float, default=0.2, help="share of pass-key rows in the MTP stage")
    p.add_argument("--mtp-target", choices=("text", "model"), default="text",
                   help="text: the text's token after next; model: the main model's distribution there")
    args = p.parse_args(argv)
    if args.stages is None:
        args.stages = "" if args.init and args.mtp_steps else DEFAULT_STAGES
    refusal = _out_refusal(args.out, args.overwrite)
    if refusal:  # before an hour of training, not after
        print(f"error: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    return train(args)


def _swap_in(tmp: str, out: str):
    """Rename the finished folder `tmp` to `out`. An existing `out` (main has checked that --overwrite allows it)
    is renamed aside first and deleted only once the new folder is in place."""
    import shutil
    import tempfile

    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rename(out, backup)  # onto the empty folder reserved for it
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _out_refusal(out: str, overwrite: bool) -> str | None:
    """Why --out cannot be written, or None: a non-empty folder needs --overwrite, and a file is never one."""
    if os.path.lexists(out) and not os.path.isdir(out):
        return f"--out {out} exists and is not a folder; remove it or choose another --out"
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        return (f"--out {out} already exists and is not empty; pass --overwrite to replace it, or choose "
                "another --out")
    return None


if __name__ == "__main__":
    main()
