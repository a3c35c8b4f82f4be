"""Hostile inputs, as tables of case builders for tests/test_hostile.py.

Each builder damages a copy of a model folder (ktjax/demo_model) or of a converted checkpoint in place and
returns the pattern that the one-line error message must match. Safetensors headers are built byte by byte,
since the `safetensors` package refuses to write the broken ones.
"""
import json
import os
import shutil
import struct

import numpy as np

from ktjax.demo import DEMO_MODEL_DIR
from ktjax.weights.safetensors_io import DTYPES, SafetensorsFile

SHARD = "model.safetensors"
_DTYPE_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}


# ---- folders -----------------------------------------------------------------------------------------

def model_copy(dst: str) -> str:
    """A private copy of the demo model folder (config, tokenizer, generation config, one shard)."""
    shutil.copytree(DEMO_MODEL_DIR, dst)
    return dst


def edit_json(path: str, **changes):
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    write_text(path, json.dumps(raw))


def write_text(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


def safetensors_bytes(header, data: bytes = b"", claimed: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (`claimed` overrides it), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def write_shard(folder: str, tensors: dict):
    """tensors (name -> array, float32 or bfloat16) written as the folder's only shard."""
    header, parts, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        parts.append(raw)
        offset += len(raw)
    with open(os.path.join(folder, SHARD), "wb") as f:
        f.write(safetensors_bytes(header, b"".join(parts)))


def demo_tensors(folder: str) -> dict:
    with SafetensorsFile(os.path.join(folder, SHARD)) as f:
        return {name: f.read(name) for name in f.keys()}


# ---- safetensors headers: (file bytes, pattern) ----------------------------------------------------------

def _one(dtype="F32", shape=(2,), offsets=(0, 8), **extra):
    return {"a": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}}


_F32x2 = bytes(8)
CORRUPT = "corrupt safetensors"
HEADERS = {
    "negative offset": (safetensors_bytes(_one(offsets=(-8, 0)), _F32x2), "data_offsets"),
    "overlapping tensors": (safetensors_bytes({**_one(), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                              bytes(12)), "gap or an overlap"),
    "gap between tensors": (safetensors_bytes({**_one(), "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}},
                                              bytes(20)), "gap or an overlap"),
    "first tensor not at 0": (safetensors_bytes(_one(offsets=(8, 16)), bytes(16)), "gap or an overlap"),
    "trailing bytes": (safetensors_bytes(_one(), bytes(12)), "4 bytes after the last tensor"),
    "data past the file's end": (safetensors_bytes(_one(), bytes(4)), "truncated"),
    "float offsets": (safetensors_bytes(_one(offsets=(0.0, 8.0)), _F32x2), "data_offsets"),
    "string offsets": (safetensors_bytes(_one(offsets=("0", "8")), _F32x2), "data_offsets"),
    "boolean offsets": (safetensors_bytes(_one(offsets=(False, 8)), _F32x2), "data_offsets"),
    "three offsets": (safetensors_bytes(_one(offsets=(0, 8, 16)), _F32x2), "data_offsets"),
    "NaN offset": (safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', _F32x2),
                   "data_offsets"),
    "duplicate tensor names": (safetensors_bytes(
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', bytes(16)), "'a' appears twice"),
    "non-UTF-8 header": (safetensors_bytes(b'{"a\xff": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
                                           _F32x2), CORRUPT),
    "header is a list": (safetensors_bytes([1, 2]), "not a JSON object"),
    "header is a string": (safetensors_bytes("tensors"), "not a JSON object"),
    "header nested 200k deep": (safetensors_bytes(b"[" * 200_000 + b"]" * 200_000), CORRUPT),
    "header not JSON": (safetensors_bytes(b"{not json"), CORRUPT),
    "header claims 0 bytes": (safetensors_bytes(b"", claimed=0), CORRUPT),
    "unknown dtype": (safetensors_bytes(_one(dtype="F7"), _F32x2), "unknown dtype 'F7'"),
    "dtype a number": (safetensors_bytes(_one(dtype=5), _F32x2), "unknown dtype"),
    "negative dimension": (safetensors_bytes(_one(shape=(-2,)), _F32x2), "shape"),
    "shape a string": (safetensors_bytes({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, _F32x2),
                       "shape"),
    "float dimension": (safetensors_bytes(_one(shape=(2.0,)), _F32x2), "shape"),
    "size disagrees with shape": (safetensors_bytes(_one(shape=(3,)), _F32x2), "8 bytes for shape"),
    "absurd shape": (safetensors_bytes(_one(shape=(2**40, 2**40)), _F32x2), "bytes for shape"),
    "entry not an object": (safetensors_bytes({"a": 5}), "needs exactly"),
    "entry without dtype": (safetensors_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}}, _F32x2), "needs exactly"),
    "entry with an extra key": (safetensors_bytes(_one(extra=1), _F32x2), "needs exactly"),
    "metadata of numbers": (safetensors_bytes({"__metadata__": {"k": 1}, **_one()}, _F32x2), "__metadata__"),
    "metadata a list": (safetensors_bytes({"__metadata__": ["k"], **_one()}, _F32x2), "__metadata__"),
    "header length past the file": (safetensors_bytes(b"{}", claimed=10**6), "claims 1000000 header bytes"),
    "header length over 100 MB": (safetensors_bytes(b"{}" + bytes(64), claimed=200_000_000), "claims 200000000"),
    "empty file": (b"", "truncated"),
    "seven bytes": (b"\x08" + bytes(6), "truncated"),
}


def header_case(name):
    data, pattern = HEADERS[name]

    def damage(folder):
        with open(os.path.join(folder, SHARD), "wb") as f:
            f.write(data)
        return pattern
    return damage


# ---- shard files that are not files, and indexes that point elsewhere --------------------------------------

def _replace_shard(folder, make):
    os.remove(os.path.join(folder, SHARD))
    make(os.path.join(folder, SHARD))


def _index(folder, weight_map):
    names = demo_tensors(folder)
    raw = {"metadata": {}, "weight_map": weight_map if weight_map is not None else {n: SHARD for n in names}}
    write_text(os.path.join(folder, "model.safetensors.index.json"), json.dumps(raw))


def _index_names(folder, shard):
    _index(folder, {n: shard for n in demo_tensors(folder)})


NOT_A_FILE = "not a regular file"
SHARD_FILES = {
    "shard is a FIFO": lambda d: _replace_shard(d, os.mkfifo) or NOT_A_FILE,
    "shard is a folder": lambda d: _replace_shard(d, os.mkdir) or NOT_A_FILE,
    "shard is a device": lambda d: _replace_shard(d, lambda p: os.symlink("/dev/zero", p)) or NOT_A_FILE,
    "shard is a dangling link": lambda d: _replace_shard(d, lambda p: os.symlink(p + ".gone", p)) or "not found",
    "index names a FIFO": lambda d: (os.mkfifo(os.path.join(d, "pipe.safetensors")),
                                     _index_names(d, "pipe.safetensors"))[-1] or NOT_A_FILE,
    "index names a file outside": lambda d: _index_names(d, "../" + SHARD) or "weight_map must map",
    "index names an absolute path": lambda d: _index_names(d, "/etc/passwd") or "weight_map must map",
    "index weight_map a list": lambda d: _index(d, [SHARD]) or "weight_map must map",
    "index shard name a number": lambda d: _index_names(d, 7) or "weight_map must map",
    "index names a missing shard": lambda d: _index_names(d, "gone.safetensors") or "download is incomplete",
    "index not JSON": lambda d: write_text(os.path.join(d, "model.safetensors.index.json"), "{") or
    "safetensors index is not valid JSON",
    "index with an integer of 5000 digits": lambda d: write_text(os.path.join(d, "model.safetensors.index.json"),
                                                                 '{"metadata": {"total_size": %s}}' % HUGE_INT) or
    "safetensors index holds an integer of 5000 digits",
}


# ---- weights with NaN or Inf --------------------------------------------------------------------------------

def non_finite(name, index, value):
    def damage(folder):
        tensors = demo_tensors(folder)
        bad = tensors[name].astype(np.float32)
        bad.reshape(-1)[index] = value
        tensors[name] = bad.astype(tensors[name].dtype)
        write_shard(folder, tensors)
        return rf"{name}'? holds 1 NaN or Inf"
    return damage


NON_FINITE = {
    "NaN in the embedding": non_finite("model.embed_tokens.weight", 5, np.nan),
    "+inf in a projection": non_finite("model.layers.0.self_attn.q_a_proj.weight", 0, np.inf),
    "-inf in an expert": non_finite("model.layers.2.mlp.experts.3.down_proj.weight", 17, -np.inf),
    "NaN in a norm": non_finite("model.norm.weight", 0, np.nan),
    "NaN in the router bias": non_finite("model.layers.1.mlp.gate.e_score_correction_bias", 2, np.nan),
}


# ---- config.json ------------------------------------------------------------------------------------------

def config_edit(pattern, **changes):
    def damage(folder):
        edit_json(os.path.join(folder, "config.json"), **changes)
        return pattern
    return damage


def config_text(text, pattern):
    def damage(folder):
        write_text(os.path.join(folder, "config.json"), text)
        return pattern
    return damage


# Past the bounded reader's limits (ktjax/util/jsonio.py): Python's int() raises past 4300 digits, its parser
# recurses past ~1000 levels.
HUGE_INT, DEEP = "1" * 5000, "[" * 20_000 + "]" * 20_000


def json_raw(file, key, raw, pattern):
    """`file`'s `key` set to the JSON text `raw` (json.dumps refuses to write a 5000-digit integer)."""
    def damage(folder):
        path = os.path.join(folder, file)
        with open(path) as f:
            data = json.load(f)
        data[key] = "@RAW@"
        write_text(path, json.dumps(data).replace('"@RAW@"', raw))
        return rf"{file}: .*{pattern}"
    return damage


CONFIGS = {
    "10 million layers": config_edit("num_hidden_layers=10000000 must be", num_hidden_layers=10_000_000),
    "vocabulary of 10**12": config_edit("vocab_size=1000000000000 must be", vocab_size=10**12),
    "hidden size a string": config_edit("hidden_size='192' must be", hidden_size="192"),
    "heads a float": config_edit("num_attention_heads=6.0 must be", num_attention_heads=6.0),
    "layers a boolean": config_edit("num_hidden_layers=True must be", num_hidden_layers=True),
    "negative rank": config_edit("kv_lora_rank=-64 must be", kv_lora_rank=-64),
    "zero layers": config_edit("num_hidden_layers=0 must be", num_hidden_layers=0),
    "required size null": config_edit("hidden_size=None must be", hidden_size=None),
    "rope parameters a list": config_edit("rope_parameters must be a JSON object", rope_parameters=[1, 2]),
    "rope theta a string": config_edit("rope_theta='big' must be", rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": "big"}),
    "yarn factor negative": config_edit("factor=-4 must be", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": -4, "original_max_position_embeddings": 256}),
    "yarn original length 0": config_edit("original_max_position_embeddings", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4, "original_max_position_embeddings": 0}),
    "unknown rope type": config_edit("rope type 'wild'", rope_parameters={"rope_type": "wild"}),
    "eps a string": config_edit("rms_norm_eps='tiny' must be", rms_norm_eps="tiny"),
    "eps infinite": config_edit("rms_norm_eps=inf must be", rms_norm_eps=float("inf")),
    "scaling factor a list": config_edit("routed_scaling_factor=\\[1\\] must be", routed_scaling_factor=[1]),
    "bias flag a string": config_edit("attention_bias='false' must be true or false", attention_bias="false"),
    "eos id a string": config_edit("eos_token_id='</s>' must be", eos_token_id="</s>"),
    "eos id negative in a list": config_edit("eos_token_id=-1 must be", eos_token_id=[1, -1]),
    "architectures a string": config_edit("architectures must be a list", architectures="DeepseekV3ForCausalLM"),
    "architectures an object": config_edit("architectures must be a list", architectures={"a": 1}),
    "experts per token 0": config_edit("num_experts_per_tok", num_experts_per_tok=0),
    "experts x layers absurd": config_edit("more than ktjax supports", n_routed_experts=8000, n_group=1,
                                           topk_group=1, num_hidden_layers=4000),
    "groups do not divide experts": config_edit("n_group=3", n_group=3),
    "activation unsupported": config_edit("hidden_act='gelu'", hidden_act="gelu"),
    "config a list": config_text("[1, 2, 3]", "must hold a JSON object, not a JSON list"),
    "config a number": config_text("42", "must hold a JSON object, not a number"),
    "config not JSON": config_text("{", "not valid JSON"),
    "config empty": config_text("", "not valid JSON"),
    "integer of 5000 digits": json_raw("config.json", "vocab_size", HUGE_INT, "holds an integer of 5000 digits"),
    "nested 20000 deep": json_raw("config.json", "rope_parameters", DEEP, "nested more than 64 deep"),
}


# ---- generation_config.json and tokenizer_config.json --------------------------------------------------------

def json_file_edit(file, pattern, text=None, **changes):
    def damage(folder):
        path = os.path.join(folder, file)
        if text is not None:
            write_text(path, text)
        else:
            edit_json(path, **changes)
        return rf"{file}: .*{pattern}"
    return damage


GENERATION_CONFIGS = {
    "temperature negative": json_file_edit("generation_config.json", "temperature=-5", temperature=-5),
    "top_p 7": json_file_edit("generation_config.json", r"top_p=7: must be a number in \(0, 1\]", top_p=7),
    "top_p 0": json_file_edit("generation_config.json", "top_p=0", top_p=0),
    "top_k negative": json_file_edit("generation_config.json", "top_k=-1", top_k=-1),
    "temperature a word": json_file_edit("generation_config.json", "temperature='hot' must be a number",
                                         temperature="hot"),
    "temperature NaN": json_file_edit("generation_config.json", "temperature=nan", text='{"temperature": NaN}'),
    "top_k a float": json_file_edit("generation_config.json", "top_k=1.5 must be an integer", top_k=1.5),
    "do_sample a string": json_file_edit("generation_config.json", "do_sample='yes'", do_sample="yes"),
    "eos id an object": json_file_edit("generation_config.json", "eos_token_id=", eos_token_id={"id": 1}),
    "generation config a list": json_file_edit("generation_config.json", "not a JSON list", text="[]"),
    "generation config not JSON": json_file_edit("generation_config.json", "not valid JSON", text="{"),
    "integer of 5000 digits": json_raw("generation_config.json", "top_k", HUGE_INT, "integer of 5000 digits"),
    "nested 20000 deep": json_raw("generation_config.json", "eos_token_id", DEEP, "nested more than 64 deep"),
}

def tokenizer_is_a_fifo(folder):
    os.remove(os.path.join(folder, "tokenizer.json"))
    os.mkfifo(os.path.join(folder, "tokenizer.json"))
    return "no tokenizer.json file"


TOKENIZER_CONFIGS = {
    "tokenizer.json a FIFO": tokenizer_is_a_fifo,
    "tokenizer config a list": json_file_edit("tokenizer_config.json", "not a JSON list", text="[1]"),
    "bos token a number": json_file_edit("tokenizer_config.json", "bos_token must be a token", bos_token=5),
    "eos token an object without content": json_file_edit("tokenizer_config.json", "eos_token must be a token",
                                                          eos_token={"id": 1}),
    "add_bos_token a string": json_file_edit("tokenizer_config.json", "add_bos_token='yes'", add_bos_token="yes"),
    "chat template a number": json_file_edit("tokenizer_config.json", "chat_template must be", chat_template=5),
    "chat templates not objects": json_file_edit("tokenizer_config.json", "chat_template must be",
                                                 chat_template=["{{ x }}"]),
    "tokenizer config not JSON": json_file_edit("tokenizer_config.json", "not valid JSON", text="{"),
    "integer of 5000 digits": json_raw("tokenizer_config.json", "model_max_length", HUGE_INT,
                                       "integer of 5000 digits"),
    "nested 20000 deep": json_raw("tokenizer_config.json", "chat_template", DEEP, "nested more than 64 deep"),
}


# ---- chat templates (run with --chat) --------------------------------------------------------------------------

FAILED = "the chat template failed: "
CHAT_TEMPLATES = {
    "division by zero": ("{{ 1 / 0 }}", FAILED + "ZeroDivisionError"),
    "range of 10**9": ("{% for i in range(10**9) %}x{% endfor %}", FAILED + ".*range"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     FAILED + ".*range"),
    "string of a billion": ("{{ 'a' * 10**9 }}", FAILED + ".*sequence of 1000000000"),
    "list of a billion": ("{{ ([1] * 10**9) | length }}", FAILED + ".*sequence of 1000000000"),
    "power tower": ("{{ 10 ** (10 ** 9) }}", FAILED + ".*bits"),
    "doubling a string": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s }}", FAILED + ".*(output passed|ran for more than)"),
    "endless computing": ("{% set ns = namespace(n=0) %}{% for i in range(999999) %}{% set ns.n = ns.n + i * i %}"
                          "{% endfor %}{{ ns.n }}", FAILED + ".*ran for more than"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", FAILED + "RecursionError"),
    "raise_exception": ("{{ raise_exception('no system role') }}", FAILED + "TemplateError: no system role"),
    "printf width": ("{{ '%0999999999d' % 1 }}", FAILED + ".*size of over"),
    "printf star width": ("{{ '%*d' % (999999999, 1) }}", FAILED + ".*size of over"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", FAILED + ".*size of over"),
    "center filter": ("{{ 'a' | center(999999999) }}", FAILED + ".*size of over"),
    "format filter": ("{{ '%0999999999d' | format(1) }}", FAILED + ".*size of over"),
    "attribute escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", FAILED + "SecurityError"),
    "list mutation": ("{% set x = [] %}{{ x.append(1) }}", FAILED + "SecurityError"),
    "syntax error": ("{% for %}", FAILED + "TemplateSyntaxError"),
    "undefined call": ("{{ nothing() }}", FAILED + "UndefinedError"),
    "type error": ("{{ messages + 1 }}", FAILED + "TypeError"),
}


def chat_template(name):
    template, pattern = CHAT_TEMPLATES[name]

    def damage(folder):
        edit_json(os.path.join(folder, "tokenizer_config.json"), chat_template=template)
        return pattern
    return damage


# ---- converted checkpoints ------------------------------------------------------------------------------------

def _manifest_path(ckpt):
    return os.path.join(ckpt, "manifest.json")


def manifest_edit(pattern, edit):
    def damage(ckpt):
        with open(_manifest_path(ckpt)) as f:
            manifest = json.load(f)
        edit(manifest)
        write_text(_manifest_path(ckpt), json.dumps(manifest))
        return pattern
    return damage


def _array(ckpt, key):
    return os.path.join(ckpt, "params", key)


def _chunk_files(ckpt, key):
    root = os.path.join(_array(ckpt, key), "c")
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs)


def remove_chunk(key, which=-1):
    def damage(ckpt):
        os.remove(_chunk_files(ckpt, key)[which])
        return rf"{key}.*is missing"
    return damage


def truncate_chunk(key):
    def damage(ckpt):
        os.truncate(_chunk_files(ckpt, key)[0], 10)
        return rf"cannot read tensor '{key}'"
    return damage


def chunk_is_a_folder(key):
    def damage(ckpt):
        chunk = _chunk_files(ckpt, key)[0]
        os.remove(chunk)
        os.mkdir(chunk)
        return rf"cannot read tensor '{key}'"
    return damage


def zarr_edit(key, pattern, **changes):
    def damage(ckpt):
        edit_json(os.path.join(_array(ckpt, key), "zarr.json"), **changes)
        return pattern
    return damage


def write_nan(key):
    def damage(ckpt):
        import tensorstore as ts

        from ktjax.weights.checkpoint import _spec
        store = ts.open(_spec(ckpt, key), open=True).result()
        store[(0,) * store.ndim].write(np.nan).result()
        reseal(ckpt, key)  # as if the writer had written the NaN: only the NaN check can catch it
        return rf"{key}'? holds 1 NaN or Inf"
    return damage


def reseal(ckpt, key):
    """Record the array's digest as it is now, as a writer would have."""
    from ktjax.weights.checkpoint import array_digest
    with open(_manifest_path(ckpt)) as f:
        manifest = json.load(f)
    entry = manifest["tensors"][key]
    entry["digest"] = array_digest(ckpt, key, entry)
    write_text(_manifest_path(ckpt), json.dumps(manifest))


# ---- damage written as a few bytes into a checksummed checkpoint (issue 32): refused naming the array --------

DIGEST = "do not match its digest"


def poke_chunk(key, pattern, edit, which=0):
    """edit(bytearray of one chunk file) in place; the chunk keeps its size."""
    def damage(ckpt):
        path = _chunk_files(ckpt, key)[which]
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        edit(raw)
        with open(path, "wb") as f:
            f.write(raw)
        return rf"cannot read tensor '{key}'.*{pattern}"
    return damage


def flip_bit(raw, at=None):
    raw[len(raw) // 2 if at is None else at] ^= 0x10


def swap_chunks(key, a, b):
    def damage(ckpt):
        files = _chunk_files(ckpt, key)
        os.rename(files[a], files[a] + ".tmp")
        os.rename(files[b], files[a])
        os.rename(files[a] + ".tmp", files[b])
        return rf"cannot read tensor '{key}'.*{DIGEST}"
    return damage


def zarr_endian(key, endian):
    def damage(ckpt):
        path = os.path.join(_array(ckpt, key), "zarr.json")
        with open(path) as f:
            meta = json.load(f)
        meta["codecs"][0]["configuration"] = {"endian": endian}
        write_text(path, json.dumps(meta))
        return rf"cannot read tensor '{key}'.*{DIGEST}"
    return damage


def relabel_everywhere(key, dtype):
    """The dtype edited in both the array's zarr.json and the manifest, so they agree: only the digest knows."""
    def damage(ckpt):
        edit_json(os.path.join(_array(ckpt, key), "zarr.json"), data_type=dtype)
        manifest_edit("", _set_tensor(key, dtype=dtype))(ckpt)
        return rf"cannot read tensor '{key}'.*{DIGEST}"
    return damage


def layer_is_a_symlink(layer, target):
    def damage(ckpt):
        folder = os.path.join(ckpt, "params", "layers", f"{layer:03d}")
        shutil.rmtree(folder)
        os.symlink(f"{target:03d}", folder)
        return rf"cannot read tensor 'layers/{layer:03d}/.*layers/{layer:03d} is a symbolic link, not a folder"
    return damage


def chunk_is_a_fifo(key):
    def damage(ckpt):
        chunk = _chunk_files(ckpt, key)[0]
        os.remove(chunk)
        os.mkfifo(chunk)
        return rf"cannot read tensor '{key}'.*is a FIFO, not a regular file"
    return damage


def arrays_swapped_with_their_entries(a, b):
    """Two same-shaped arrays exchanged, folders and manifest entries both: each looks whole but sits under the
    other's name."""
    def damage(ckpt):
        os.rename(_array(ckpt, a), _array(ckpt, a) + ".tmp")
        os.rename(_array(ckpt, b), _array(ckpt, a))
        os.rename(_array(ckpt, a) + ".tmp", _array(ckpt, b))

        def swap(m):
            m["tensors"][a], m["tensors"][b] = m["tensors"][b], m["tensors"][a]
        manifest_edit("", swap)(ckpt)
        return rf"cannot read tensor '({a}|{b})'.*{DIGEST}"
    return damage


EMBED, EXPERTS = "embed", "layers/002/mlp.w_down"


def _set_tensor(key, **entry):
    return lambda m: m["tensors"][key].update(entry)


CHECKPOINTS = {
    "chunk of the embedding deleted": remove_chunk(EMBED),
    "one expert's chunk deleted": remove_chunk(EXPERTS, 3),
    "array metadata deleted": lambda c: os.remove(os.path.join(_array(c, EMBED), "zarr.json")) or "not stored",
    "array folder deleted": lambda c: shutil.rmtree(_array(c, EXPERTS)) or "not stored",
    "array shape disagrees with manifest": zarr_edit(EMBED, "stored as .* but the manifest says", shape=[2048, 100]),
    "array dtype disagrees with manifest": zarr_edit(EMBED, "stored as int8", data_type="int8"),
    "array metadata not JSON": lambda c: write_text(os.path.join(_array(c, EMBED), "zarr.json"), "{") or
    "unreadable array metadata",
    "chunk truncated": truncate_chunk(EMBED),
    "chunk replaced by a folder": chunk_is_a_folder(EMBED),
    "NaN written into a tensor": write_nan(EMBED),
    "NaN written into an expert": write_nan(EXPERTS),
    "manifest a list": lambda c: write_text(_manifest_path(c), "[]") or "manifest.json: the checkpoint manifest must hold a JSON object",
    "manifest not JSON": lambda c: write_text(_manifest_path(c), "{") or "manifest.json: the checkpoint manifest is not valid JSON",
    "manifest missing": lambda c: os.remove(_manifest_path(c)) or "manifest.json: no such file",
    "manifest tensors a list": manifest_edit('"tensors" must be an object', lambda m: m.update(tensors=[])),
    "manifest tensors missing": manifest_edit('"tensors" must be an object', lambda m: m.pop("tensors")),
    "manifest unknown dtype": manifest_edit("tensor 'embed' has entry", _set_tensor(EMBED, dtype="complex512")),
    "manifest shape of strings": manifest_edit("tensor 'embed' has entry", _set_tensor(EMBED, shape=["2048", "192"])),
    "manifest shape absurd": manifest_edit("tensor 'embed' has entry", _set_tensor(EMBED, shape=[2**60, 192])),
    "manifest entry a string": manifest_edit("tensor 'embed' has entry", lambda m: m["tensors"].update(embed="x")),
    "manifest forgets a tensor": manifest_edit("has no tensor 'layers/002/mlp.w_down'",
                                               lambda m: m["tensors"].pop(EXPERTS)),
    "manifest shape disagrees with config": manifest_edit(r"shape \(2048, 100\) but config.json implies",
                                                          _set_tensor(EMBED, shape=[2048, 100])),
    "manifest layout version 99": manifest_edit("layout version 99", lambda m: m.update(layout_version=99)),
    "config disagrees with the arrays": lambda c: edit_json(os.path.join(c, "config.json"), vocab_size=1000) or
    r"'embed' has shape \(2048, 192\) but config.json implies \(1000, 192\)",
    "config of absurd size": lambda c: edit_json(os.path.join(c, "config.json"), num_hidden_layers=10**7) or
    "num_hidden_layers=10000000",
    # checksums (issue 32): each refused naming the array
    "bit flipped in a chunk": poke_chunk(EMBED, "Digest mismatch", flip_bit),
    "bit flipped in an expert's chunk": poke_chunk(EXPERTS, "Digest mismatch", flip_bit, which=5),
    "bit flipped in a chunk's crc32c": poke_chunk(EMBED, DIGEST, lambda raw: flip_bit(raw, at=-2)),
    "chunk zeroed": poke_chunk(EMBED, DIGEST, lambda raw: raw.__setitem__(slice(None), bytes(len(raw)))),
    "two expert chunks swapped": swap_chunks(EXPERTS, 0, 1),
    "endianness edited in the array metadata": zarr_endian(EMBED, "big"),
    "dtype edited in metadata and manifest alike": relabel_everywhere(EMBED, "float16"),
    "layer folder a symlink to another layer": layer_is_a_symlink(1, 2),
    "chunk a FIFO": chunk_is_a_fifo(EMBED),
    "expert chunk a FIFO": chunk_is_a_fifo(EXPERTS),
    "manifest calls a float tensor int8": manifest_edit(r"'embed' is stored as bfloat16 \[2048, 192\] but the "
                                                        "manifest says int8", _set_tensor(EMBED, dtype="int8")),
    "manifest calls an expert stack int8": manifest_edit(rf"'{EXPERTS}' is stored as \w+ .* but the manifest says "
                                                         "int8", _set_tensor(EXPERTS, dtype="int8")),
    "two layers' arrays swapped with their entries": arrays_swapped_with_their_entries(
        "layers/001/attn.o_proj.kernel", "layers/002/attn.o_proj.kernel"),
    "manifest entry without its digest": manifest_edit(r"cannot read tensor 'embed'.*has no digest",
                                                       lambda m: m["tensors"][EMBED].pop("digest")),
    "manifest digests of an unknown kind": manifest_edit("digests 'sha3'", lambda m: m.update(digests="sha3")),
}


# ---- structured inputs, text, output and signals of the command lines (issue 32) ------------------------------

CHECKPOINT_LIMITS = {
    "manifest with an integer of 5000 digits": json_raw("manifest.json", "layout_version", HUGE_INT,
                                                        "checkpoint manifest holds an integer of 5000 digits"),
    "manifest nested 20000 deep": json_raw("manifest.json", "source", DEEP, "nested more than 64 deep"),
}


def alias_bomb(key="temperature", levels=9):
    """A YAML "billion laughs" inside one setting: 9**9 strings once every alias is expanded."""
    lines = [f"{key}:", "  - &a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lines += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def preset(text):
    def make(world):
        path = os.path.join(world, "preset.yaml")
        write_text(path, text)
        return ["--config", path]
    return make


def fifo_at(name, flag):
    def make(world):
        os.mkfifo(os.path.join(world, name))
        return [flag, os.path.join(world, name)]
    return make


def prompt_file(data: bytes, size: int | None = None):
    """A prompt file of `data` (`size`: a sparse file of that many bytes instead)."""
    def make(world):
        path = os.path.join(world, "prompt.txt")
        with open(path, "wb") as f:
            f.write(data)
            if size is not None:
                f.truncate(size)
        return ["--prompt-file", path]
    return make


NOT_UTF8 = "\udcff"  # how Python keeps the byte 0xff of a command-line argument (surrogateescape)

# python -m ktjax.generate: world -> argv, and the one line's pattern (exit 2)
GENERATE_ARGS = {
    "preset: integer of 5000 digits": (preset(f"seed: {HUGE_INT}\n"), "holds an integer of 5000 digits"),
    "preset: alias bomb in a known setting": (preset(alias_bomb()), "more than 10000 values with its aliases"),
    "preset: alias bomb in an unknown key": (preset(alias_bomb("bomb")), "more than 10000 values"),
    "preset: nested 20000 deep": (preset(f"temperature: {DEEP}\n"), "nested more than 32 deep"),
    "preset: over 64 KiB": (preset("# " + "x" * 70_000 + "\n"), "larger than 64 KiB"),
    "preset: a string of 60000 characters": (preset("cache_dtype: " + "x" * 60_000 + "\n"),
                                             r"cache_dtype='x+\.\.\.x+': unknown"),
    "preset: a FIFO": (fifo_at("preset.yaml", "--config"), "not a regular file"),
    "--seed of 5000 digits": (lambda w: ["--seed", HUGE_INT], r"seed='1+\.\.\.1+': must be a whole number"),
    "--max-new-tokens of 5000 digits": (lambda w: ["--max-new-tokens", HUGE_INT], "max_new_tokens='1+\\.\\.\\."),
    "--memory-budget of 5000 digits": (lambda w: ["--memory-budget", HUGE_INT], "memory size '1+\\.\\.\\."),
    "--prompt not UTF-8": (lambda w: ["--prompt", "caf" + NOT_UTF8], "--prompt: byte 0xff at character 3"),
    "--prompt-file name not UTF-8": (lambda w: ["--prompt-file", "a" + NOT_UTF8], "--prompt-file: byte 0xff"),
    "--model name not UTF-8": (lambda w: ["--model", NOT_UTF8], "--model: byte 0xff"),
    "--prompt-file not UTF-8 text": (prompt_file(b"ok \xff\xfe"), "not UTF-8 text \\(byte 3\\)"),
    "--prompt-file a FIFO": (fifo_at("prompt.fifo", "--prompt-file"), "not a regular file"),
    "--prompt-file past the window by its bytes": (prompt_file(b"word " * 40_000),
                                                   r"200000 bytes are at least \d+ tokens .* window of 1024"),
    "--prompt-file over 64 MiB": (prompt_file(b"", size=65 * 2**20), "more than any model's window holds"),
}

# python -m ktjax.serve: world -> argv, and the pattern (exit 2, before any model is loaded)
SERVE_ARGS = {
    "--port of 5000 digits": (lambda w: ["--port", HUGE_INT], "must be a whole number from 0 to 65535"),
    "--header-timeout -1": (lambda w: ["--header-timeout", "-1"], "must be a number of seconds"),
    "--config a FIFO": (fifo_at("preset.yaml", "--config"), "not a regular file"),
    "--config alias bomb": (preset(alias_bomb()), "more than 10000 values"),
    "--api-key not UTF-8": (lambda w: ["--api-key", "key" + NOT_UTF8], "--api-key: byte 0xff"),
}

# the converter: world -> (--hf-dir, --out), and the pattern (exit 2, nothing written)
CONVERT_ARGS = {
    "--out not UTF-8": (lambda w: (DEMO_MODEL_DIR, os.path.join(w, "ckpt" + NOT_UTF8)), "--out .*byte 0xff"),
    "--hf-dir not UTF-8": (lambda w: (os.path.join(w, NOT_UTF8), os.path.join(w, "ckpt")), "--hf-dir .*byte 0xff"),
}


def _broken_pipe():
    read, write = os.pipe()
    os.close(read)
    return os.fdopen(write, "w")


# stdout as the command finds it: () -> a file object (None: closed), exit code, the one line (None: quiet)
STDOUTS = {
    "a broken pipe (| head -c 3)": (_broken_pipe, 1, None),
    "a full device (> /dev/full)": (lambda: open("/dev/full", "w"), 1, "No space left on device"),
    "closed (>&-)": (lambda: None, 1, "stdout is closed"),
}

# Engine.generate's prompts (token ids, or text for the tokenizer): prompts, and the pattern of the one KtjaxError
TOKEN_IDS = {
    "floats": ([[1.5, 2.0]], r"must be integers, got 1\.5 \(float\)"),
    "whole floats": ([[1.0, 2.0]], r"must be integers, got 1\.0"),
    "strings": ([["1", "2"]], "must be integers, got '1' \\(str\\)"),
    "booleans": ([[True, False]], "must be integers, got True"),
    "a boolean among integers": ([[5, True]], "must be integers, got True"),
    "numpy floats": (np.array([[1.0, 2.0]]), "must be integers, got np.float64"),
    "an integer past the vocabulary": ([[1, 10**30]], r"must lie in \[0, 2048\)"),
    "a number, not a list": ([1, 2], "each prompt must be a list of token ids"),
    "an empty prompt": ([[]], "at least one token"),
    "text with a lone surrogate": (["a\ud800b"], r"the prompt is not text: character 1 is a lone surrogate"),
    "chat text with a lone surrogate": (None, r"the prompt is not text: .*lone surrogate"),
}
