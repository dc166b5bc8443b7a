"""Write a tiny random Llama model that vLLM can serve on a CPU.

The test stack needs a real OpenAI-compatible server but cannot download
weights, so we make a 3 MB model whose output is random tokens.  Everything is
seeded and trained on files inside the image, so a rebuild gives the same model.

Usage: python make_tiny_model.py OUT_DIR
"""

import json
import pathlib
import sys
import sysconfig

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SEED = 0
VOCAB_SIZE = 2048
# Positions for long test streams; a deployment chooses its context with --max-model-len.
MAX_LEN = 32768
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Reasoning markers, as Qwen3 has them: plain added tokens (kept in decoded text), so that vLLM's
# `--reasoning-parser deepseek_r1` can split reasoning from the answer. Their ids come after the
# trained vocabulary: 2048 and 2049 (asserted below; tests bias the sampling towards </think>).
THINK_TOKENS = ["<think>", "</think>"]
# ChatML. Like Qwen3's template, the answer starts after a closed, empty think block unless the
# request asks for thinking (vLLM 0.32 sets enable_thinking from `reasoning_effort`, which the DCE
# extension sends): vLLM then reads what the model writes as reasoning until it writes </think>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking %}{{ '<think>\n' }}"
    "{% else %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def training_text():
    # The stdlib sources are in every Python install and fixed by its version.
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


def make_tokenizer(out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    tok.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINK_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    # Written by hand: transformers 5's save_pretrained() would name the class
    # TokenizersBackend and move the template to chat_template.jinja, which
    # older readers (and vLLM's chat path) do not pick up the same way.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": MAX_LEN,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    assert [ids[t] for t in THINK_TOKENS] == [VOCAB_SIZE, VOCAB_SIZE + 1], ids

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim 32 suits vLLM's CPU attention kernel
        intermediate_size=256,
        max_position_embeddings=MAX_LEN,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)

    # Fail the image build, not the first request, if the tokenizer is off.
    loaded = AutoTokenizer.from_pretrained(out)
    prompt = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", prompt
    thinking = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinking.endswith("<|im_start|>assistant\n<think>\n"), thinking
    assert loaded.convert_tokens_to_ids(THINK_TOKENS) == [ids[t] for t in THINK_TOKENS]
    assert loaded.eos_token_id == ids["<|im_end|>"]
    text = "def f(x):\n    return x  # héllo"
    assert loaded.decode(loaded(text)["input_ids"]) == text
    print(f"wrote {out}: vocab {tok.get_vocab_size()}, special ids {ids}")


if __name__ == "__main__":
    main()
