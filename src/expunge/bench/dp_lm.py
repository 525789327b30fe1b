"""Throughput and peak memory of one private training step of Hugging Face causal LMs with tied embeddings.

Models (built from configs, freshly initialised: nothing is downloaded; random token ids):

- gpt2: GPT2LMHeadModel with GPT-2's widths (n_embd 768, 12 heads, vocabulary 50257, 1024 positions, tied
  input/output embeddings), LAYERS["gpt2"] blocks on the CPU (the full 12 with --device cuda);
- smollm2: LlamaForCausalLM with SmolLM2-135M's widths (hidden 576, 9 heads, 3 key/value heads,
  intermediate 1536, vocabulary 49152, RoPE theta 100000, tied), LAYERS["smollm2"] blocks on the CPU (the
  full 30 with --device cuda).

Dropout is off. One step = zero_grad, forward, the loss, backward, optimizer step (SGD), on a fixed batch
of `batch_size` sequences of `seq_len` tokens; the loss is expunge.privacy.causal_lm_loss (each row's mean
next-token loss, mean over rows), which is also what Opacus's ghost criterion computes per row.

Modes: ``non-private`` (plain torch), ``expunge all-layer``, ``expunge group-wise`` (one clipping group per
layer) and ``opacus ghost`` (Opacus 1.6, grad_sample_mode="ghost": two backward passes). Opacus refuses tied
weights ("Parameter tying is not supported with Ghost Clipping"), so it trains an untied copy (the output
head gets its own V x d weight: more parameters to update; the row says so), and its embedding sampler
takes the batch size from the position ids, which GPT-2 makes of shape (1, T) (Opacus issue #841): its model
is given position ids of shape (B, T). Every private mode clips at C = 1 and adds noise of multiplier 1.

On the CPU the timing and memory method is dp-engine's (see expunge.bench.dp_engine): one intra-op thread
per worker process, REPLICAS workers per mode kept alive, modes interleaved round by round, the median step;
peak memory from a fresh process per (model, mode), resident high-water mark above the baseline after the
same imports. With ``device="cuda"`` (batch 32, sequence 256, the full depths) every case lives in this
process: peak memory is torch.cuda.max_memory_allocated above what was allocated before the case was built,
measured one case at a time; steps are timed with synchronisation, modes interleaved round by round.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import report
from .rounds import SPREAD_HEADER, rounds_text, spread_text

MODELS = ("gpt2", "smollm2")
MODES = ("non-private", "expunge all-layer", "expunge group-wise", "opacus ghost")
LAYERS = {"gpt2": 2, "smollm2": 2}  # on the CPU: the benchmark takes a few minutes on 2 cores
FULL_LAYERS = {"gpt2": 12, "smollm2": 30}  # --device cuda: GPT-2 124M, SmolLM2-135M
BATCH = {"cpu": 8, "cuda": 32}
SEQ = {"cpu": 128, "cuda": 256}
NOISE, CLIP = 1.0, 1.0


def config(name: str, layers: int, tiny: bool = False, tied: bool = True):
    import transformers as tf

    if name == "gpt2":
        width = dict(n_embd=32, n_head=4, vocab_size=100) if tiny else dict(n_embd=768, n_head=12, vocab_size=50257)
        return tf.GPT2Config(n_layer=layers, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **width)
    if name == "smollm2":
        width = (dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=1, intermediate_size=48,
                      vocab_size=100) if tiny else
                 dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                      vocab_size=49152))
        return tf.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, rope_theta=100000.0,
                              rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
                              pad_token_id=None, **width)
    raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")


def build_model(name: str, layers: int, tiny: bool = False, tied: bool = True, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(name, layers, tiny, tied))
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    return model


class LogitsOf(nn.Module):
    """Opacus's view of the model: token ids in, logits out, with position ids of shape (B, T)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1).contiguous()
        return self.model(input_ids=ids, position_ids=positions).logits


