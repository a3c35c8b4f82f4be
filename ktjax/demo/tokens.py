"""The demo model's tokenizer: its special tokens, its chat template, and the byte-level tokenizer built in memory
when the trained model's folder is missing."""
from __future__ import annotations

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def demo_tokenizer():
    """Byte-level BPE with no merges: the special tokens first (ids 0..3, as in the trained tokenizer, whose
    ids the demo architecture's bos_token_id and eos_token_id name), then every byte (ids 4..259)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from ktjax.runtime.tokenizer import Tokenizer

    alphabet = ByteLevel.alphabet()
    vocab = {special: i for i, special in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + _byte_of(ch) for ch in alphabet})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok, {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "add_bos_token": True,
                           "chat_template": CHAT_TEMPLATE})


def _byte_of(ch: str) -> int:
    """GPT-2's byte-to-unicode map, inverted: printable bytes map to themselves, the rest to 256 + n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
