"""A small real-format tokenizer folder: tokenizer.json from `tokenizers`, tokenizer_config.json with an
AddedToken BOS and a DeepSeek-style Jinja chat template (as DeepSeek-V2-Lite-Chat ships)."""
import json
import os

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")
TEXT = ("User: hello there. Assistant: the quick brown fox jumps over the lazy dog. "
        "Reading a long document needs a long context and a small cache. ") * 20


def write_tokenizer(folder: str, vocab_size: int = 97):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=sorted(set(pre_tokenizers.ByteLevel.alphabet()))[:0])
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "legacy": True,
              "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False},
              "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False},
              "model_max_length": 4096, "pad_token": None, "tokenizer_class": "LlamaTokenizerFast",
              "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return tok
