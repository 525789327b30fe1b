"""LMRecipe: validated on creation, round-trips through JSON, device and dtype resolved explicitly."""

import json

import pytest

from expunge.errors import ExpungeError
from expunge.lm import LMRecipe


def test_round_trip_and_resolution():
    recipe = LMRecipe(model="tiny-gpt2", lora_rank=4, lora_targets=["c_attn"], batch_size=4, grad_accum=3)
    assert recipe.step_rows == 12 and recipe.lora and recipe.lora_targets == ("c_attn",)
    assert LMRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    resolved = recipe.resolved()
    assert resolved.device in ("cpu", "cuda") and resolved.dtype in ("float32", "bfloat16")
    assert LMRecipe(device="cpu", dtype="bfloat16").resolved().dtype == "bfloat16"


def test_an_automatic_rate_round_trips_and_old_manifests_still_load():
    auto = LMRecipe(lr_auto=True, lr_every=2.0, schedule="cosine")
    assert auto.lr_every == 2 and LMRecipe.from_dict(json.loads(json.dumps(auto.to_dict()))) == auto
    old = LMRecipe().to_dict()
    del old["lr_auto"], old["lr_every"]  # a manifest written before the fields existed
    assert LMRecipe.from_dict(old) == LMRecipe() and not LMRecipe.from_dict(old).lr_auto


@pytest.mark.parametrize("settings, message", [
    (dict(epochs=0), "epochs must be a whole number"),
    (dict(batch_size=2.5), "batch_size must be a whole number"),
    (dict(max_length=1), "at least 2 tokens"),
    (dict(lr=0), "learning rate"),
    (dict(optimizer="adam"), "unknown optimizer"),
    (dict(schedule="step"), "unknown schedule"),
    (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(lora_targets=()), "lora_targets is empty"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(dtype="float16"), "unknown dtype"),
    (dict(seed=-1), "seed"),
    ({"lr_auto": "yes"}, "lr_auto must be true or false"),
    ({"lr_every": 0}, "lr_every"),
    ({"lr_auto": True, "warmup_steps": 2}, "has no warm-up"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ExpungeError, match=message):
        LMRecipe(**settings)
    with pytest.raises(ExpungeError, match="unknown LM recipe field"):
        LMRecipe.from_dict({"model": "tiny-llama", "epoch": 3})
