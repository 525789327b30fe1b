"""The language-model side of the commands: `expunge train --task lm` and what `info` shows of an LM run."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExpungeError
from .app import console
from .report import print_privacy


def parse_tiny_config(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExpungeError(f"--tiny-config must be a JSON object of config entries, e.g. "
                           f"'{{\"hidden_size\": 64}}' ({e})") from None
    if not isinstance(config, dict):
        raise ExpungeError("--tiny-config must be a JSON object of config entries, e.g. '{\"hidden_size\": 64}'")
    return config


def train_lm_run(data: list[str], out: Path, *, model: str, epochs: int, lr: float, lr_auto: bool, lr_every: int,
                 batch_size: int, grad_accum: int,
                 max_length: int, optimizer: str, weight_decay: float, momentum: float, schedule: str,
                 warmup_steps: int, max_grad_norm: float | None, lora_rank: int, lora_alpha: float | None,
                 lora_targets: str | None, vocab_size: int, device: str | None, dtype: str | None, seed: int,
                 tiny_config: str | None, truncate_documents: bool, public_data: list[str],
                 public_epochs: int | None, dp: bool, epsilon: float | None, delta: float | None,
                 noise_multiplier: float | None, clip_fn: str, clipping: str, physical_batch_size: int | None,
                 accountant: str, signing_key, quiet: bool, init=None, nproc: int = 1) -> dict:
    """Read the corpus, check everything, train and write the run; returns the training's ledger report."""
    from ..lm import LMRecipe, load_corpus
    from ..unlearn.lm_run import LMPrivateTraining, LMRetrain, LMRun

    recipe = LMRecipe(model=model, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      max_length=max_length, optimizer=optimizer.lower(), weight_decay=weight_decay, momentum=momentum,
                      schedule=schedule, warmup_steps=warmup_steps, max_grad_norm=None if dp else max_grad_norm,
                      lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_targets=tuple(t.strip() for t in lora_targets.split(",")) if lora_targets else None,
                      vocab_size=vocab_size, device=device, dtype=dtype, seed=seed, lr_auto=lr_auto,
                      lr_every=lr_every)
    sources = [str(Path(d).resolve()) for d in data]
    corpus = load_corpus(sources)
    public = load_corpus([str(Path(d).resolve()) for d in public_data], name="public") if public_data else None
    if dp:
        updater = LMPrivateTraining(epsilon=epsilon, delta=1e-5 if delta is None else delta,
                                    noise_multiplier=noise_multiplier, max_grad_norm=1.0 if max_grad_norm is None
                                    else max_grad_norm, clipping=clipping, clip_fn=clip_fn,
                                    physical_batch_size=physical_batch_size, accountant=accountant, nproc=nproc)
    else:
        updater = LMRetrain()
    run = LMRun.train(corpus, recipe, updater, out=out, source=sources, public=public,
                      public_source=[str(Path(d).resolve()) for d in public_data] or None, public_epochs=public_epochs,
                      tiny_config=parse_tiny_config(tiny_config), truncate_documents=truncate_documents,
                      progress=not quiet, signing_key=signing_key, init=init)
    report = run.ledger.entries()[-1]["report"]
    if not quiet:
        info, metrics = run.manifest["lm"], report["metrics"]
        lora = f", LoRA rank {recipe.lora_rank}" if recipe.lora else ""
        console.print(f"trained {model} ({info['parameters']:,} parameters, {info['trainable_parameters']:,} trained"
                      f"{lora}) on {len(corpus)} rows, {metrics['steps']} steps in {report['seconds']:.2f} s"
                      + (f" ({nproc} processes, data parallel)" if nproc > 1 else "") + ", "
                      f"final loss {metrics['final_loss']:.4f} -> {out}", highlight=False)
        console.print(f"model (AutoModelForCausalLM/AutoTokenizer.from_pretrained): {run.model_path}", highlight=False)
        if info.get("public"):
            console.print(f"public phase: {info['public']['rows']} rows, {info['public']['steps']} steps (adds nothing "
                          "to epsilon; retraining starts after it)", highlight=False)
        if metrics.get("rates"):
            rates = metrics["rates"]
            console.print(f"GeN learning rate: {rates[0]:.4g} at the start, {min(rates):.4g}..{max(rates):.4g} during "
                          f"training, {rates[-1]:.4g} at the end (recorded in the ledger's train entry)",
                          highlight=False)
        if dp:
            print_privacy(report["guarantee"]["privacy"])
        for note in report["notes"]:
            console.print(f"[yellow]note[/] {note}", highlight=False)
    return report


def describe_lm(fitted, table, summary: dict) -> None:
    """Add a language-model run's own rows to `expunge info`'s table and summary."""
    described = summary["lm"] = fitted.describe()
    table.add_row("model", f"{described['model']['kind']} {described['model']['source']} "
                  f"({described['model']['parameters']:,} parameters, {described['model']['trainable_parameters']:,} "
                  "trained)")
    table.add_row("from_pretrained", described["model_path"] + " (model and tokenizer)")
    if described["lora"]:
        lora = described["lora"]
        table.add_row("lora", f"rank {lora['rank']}, alpha {lora['alpha']:g}; base weights hash {lora['base_hash']}")
    if described["public"]:
        table.add_row("public phase", f"{described['public']['rows']} rows, {described['public']['steps']} steps")
    groups = described["groups"]
    table.add_row(f"groups ({len(groups)})", ", ".join(
        f"{name} {counts['rows']}" + (f" ({counts['deleted']} deleted)" if counts["deleted"] else "")
        for name, counts in groups.items()))
    table.add_row("threads", f"{described['threads']} (retraining uses the same count: CPU sums depend on it)")