class LMCase:
    """The model, optimizer, batch and private wrapper of one (model, mode); step() trains once."""

    def __init__(self, model_name: str, mode: str, batch_size: int, tiny: bool = False, *, seq_len: int,
                 layers: dict | None = None, device: str = "cpu", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        from ..privacy import causal_lm_loss, make_private

        self.model_name, self.mode, self.batch_size, self.seq_len = model_name, mode, batch_size, seq_len
        n_layers = (layers or LAYERS)[model_name]
        untied = mode == "opacus ghost"
        model = build_model(model_name, n_layers, tiny, tied=not untied, seed=seed).to(device)
        self.layers, self.tied = n_layers, not untied
        self.params = sum(p.numel() for p in model.parameters())
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
        self.labels = self.ids.clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.loss_fn = causal_lm_loss
        self.criterion = self.engine = None
        if mode.startswith("expunge"):
            self.engine = make_private(model, optimizer, (self.ids, self.labels), batch_size=batch_size,
                                       noise_multiplier=NOISE, max_grad_norm=CLIP, seed=seed,
                                       clipping="all-layer" if mode == "expunge all-layer" else "layer-wise")
            optimizer = self.engine.optimizer
        elif mode == "opacus ghost":
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            model = LogitsOf(model)
            loader = DataLoader(TensorDataset(self.ids, self.labels), batch_size=batch_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, optimizer, self.criterion, _ = PrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE,
                    max_grad_norm=CLIP, poisson_sampling=False, criterion=nn.CrossEntropyLoss(ignore_index=-100),
                    grad_sample_mode="ghost")
            # Opacus's criterion sees every position: shift the labels (the last position predicts nothing)
            self.shifted = torch.nn.functional.pad(self.labels[:, 1:], (0, 1), value=-100)
        self.model, self.optimizer = model, optimizer

    def loss(self):
        if self.criterion is None:
            return self.loss_fn(self.model(input_ids=self.ids).logits, self.labels)
        logits = self.model(self.ids)
        return self.criterion(logits.reshape(-1, logits.shape[-1]), self.shifted.reshape(-1), shape=logits.shape)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        self.optimizer.step()


def case_factory(seq_len: int, layers: dict | None = None, device: str = "cpu"):
    """A picklable factory (model_name, mode, batch_size, tiny) -> LMCase for dp-engine's workers."""
    return functools.partial(LMCase, seq_len=seq_len, layers=layers, device=device)


# -- on a GPU: every case in this process --------------------------------------------------------------------

class CudaMeter:
    """Synchronisation and peak memory on the current CUDA device."""
    method = "torch.cuda.max_memory_allocated above the allocation before the case was built"

    def sync(self) -> None:
        torch.cuda.synchronize()

    def start(self) -> None:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20


class CpuMeter:
    """The same protocol in this process on the CPU (tests of the in-process path: memory only indicative)."""
    method = "VmHWM in process (indicative)"

    def sync(self) -> None:
        pass

    def start(self) -> None:
        from .dp_engine import PeakMemory

        self.memory = PeakMemory()

    def peak_mb(self) -> float:
        return self.memory.peak_mb()


def run_in_process(models, modes, batch_size, seq_len, layers, repeats, tiny, device, meter, say,
                   steps_per_round: int = 3) -> list[dict]:
    """Every case in this process (a GPU's): peak memory one case at a time, then the modes interleaved
    round by round, `steps_per_round` synchronised steps each; the median step."""
    rows = []
    for model_name in models:
        peaks = {}
        for mode in modes:
            say(f"{model_name}: peak memory of {mode}")
            meter.start()
            case = LMCase(model_name, mode, batch_size, tiny, seq_len=seq_len, layers=layers, device=device)
            for _ in range(3):
                case.step()
            peaks[mode] = meter.peak_mb()
            del case
        cases = {mode: LMCase(model_name, mode, batch_size, tiny, seq_len=seq_len, layers=layers, device=device)
                 for mode in modes}
        times = {mode: [] for mode in modes}
        for r in range(repeats + 1):  # round 0 warms up
            for mode, case in cases.items():
                for _ in range(steps_per_round):
                    meter.sync()
                    start = time.perf_counter()
                    case.step()
                    meter.sync()
                    if r:
                        times[mode].append(time.perf_counter() - start)
            if r:
                say(f"{model_name}: round {r}/{repeats}: "
                    + ", ".join(f"{m} {1e3 * statistics.median(times[m]):.0f} ms" for m in modes))
        for mode in modes:
            seconds = statistics.median(times[mode])
            rows.append({"model": model_name, "mode": mode, "batch_size": batch_size, "params": cases[mode].params,
                         "step_ms": 1e3 * seconds, "samples_per_s": batch_size / seconds, "peak_mem_mb": peaks[mode],
                         "mem_method": meter.method, "repeats": repeats, "steps": len(times[mode])})
        del cases
    return rows


# -- the benchmark ---------------------------------------------------------------------------------------------

def run(repeats: int | None = None, models=MODELS, modes=MODES, batch_size: int | None = None, seq_len: int | None = None,
        layers: dict | None = None, device: str = "cpu", tiny: bool = False, isolate: bool = True,
        round_s: float | None = None, replicas: int | None = None, progress: bool = True, console=None) -> list[dict]:
    """Measure every (model, mode) on `device`; rows with tokens per second, peak memory, ratios to non-private."""
    from . import dp_engine

    batch_size = batch_size or BATCH["cuda" if device == "cuda" else "cpu"]
    seq_len = seq_len or SEQ["cuda" if device == "cuda" else "cpu"]
    layers = {**(FULL_LAYERS if device == "cuda" else LAYERS), **(layers or {})}

    def say(text):
        if progress and console is not None:
            console.print(f"[dim]{text}[/dim]")

    if device == "cuda":
        rows = run_in_process(models, modes, batch_size, seq_len, layers, repeats or 3, tiny, "cuda", CudaMeter(), say)
        threads = None
    elif device == "cpu":
        kwargs = {} if round_s is None else {"round_s": round_s}
        if replicas is not None:
            kwargs["replicas"] = replicas
        rows = dp_engine.run(repeats=repeats, models=models, modes=modes,
                             batch_sizes={m: batch_size for m in models}, tiny=tiny, isolate=isolate,
                             progress=progress, console=console, factory=case_factory(seq_len, layers), **kwargs)
        threads = rows[0]["threads"] if rows else None
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    for row in rows:
        row.update(seq_len=seq_len, layers=layers[row["model"]], device=device, threads=threads,
                   tokens_per_s=row["samples_per_s"] * seq_len,
                   tied=row["mode"] != "opacus ghost",
                   note="untied copy (Opacus refuses tied weights); position ids (B, T)"
                   if row["mode"] == "opacus ghost" else "")
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "non-private"), None)
        row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        row["memory_ratio"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base and base["peak_mem_mb"] else math.nan
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    where = rows[0]["device"] if rows else "cpu"
    threads = rows[0].get("threads") if rows else None
    t = Table(title=f"One training step of a Hugging Face causal LM (tied embeddings) on {where}"
                    + (f", {threads} thread(s)" if threads else "") + ": median step; ratios to non-private")
    for col in ("model", "layers", "mode", "batch", "seq", "tokens/s", "ms/step", "throughput ratio", SPREAD_HEADER,
                "rounds", "CPU-time ratio", "peak MB", "memory ratio", "note"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["model"], str(r["layers"]), r["mode"], str(r["batch_size"]), str(r["seq_len"]),
                  f"{r['tokens_per_s']:.0f}", f"{r['step_ms']:.0f}", f"{r['throughput_ratio']:.2f}",
                  spread_text(r, "throughput_ratio"), rounds_text(r),
                  f"{r.get('cpu_throughput_ratio', math.nan):.2f}", f"{r['peak_mem_mb']:.0f}",
                  f"{r['memory_ratio']:.2f}", r["note"])
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    x = np.arange(len(models))
    width = 0.8 / max(1, len(modes))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    # on the CPU the step's process CPU time is the figure a loaded machine does not distort (one thread)
    speed = "cpu_throughput_ratio" if all("cpu_throughput_ratio" in r for r in rows) else "throughput_ratio"
    speed_title = ("tokens per CPU-second" if speed == "cpu_throughput_ratio" else "tokens/s") + " / non-private"
    for ax, key, title, target in ((axes[0], speed, speed_title + " (higher is better)", 0.8),
                                   (axes[1], "memory_ratio", "peak memory / non-private (lower is better)", 1.3)):
        for k, mode in enumerate(modes):
            values = [next((r[key] for r in rows if r["model"] == m and r["mode"] == mode), np.nan) for m in models]
            label = mode + (" (untied copy)" if mode == "opacus ghost" else "")
            bars = ax.bar(x + (k - (len(modes) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(target, color="k", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks(x, [f"{m} ({next(r['layers'] for r in rows if r['model'] == m)} layers, batch "
                          f"{next(r['batch_size'] for r in rows if r['model'] == m)} x "
                          f"{next(r['seq_len'] for r in rows if r['model'] == m)})" for m in models], fontsize=8)
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(modes), fontsize=8, frameon=False)
    where = rows[0]["device"] if rows else "cpu"
    fig.suptitle(f"DP training step of Hugging Face causal LMs with tied embeddings on {where}: expunge vs Opacus "
                 "1.6 ghost (dashed: targets 0.8x throughput, 1.3x memory)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True, console=None,
         device: str = "cpu") -> list[dict]:
    """The data folder is not needed (random tokens). ``limit`` (any value) runs tiny models in this process:
    a smoke run of a minute (its speed and memory figures mean nothing)."""
    rows = run(repeats=repeats, device=device, tiny=bool(limit), isolate=not limit, round_s=0.0 if limit else None,
               progress=progress, console=console)
    return report(rows, json_out, table, plot, console, settings={"device": device, "repeats": repeats, "smoke": bool(limit)})
