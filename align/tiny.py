"""Tiny random causal LMs (Llama by default; Qwen, Mistral, Gemma, Phi, GPT-NeoX, OLMo too) with
a locally trained tokenizer, for fast logic tests.

No download: the BPE tokenizer is trained on a few sentences in memory, the weights are
random. head_dim is 64 so that vLLM's CPU attention accepts the model (16 is unsupported).
"""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake it.",
    "The movie was wonderful, touching and funny. I loved the acting and the music.",
    "The film was boring and far too long; the plot made no sense at all.",
    "What is the capital of France? The capital of France is Paris.",
    "Please be helpful, honest and harmless when you answer a question.",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z .,!?'-:;()",
]


def make_tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# model_type -> config keys beyond the common ones (head_dim 64 for vLLM's CPU attention).
ARCHITECTURES = {
    "llama": {"num_key_value_heads": 1, "head_dim": 64},
    "qwen2": {"num_key_value_heads": 1},
    "qwen3": {"num_key_value_heads": 1, "head_dim": 64},
    "mistral": {"num_key_value_heads": 1, "head_dim": 64},
    "gemma2": {"num_key_value_heads": 1, "head_dim": 64, "query_pre_attn_scalar": 64},
    "phi3": {"num_key_value_heads": 1},
    "gpt_neox": {"rotary_pct": 0.5},
    "olmo2": {"num_key_value_heads": 1},
}


def make_tiny_model(out_dir: str | Path, *, arch: str = "llama", layers: int = 2, hidden: int = 128,
                    heads: int = 2, kv_heads: int = 1, intermediate: int = 256, seed: int = 0,
                    vocab_size: int = 512, **config_overrides) -> Path:
    """Write a random tiny causal LM of ``arch`` (a transformers model_type, see ARCHITECTURES)
    + tokenizer folder to ``out_dir``; return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    tok = make_tiny_tokenizer(vocab_size)
    extra = dict(ARCHITECTURES[arch])
    if "num_key_value_heads" in extra:
        extra["num_key_value_heads"] = kv_heads
    if "head_dim" in extra:
        extra["head_dim"] = hidden // heads
    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **{**extra, **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
