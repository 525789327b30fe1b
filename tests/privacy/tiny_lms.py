"""Tiny Hugging Face causal LMs built from configs (nothing downloaded), for exactness tests.

Every model has 2 layers, width 32, 4 heads and a vocabulary of 100 tokens; dropout is off, so that a
batch and a loop over its rows compute the same function."""
import torch

ARCHITECTURES = ("gpt2", "llama", "qwen2", "gpt-neox")
VOCAB, WIDTH, POSITIONS = 100, 32, 32


def config(arch: str, tied: bool):
    import transformers as tf

    common = dict(vocab_size=VOCAB, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(n_positions=POSITIONS, n_embd=WIDTH, n_layer=2, n_head=4, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=POSITIONS, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=POSITIONS, **common)
    if arch == "gpt-neox":
        return tf.GPTNeoXConfig(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=POSITIONS, hidden_dropout=0.0, attention_dropout=0.0,
                                **common)
    raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")


def build(arch: str, tied: bool = True, seed: int = 0, dtype=torch.float64):
    """A freshly initialised tiny causal LM of the architecture; tied input and output embeddings or not."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, tied)).to(dtype)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    return model


LORA_TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"],
                "qwen2": ["q_proj", "v_proj", "down_proj"], "gpt-neox": ["query_key_value", "dense_4h_to_h"]}


def with_lora(model, arch: str, rank: int = 4, seed: int = 0):
    """peft LoRA adapters on the attention and MLP projections, base frozen; B initialised at random (peft's
    default B = 0 would make every gradient of A zero at the start, which would test nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS[arch],
                     init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    return get_peft_model(model, cfg)
