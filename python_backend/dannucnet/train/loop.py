"""The training loop: the released recipe (Adam 1e-3, ReduceLROnPlateau ×0.5 / patience 4,
early stopping on validation loss, best checkpoint kept), plainly written.

Resumable: ``<out>/checkpoint.pt`` holds model, optimiser, scheduler and
counters and is read with ``weights_only=True`` (no arbitrary unpickling).
A time budget lets a CPU-only machine train for a fixed wall time and still
ship the best model seen.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from dannucnet import __version__
from dannucnet.atomic import atomic_path
from dannucnet.engine.colour import ColourReference, lab_stats, normalise_colour, reference_from
from dannucnet.engine.device import autocast, choose_device
from dannucnet.errors import InputError, ModelError, OutputError, one_line
from dannucnet.formats.dataset import Sample, load_dataset, split_spec
from dannucnet.model import LOSSES, DANNucNet, ModelCard, ModelConfig, save_model
from dannucnet.model.card import CARD_FILE, WEIGHTS_FILE, validate_card
from dannucnet.model.registry import load_model, resolve_model_dir
from dannucnet.model.weights import MAX_PARAMETERS, overflowed_channels, parameter_count, state_differences
from dannucnet.train.distill import Teacher, narrowed
from dannucnet.train.patches import PatchSampler, TrainImage, grid_patches, load_train_image
from dannucnet.train.revive import revive_overflowed_channels

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
#: What every checkpoint holds (``_save_checkpoint``); a file without them is not one.
CHECKPOINT_KEYS = frozenset(
    {"model", "optimiser", "scheduler", "epoch", "best_loss", "best_epoch", "elapsed", "history"}
)
BN_REFRESH_BATCHES = 32  # training batches that re-measure BatchNorm statistics (averaged weights, revival)
COLOUR_NORMALISATION = "Reinhard L*a*b* onto colour_reference (per chunk, tissue pixels), then rgb / 255"


@dataclass
class TrainConfig:
    data: str
    out: str
    split: str | None = None  # training split; default "kumar-train" / "train" / all images
    val_split: str | None = None  # validation images; default: hold out the bottom rows of each image
    val_fraction: float = 0.3
    max_val_patches: int = 48
    name: str | None = None
    version: str = "1"
    epochs: int = 100
    steps_per_epoch: int | None = None
    batch_size: int = 4
    patch_size: int = 256
    lr: float = 1e-3
    lr_patience: int = 4
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    min_delta: float = 1e-4
    stop_patience: int = 9
    loss: str = "dan"
    mpp: float = 0.25
    seed: int = 0
    device: str = "auto"
    time_budget_min: float | None = None
    augment: bool = True
    instance_gaps: bool = True  # background seam between touching nuclei in the targets
    colour_normalise: bool = True  # Reinhard L*a*b* normalisation onto the training set's average
    init_from: str | None = None  # model name/folder whose weights start the run (fine-tuning)
    architecture: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (ablations)
    distance_weight: float = 0.25  # weight of the distance head's loss beside Eq. 5 (only with that head)
    distance_only: bool = False  # train only the distance branch; the rest stays frozen as loaded
    freeze_bn: bool = False  # keep BatchNorm statistics as loaded (fine-tuning with small batches)
    extra_data: list[str] = field(default_factory=list)  # more training sets, each "DIR" or "DIR:SPLIT"
    negatives: float = 0.0  # share of patches made nucleus-free (haematoxylin stripped, empty target)
    pigment: float = 0.0  # share of patches given black or brown dots on their background (target unchanged)
    average_from: int | None = None  # from this epoch on, also keep the running mean of the epoch-end weights
    teacher: str | None = None  # a trained model whose outputs the network also learns (see train/distill.py)
    teacher_weight: float = 0.5  # the teacher's share of the loss; the annotations have the rest
    resume: bool = True
    overwrite: bool = False  # replace a trained model in ``out`` that has no checkpoint to resume
    command: str = ""


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float | None  # None in a run without validation (--val-fraction 0)
    val_f1: float | None
    lr: float
    seconds: float

    @property
    def monitored(self) -> float:
        """What the schedule and early stopping follow: the validation loss, or the training loss without one."""
        return self.train_loss if self.val_loss is None else self.val_loss


@dataclass
class Setup:
    """What a run trains with, fixed once set up (the network's weights and the optimiser's state change)."""

    device: torch.device
    sampler: PatchSampler
    val_patches: list[tuple[np.ndarray, ...]]
    validating: bool  # False with --val-fraction 0 and no --val-split: every row is trained on
    steps: int  # per epoch
    data_info: dict[str, Any]  # the card's provenance of the data
    colour: ColourReference | None
    network: DANNucNet
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    loss_fn: Callable
    teacher: Teacher | None = None


@dataclass
class Kept:
    """The save that put the kept weights in the model folder: what their card says of them."""

    epoch: int  # the best epoch (the last one without validation)
    wall_time_s: float  # the run's time when they were saved
    hardware: str
    config: dict[str, Any]  # the TrainConfig of the run that saved them (a resumed run may differ, e.g. --epochs)
    average: dict[str, Any] | None = None  # the weight mean's record, when the mean was kept instead


@dataclass
class RunState:
    """What changes epoch by epoch; all of it but the clock travels in the checkpoint."""

    history: list[EpochLog] = field(default_factory=list)
    best_loss: float = float("inf")
    best_epoch: int = -1
    epochs_done: int = 0
    elapsed_before: float = 0.0  # seconds the run had trained before this resume
    averaged: AveragedModel | None = None
    average_first: int = 0
    kept: Kept | None = None
    start_lr: float | None = None  # the learning rate the run started with (None: a checkpoint too old to say)
    started: float = 0.0  # time.monotonic() at which the run would have started, had it never stopped

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class RunEnd:
    """What only the end of a run knows, for the card's last writing."""

    stop_reason: str
    wall_time_s: float
    average: dict[str, Any] | None  # the weight mean's record, kept or not


def _input_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """N×H×W×3 uint8 patches as the network's N×3×H×W input, 0..1."""
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last).to(device, non_blocking=True)


def _to_tensors(batch: tuple[np.ndarray, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(input, mask target, valid) — plus the distance target (0..1) when the batch has one."""
    rgb, mask, valid = batch[:3]
    x = _input_tensor(rgb, device)
    t = torch.from_numpy(mask).unsqueeze(1).float().to(device)
    v = torch.from_numpy(valid).unsqueeze(1).float().to(device)
    if len(batch) == 3:
        return x, t, v
    d = torch.from_numpy(batch[3]).unsqueeze(1).float().div_(255.0).to(device)
    return x, t, v, d


def distance_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the distance head's sigmoid against the normalised distance, annotated pixels only."""
    per_pixel = (torch.sigmoid(logits.float()) - target) ** 2
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def total_loss(
    loss_fn: Callable, logits: torch.Tensor, tensors: tuple[torch.Tensor, ...], distance_weight: float = 1.0
) -> torch.Tensor:
    """The configured mask loss on channel 0, plus the weighted distance loss on channel 1 when the network has
    that head. The weight keeps the distance term from drowning Eq. 5, whose values are a few hundredths."""
    t, v = tensors[1], tensors[2]
    loss = loss_fn(logits[:, :1], t, v)
    if logits.shape[1] > 1:
        loss = loss + distance_weight * distance_loss(logits[:, 1:2], tensors[3], v)
    return loss


def _default_split(splits: dict[str, list[str]]) -> str | None:
    for name in ("kumar-train", "train"):
        if name in splits:
            return name
    return None


def _prepare_images(
    cfg: TrainConfig,
) -> tuple[list[TrainImage], list[TrainImage], dict[str, Any], ColourReference | None]:
    dataset = load_dataset(cfg.data)
    distance = bool(cfg.architecture.get("distance_head", False))
    split = cfg.split or _default_split(dataset.splits)
    train_samples = dataset.select(split)
    extra = [_extra_samples(spec) for spec in cfg.extra_data]
    if cfg.val_split:
        val_samples = dataset.select(cfg.val_split)
        train = [load_train_image(s, cfg.mpp, (0.0, 1.0), cfg.instance_gaps, distance) for s in train_samples]
        val = [load_train_image(s, cfg.mpp, (0.0, 1.0), cfg.instance_gaps, distance) for s in val_samples]
        how = f"images of split {cfg.val_split!r}"
    else:
        cut = 1.0 - cfg.val_fraction
        train = [load_train_image(s, cfg.mpp, (0.0, cut), cfg.instance_gaps, distance) for s in train_samples]
        if cfg.val_fraction > 0:
            val = [replace(t, rows=(t.rows[1], t.rgb.shape[0])) for t in train]
            how = f"bottom {cfg.val_fraction:.0%} of the rows of every training image (never sampled for training)"
        else:
            val = []
            how = ("none (--val-fraction 0): every row of every training image is trained on; the last epoch is "
                   "kept, or the weight mean with --average-from")
    for _, samples in extra:  # whole images: the extra sets are validated, if at all, on their own held-out split
        train += [load_train_image(s, cfg.mpp, (0.0, 1.0), cfg.instance_gaps, distance) for s in samples]
    reference = _initial_reference(cfg.init_from) if cfg.colour_normalise and cfg.init_from else None
    if cfg.colour_normalise:
        # One reference for the run (the training images' average L*a*b* statistics); every image,
        # training and validation, is mapped onto it with its own statistics, as inference will do.
        images = {id(t.rgb): t for t in train + val}  # held-out rows share their training image's array
        stats = {key: lab_stats(t.rgb, t.valid)[:2] for key, t in images.items()}
        reference = reference or reference_from(stats[id(t.rgb)] for t in train)
        normalised = {key: normalise_colour(t.rgb, reference, stats[key]) for key, t in images.items()}
        train = [replace(t, rgb=normalised[id(t.rgb)]) for t in train]
        val = [replace(t, rgb=normalised[id(t.rgb)]) for t in val]
    info = {
        "dataset": str(Path(cfg.data)),
        "dataset_name": dataset.meta.get("provenance", {}).get("name", Path(cfg.data).name),
        "split": split or "all",
        "images": [s.stem for s in train_samples],
        "validation": how,
        **({"extra_data": [info for info, _ in extra]} if extra else {}),
    }
    return train, val, info, reference


def _extra_samples(spec: str) -> tuple[dict[str, Any], list[Sample]]:
    """``DIR`` or ``DIR:SPLIT`` → (what the card records, the samples)."""
    folder, split = split_spec(spec)
    dataset = load_dataset(folder)
    samples = dataset.select(split)
    provenance = dataset.meta.get("provenance", {})
    return ({"dataset": folder, "dataset_name": provenance.get("name", Path(folder).name),
             "licence": provenance.get("licence"), "split": split or "all",
             "images": [s.stem for s in samples]}, samples)


def _initial_reference(init_from: str) -> ColourReference | None:
    """The colour reference of the model a fine-tune starts from: its weights were trained on that input
    distribution, and new training sets (another lab's average) must not move it under them."""
    card = ModelCard.load(resolve_model_dir(init_from))
    return None if card.colour_reference is None else ColourReference.from_dict(card.colour_reference)


@torch.no_grad()
def validate(
    network: DANNucNet, patches: list[tuple[np.ndarray, ...]], device: torch.device, loss_fn: Callable, batch: int,
    distance_weight: float = 1.0, teacher: Teacher | None = None, teacher_weight: float = 0.5,
) -> tuple[float, float]:
    """Mean loss (:func:`objective`) and pooled pixel F1 at threshold 0.5 over the fixed validation patches.

    Leaves the network in eval mode: the caller restores its own training mode (frozen parts stay frozen).
    """
    network.eval()
    losses, tp, fp, fn = [], 0.0, 0.0, 0.0
    for i in range(0, len(patches), batch):
        chunk = tuple(np.stack(p) for p in zip(*patches[i : i + batch]))
        tensors = _to_tensors(chunk, device)
        x, t, v = tensors[:3]
        with autocast(device):
            logits = network(x)
        losses.append(float(objective(loss_fn, logits, tensors, distance_weight, teacher, teacher_weight,
                                      remember=True)) * len(chunk[0]))
        pred = (logits[:, :1].float() > 0).float() * v
        tp += float((pred * t).sum())
        fp += float((pred * (1 - t)).sum())
        fn += float(((1 - pred) * t * v).sum())
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    return sum(losses) / max(len(patches), 1), f1


def train(cfg: TrainConfig, report: Callable[[str], None] = print) -> Path:
    """Train and write ``<out>/weights.safetensors`` + ``model_card.json`` (the best epoch).

    With ``val_fraction`` 0 (and no ``val_split``) nothing is held out: the final run on all the
    data once a recipe has been chosen with validation. Then the learning-rate schedule follows
    the training loss, there is no early stopping, and the last epoch (or, with ``average_from``,
    the weight mean) is kept, since there is nothing to choose a better one by.

    The card is written with the kept weights each time they change, and once more at the end with
    the whole run's record (how it stopped, every epoch, the weight mean); it is never read back.
    """
    _check(cfg)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    resuming = cfg.resume and (out / CHECKPOINT).exists()
    setup = _set_up(cfg, resuming, report)
    run = _resume(cfg, out / CHECKPOINT, setup, report) if resuming else RunState(start_lr=cfg.lr)
    _make_folder(out)  # only now that everything is checked: a refusal leaves no empty folder behind
    report(
        f"training {cfg.name or out.name}: {len(setup.sampler.images)} images, {len(setup.val_patches)} validation "
        f"patches, {setup.steps} steps/epoch × batch {cfg.batch_size}, device {setup.device}, loss {cfg.loss}"
    )
    run.started = time.monotonic() - run.elapsed_before
    training_mode(setup.network, cfg)
    stop_reason = None
    for epoch in range(run.epochs_done + 1, cfg.epochs + 1):
        entry = _train_epoch(cfg, setup, epoch)
        run.history.append(entry)
        run.epochs_done = epoch
        # without validation every epoch is "the best": the last one is kept and nothing stops early
        improved = not setup.validating or entry.monitored < run.best_loss - cfg.min_delta
        if improved:
            run.best_loss, run.best_epoch = entry.monitored, epoch
            _keep(out, setup.network, cfg, setup, run)
        _add_to_average(cfg, setup.network, run, epoch)
        report(_epoch_line(entry, setup.validating, improved))
        _save_checkpoint(out / CHECKPOINT, setup, run)
        stop_reason = _stop_reason(cfg, run)
        if stop_reason:
            break
    stop_reason = stop_reason or "max epochs reached"
    kept = (f"best epoch {run.best_epoch} (val loss {run.best_loss:.4f})" if setup.validating
            else f"last epoch {run.best_epoch}")
    report(f"{stop_reason}; {kept} saved in {out}")
    average = None if run.averaged is None else _weigh_average(run.averaged, cfg, out, setup, run, report)
    # "wall_time_s" stays the time to the kept weights; the epochs after them belong in the record too, so a
    # reader sees how long the run went on without beating them
    _write_card(out, setup, run, RunEnd(stop_reason, run.elapsed(), average))
    return out


# --- set-up: the checks, the data, the network, the optimiser; or the state a checkpoint resumes -----------


def _check(cfg: TrainConfig) -> None:
    """Refuse, before any work, settings a run cannot train with, whose model its loader would refuse, or that
    would write over a trained model."""
    if cfg.loss not in LOSSES:
        raise InputError(f"unknown loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    if cfg.average_from is not None and cfg.average_from < 1:
        raise InputError(f"--average-from {cfg.average_from}: epochs count from 1")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InputError(f"--val-fraction {cfg.val_fraction}: must be at least 0 and below 1")
    if not 0.0 <= cfg.negatives < 1.0:
        raise InputError(f"--negatives {cfg.negatives}: must be at least 0 and below 1")
    if not 0.0 <= cfg.pigment <= 1.0:
        raise InputError(f"--pigment {cfg.pigment}: must be between 0 and 1")
    if not 0.0 < cfg.teacher_weight <= 1.0:
        raise InputError(f"--teacher-weight {cfg.teacher_weight}: must be above 0 and at most 1")
    if cfg.teacher and cfg.distance_only:
        raise InputError("--teacher teaches the whole network; it cannot be combined with --distance-only")
    if cfg.epochs < 1:
        raise InputError(f"--epochs {cfg.epochs}: must be at least 1")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise InputError(f"--steps-per-epoch {cfg.steps_per_epoch}: must be at least 1 (leave it out for one pass "
                         "over the training rows per epoch)")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size {cfg.batch_size}: must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise InputError(f"--lr {cfg.lr}: must be a number of at least 0 (the code's is 1e-3)")
    if not 0 <= cfg.seed < 2**32:
        raise InputError(f"--seed {cfg.seed}: must be from 0 to {2**32 - 1}")
    if not (math.isfinite(cfg.distance_weight) and cfg.distance_weight >= 0):
        raise InputError(f"--distance-weight {cfg.distance_weight}: must be a number of at least 0")
    if cfg.time_budget_min is not None and not (math.isfinite(cfg.time_budget_min) and cfg.time_budget_min > 0):
        raise InputError(f"--time-budget {cfg.time_budget_min}: must be a number of minutes above 0 "
                         "(leave it out for no limit)")
    _check_card(cfg)
    _check_out(cfg)


#: The card fields a run's settings fill, by the flag that sets each: a refused card names it.
CARD_FLAGS = {"name": "--name (default: the --out folder's name)", "version": "--version", "mpp": "--mpp",
              "architecture.base_filters": "--base-filters", "architecture.bn_momentum": "--bn-momentum",
              "architecture.channel_reduction": "--channel-reduction"}


def _check_card(cfg: TrainConfig) -> None:
    """Refuse settings whose model the loader would refuse, by the card module's own rules (``validate_card``,
    and the network's size, ``MAX_PARAMETERS``): a run must not end in a model nothing can load."""
    path = Path(cfg.out) / CARD_FILE
    card = ModelCard(name=cfg.name or Path(cfg.out).name, version=cfg.version, mpp=cfg.mpp, tile_size=cfg.patch_size,
                     trained=True, architecture={**default_architecture(), **cfg.architecture})
    try:
        validate_card(asdict(card), path)
    except ModelError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        flag = next((flag for key, flag in CARD_FLAGS.items() if detail.startswith(f"{key} is ")), "the settings")
        raise InputError(f"{flag}: the model card would say {detail} (its loader refuses anything else); "
                         "nothing was written") from None
    count = parameter_count(card.config)
    if count > MAX_PARAMETERS:
        raise InputError(
            f"--base-filters {card.config.base_filters}: the network would have {count / 1e6:,.0f} M parameters, "
            f"more than the {MAX_PARAMETERS / 1e6:.0f} M a model may have to load; use fewer (the code's default is 32)"
        )


def _check_out(cfg: TrainConfig) -> None:
    """Refuse an ``out`` that is a file, or that holds a model but no checkpoint (a shipped or copied model, which
    training would replace) unless ``overwrite``. A folder with a checkpoint is its run's, to resume (or, with
    ``resume`` off, to start over in)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a model folder; choose another --out (nothing was written)")
    held = [name for name in (WEIGHTS_FILE, CARD_FILE) if (out / name).exists()]
    if held and not (out / CHECKPOINT).exists() and not cfg.overwrite:
        raise OutputError(
            f"--out {out} holds a model ({', '.join(held)}) and no {CHECKPOINT} to resume: training would replace it; "
            "choose another --out, or pass --overwrite to replace it (nothing was written)"
        )


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {out}: {exc.strerror or exc}") from None


def default_architecture() -> dict[str, Any]:
    """The network a run trains where its ``architecture`` says nothing: the code's :class:`ModelConfig` with a
    BatchNorm momentum of 0.1 (the Keras original's 0.5 is noisy with batches of four)."""
    return ModelConfig(bn_momentum=0.1).to_dict()


def _check_patch_room(images: list[TrainImage], cfg: TrainConfig) -> None:
    """Refuse, with the sizes, a training set whose every image is smaller than one training patch (each patch
    comes whole from one image's training rows; the network's windows are 256², the recipe's patches too)."""
    size = cfg.patch_size
    if any(im.holds(size) for im in images):
        return
    largest = max(images, key=lambda im: np.prod(im.patch_area), default=None)
    had = "no training image"
    if largest is not None:
        rows, cols = largest.patch_area
        had = f"the largest is {rows} x {cols} px ({largest.stem})"
    held = f", after holding out {cfg.val_fraction:.0%} of each image's rows for validation" if cfg.val_fraction else ""
    raise InputError(
        f"no training image has a {size} x {size} px area to take patches from at {cfg.mpp:g} µm/px{held}: {had}. "
        f"Export larger regions ({size * cfg.mpp:g} µm or more across), or hold out whole images with --val-split"
        + (" or --val-fraction 0" if cfg.val_fraction else "")
    )


def _set_up(cfg: TrainConfig, resuming: bool, report: Callable[[str], None]) -> Setup:
    device = choose_device(cfg.device)
    train_images, val_images, data_info, colour = _prepare_images(cfg)
    _check_patch_room(train_images, cfg)
    sampler = PatchSampler(train_images, cfg.patch_size, seed=cfg.seed, augment=cfg.augment, negatives=cfg.negatives,
                           pigment=cfg.pigment, mpp=cfg.mpp, reference=colour)
    val_patches = grid_patches(val_images, cfg.patch_size)
    if len(val_patches) > cfg.max_val_patches:  # an evenly spread, fixed subset keeps validation cheap on a CPU
        keep = np.linspace(0, len(val_patches) - 1, cfg.max_val_patches).round().astype(int)
        val_patches = [val_patches[i] for i in keep]
    validating = bool(cfg.val_split) or cfg.val_fraction > 0
    if validating and not val_patches:
        raise InputError("no validation patch could be cut: use larger images or --val-split")
    train_pixels = sum((im.rows[1] - im.rows[0]) * im.rgb.shape[1] for im in sampler.images)
    steps = cfg.steps_per_epoch or max(1, round(train_pixels / (cfg.patch_size**2 * cfg.batch_size)))
    network = _network(cfg, device, sampler, resuming, report)
    trainable = freeze_all_but_distance(network) if cfg.distance_only else list(network.parameters())
    optimiser = torch.optim.Adam(trainable, lr=cfg.lr, eps=1e-7)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience,
        threshold=cfg.min_delta, threshold_mode="abs", min_lr=cfg.min_lr,
    )
    teacher = Teacher(cfg.teacher, device, cfg.patch_size, network.config) if cfg.teacher else None
    if teacher is not None:
        report(f"taught by {teacher.name} ({teacher.runtime} {teacher.precision}), weight {cfg.teacher_weight:g}")
    return Setup(device, sampler, val_patches, validating, steps, data_info, colour, network, optimiser, scheduler,
                 LOSSES[cfg.loss], teacher)


def _network(
    cfg: TrainConfig, device: torch.device, sampler: PatchSampler, resuming: bool, report: Callable[[str], None]
) -> DANNucNet:
    """A fresh network, or the weights of ``init_from`` with any overflowed BatchNorm channel revived (a resumed
    run's checkpoint replaces them, so they are revived only when the run starts)."""
    config = ModelConfig(**{**default_architecture(), **cfg.architecture})
    network = DANNucNet(config)  # built even when replaced: it draws the same random numbers as before
    if cfg.init_from:
        network = _initial_weights(cfg.init_from, config)
        report(f"starting from the weights of {cfg.init_from}")
    network = network.to(device).to(memory_format=torch.channels_last)
    if cfg.init_from and not resuming and overflowed_channels(network):
        revived = revive_overflowed_channels(network, _input_batches(sampler, cfg.batch_size, device))
        report(f"{revived} BatchNorm channels of {cfg.init_from} had an overflowed (infinite) variance: "
               "statistics re-measured, scale set to 0 so the network computes what it did, and free to learn")
    return network


def _resume(cfg: TrainConfig, checkpoint: Path, setup: Setup, report: Callable[[str], None]) -> RunState:
    """Load the checkpoint into the set-up network, optimiser and schedule; return the run's state as saved.

    The run goes on as it was: its learning rate and schedule are the checkpoint's, whatever ``lr`` says (said
    when it differs from the one the run started with). A file that is no checkpoint, or one of another run
    (another network, or other parameters trained), is refused in one line.
    """
    again = f"use --no-resume to start over in {checkpoint.parent}, or another --out"
    try:
        saved = torch.load(checkpoint, map_location=setup.device, weights_only=True)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        # not torch's message: it advises weights_only=False, which would run whatever code the file holds
        raise InputError(f"{checkpoint} is not a readable checkpoint ({type(exc).__name__}); {again}") from None
    if not isinstance(saved, dict) or not CHECKPOINT_KEYS <= set(saved):
        raise InputError(f"{checkpoint} is not a dannucnet training checkpoint; {again}")
    differences = state_differences(setup.network.state_dict(), saved["model"])
    if differences:
        raise InputError(f"{checkpoint.parent} holds a checkpoint of another run (its network is not this run's: "
                         f"{differences}; were --base-filters, --distance-head or the ablations other?); {again}")
    try:
        setup.network.load_state_dict(saved["model"])
        setup.optimiser.load_state_dict(saved["optimiser"])
        setup.scheduler.load_state_dict(saved["scheduler"])
        run = RunState(history=[EpochLog(**h) for h in json.loads(saved["history"])],
                       best_loss=float(saved["best_loss"]), best_epoch=int(saved["best_epoch"]),
                       epochs_done=int(saved["epoch"]) + 1, elapsed_before=float(saved["elapsed"]))
        run.averaged, run.average_first = _resume_average(cfg, setup.network, saved, run.epochs_done, report)
        run.kept = (Kept(**json.loads(saved["kept"])) if "kept" in saved
                    else _kept_before_checkpoints_said(cfg, setup, run))
        # an older checkpoint does not say: the kept weights' run's --lr, if any
        started = saved.get("start_lr", run.kept.config.get("lr") if run.kept is not None else None)
        run.start_lr = None if started is None else float(started)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{checkpoint.parent} holds a checkpoint of another run ({one_line(exc)}); {again}") from None
    setup.sampler.rng = np.random.default_rng(cfg.seed + run.epochs_done)
    report(f"resumed from {checkpoint} at epoch {run.epochs_done} (best val loss {run.best_loss:.4f})")
    if run.start_lr is not None and cfg.lr != run.start_lr:
        report(f"warning: --lr {cfg.lr:g} is not applied: a resumed run goes on with its checkpoint's learning rate "
               f"({setup.optimiser.param_groups[0]['lr']:.1e}, started at {run.start_lr:g}) and schedule; "
               "use --no-resume to start over with it")
    return run


# --- one epoch --------------------------------------------------------------------------------------------------


def _train_epoch(cfg: TrainConfig, setup: Setup, epoch: int) -> EpochLog:
    """``setup.steps`` training steps, validation, and the learning-rate schedule's step."""
    started = time.monotonic()
    total = 0.0
    for step in range(setup.steps):
        total += _train_step(cfg, setup)
        if sys.stderr.isatty():
            print(f"\r  epoch {epoch} step {step + 1}/{setup.steps} loss {total / (step + 1):.4f}",
                  end="", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    val_loss = val_f1 = None
    if setup.validating:
        val_loss, val_f1 = validate(setup.network, setup.val_patches, setup.device, setup.loss_fn, cfg.batch_size,
                                    cfg.distance_weight, setup.teacher, cfg.teacher_weight)
        training_mode(setup.network, cfg)
    train_loss = total / setup.steps
    setup.scheduler.step(train_loss if val_loss is None else val_loss)
    lr = setup.optimiser.param_groups[0]["lr"]
    return EpochLog(epoch, train_loss, val_loss, val_f1, lr, time.monotonic() - started)


def _train_step(cfg: TrainConfig, setup: Setup) -> float:
    clean = setup.teacher is not None and cfg.pigment > 0  # a teacher of painted patches sees them clean
    batch = setup.sampler.batch(cfg.batch_size, clean=clean)
    tensors = _to_tensors(batch[:-1] if clean else batch, setup.device)
    with autocast(setup.device):
        logits = setup.network(tensors[0])
    unpainted = _input_tensor(batch[-1], setup.device) if clean else None
    loss = objective(setup.loss_fn, logits, tensors, cfg.distance_weight, setup.teacher, cfg.teacher_weight,
                     teacher_input=unpainted)
    setup.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimiser.step()
    return loss.item()


def taught_loss(
    teacher: Teacher, logits: torch.Tensor, x: torch.Tensor, distance_weight: float, remember: bool = False,
) -> torch.Tensor:
    """The loss against the teacher's outputs on the batch, on every pixel: binary cross-entropy on its
    probabilities and the distance loss on its distances. Cross-entropy, not Eq. 5: its per-pixel Jaccard
    term is smallest at p = 1 for any soft target above 0 (for a target of 0.5 it falls as p rises), while
    cross-entropy is smallest at p = target. ``remember``: the batch comes back unchanged (validation)."""
    probability, distance = teacher.targets(x, remember)
    everywhere = torch.ones_like(probability)
    if distance is None:
        return total_loss(LOSSES["bce"], logits[:, :1], (x, probability, everywhere), distance_weight)
    return total_loss(LOSSES["bce"], logits, (x, probability, everywhere, distance), distance_weight)


def objective(
    loss_fn: Callable, logits: torch.Tensor, tensors: tuple[torch.Tensor, ...], distance_weight: float,
    teacher: Teacher | None = None, teacher_weight: float = 0.5, remember: bool = False,
    teacher_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a run minimises, and validates: the loss against the annotations, shared with a teacher's when
    there is one. A taught network's probabilities are softer than an untaught one's, which Eq. 5 alone
    scores worse at the same pixel F1 (a taught run's F1 rose for 5 epochs while its Eq. 5 validation loss
    did not fall), so its validation includes the teacher's term too. ``remember``: validation's fixed
    batches, whose teacher answers are kept (:meth:`Teacher.targets`). ``teacher_input``: what the teacher
    is asked instead of the network's input, the patches before ``--pigment`` painted dots on them, so the
    teacher's answer never calls a painted dot a nucleus (the annotations say it is none)."""
    loss = total_loss(loss_fn, logits, tensors, distance_weight)
    if teacher is None:
        return loss
    asked = tensors[0] if teacher_input is None else teacher_input
    taught = taught_loss(teacher, logits, asked, distance_weight, remember)
    return (1.0 - teacher_weight) * loss + teacher_weight * taught


def _epoch_line(entry: EpochLog, validating: bool, improved: bool) -> str:
    scores = f"val loss {entry.val_loss:.4f}  val pixel F1 {entry.val_f1:.4f}  " if validating else ""
    return (f"epoch {entry.epoch}: train loss {entry.train_loss:.4f}  {scores}"
            f"lr {entry.lr:.1e}  {entry.seconds:.0f}s{'  *best*' if improved and validating else ''}")


def _stop_reason(cfg: TrainConfig, run: RunState) -> str | None:
    if run.epochs_done - run.best_epoch >= cfg.stop_patience:
        return f"early stop: no val-loss improvement for {cfg.stop_patience} epochs"
    if cfg.time_budget_min and run.elapsed() / 60 >= cfg.time_budget_min:
        return f"time budget of {cfg.time_budget_min:g} min reached"
    return None


# --- checkpoint -------------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, setup: Setup, run: RunState) -> None:
    """Everything a resumed run needs, the record of the kept weights included (their card is rebuilt from it)."""
    with atomic_path(path) as tmp:  # a run stopped while saving keeps the previous checkpoint
        torch.save(
            {
                "model": setup.network.state_dict(), "optimiser": setup.optimiser.state_dict(),
                "scheduler": setup.scheduler.state_dict(), "epoch": run.epochs_done - 1,
                "best_loss": run.best_loss, "best_epoch": run.best_epoch, "elapsed": run.elapsed(),
                "history": json.dumps([asdict(h) for h in run.history]),
                **({"averaged": run.averaged.state_dict(), "average_first": run.average_first}
                   if run.averaged is not None else {}),
                **({"kept": json.dumps(asdict(run.kept))} if run.kept is not None else {}),
                **({"start_lr": run.start_lr} if run.start_lr is not None else {}),
            },
            tmp,
        )


def _kept_before_checkpoints_said(cfg: TrainConfig, setup: Setup, run: RunState) -> Kept | None:
    """The kept weights of a checkpoint written before checkpoints recorded them (dannucnet 0.1.0 up to this
    change): the best epoch with this run's settings, and as its wall time the epochs' own times up to it
    (the seconds of set-up and saving between them are not in the checkpoint)."""
    if run.best_epoch < 1:
        return None
    seconds = sum(h.seconds for h in run.history[: run.best_epoch])
    return Kept(run.best_epoch, round(seconds, 1), _hardware(setup.device), asdict(cfg))


# --- the weight mean ------------------------------------------------------------------------------------------


def _add_to_average(cfg: TrainConfig, network: DANNucNet, run: RunState, epoch: int) -> None:
    if cfg.average_from and epoch >= cfg.average_from:
        if run.averaged is None:
            run.averaged, run.average_first = AveragedModel(network), epoch
        run.averaged.update_parameters(network)


def _weigh_average(
    averaged: AveragedModel, cfg: TrainConfig, out: Path, setup: Setup, run: RunState, report: Callable[[str], None]
) -> dict[str, Any]:
    """Validate the weight mean and keep it instead of the best epoch when it validates better (always, without
    validation); return what the card records of it."""
    average = _finish_average(averaged, cfg, setup, run)
    better = not setup.validating or average["val_loss"] < run.best_loss
    if setup.validating:
        verdict = (f"val loss {average['val_loss']:.4f}  val pixel F1 {average['val_f1']:.4f}  "
                   + ("shipped instead of the best epoch" if better else "not better: best epoch kept"))
    else:
        verdict = "no validation to compare it by, so the mean is shipped, as asked"
    report(f"mean of the weights of epochs {average['epochs'][0]}-{average['epochs'][1]}: {verdict}")
    if better:
        average["shipped"] = True
        _keep(out, cast(DANNucNet, averaged.module), cfg, setup, run, average)
        _save_checkpoint(out / CHECKPOINT, setup, run)  # so that a resumed run knows the folder holds the mean
    return average


def _input_batches(sampler: PatchSampler, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``BN_REFRESH_BATCHES`` fresh training inputs, for measuring BatchNorm statistics."""
    return (_to_tensors(sampler.batch(batch_size), device)[0] for _ in range(BN_REFRESH_BATCHES))


def _resume_average(
    cfg: TrainConfig, network: DANNucNet, state: dict[str, Any], resumed_epoch: int, report: Callable[[str], None]
) -> tuple[AveragedModel | None, int]:
    """The running weight mean saved in the checkpoint; or, when averaging is asked for only now, one that
    starts from the checkpoint's weights (the end of the epoch the run resumes after)."""
    if not cfg.average_from or resumed_epoch < cfg.average_from:
        return None, 0
    averaged = AveragedModel(network)
    if "averaged" in state:
        averaged.load_state_dict(state["averaged"])
        return averaged, int(state["average_first"])
    averaged.update_parameters(network)
    report(f"weight averaging starts from the checkpoint's weights (epoch {resumed_epoch})")
    return averaged, resumed_epoch


def _finish_average(averaged: AveragedModel, cfg: TrainConfig, setup: Setup, run: RunState) -> dict[str, Any]:
    """Validate the mean of the epoch-end weights (stochastic weight averaging, Izmailov et al. 2018).

    Averaging weights lands nearer the middle of the flat region the last epochs wander in, which
    often generalises better than any one of them; the validation loss decides (a run without
    validation keeps the mean: asking for it was the decision). Averaged
    BatchNorm statistics belong to no single set of weights, so unless the run kept them frozen
    (then they are the network's own) they are measured again on training batches. Only
    parameters are averaged: buffers such as a variance that overflowed to inf would turn the
    mean into NaN.
    """
    if cfg.freeze_bn or cfg.distance_only:
        for mine, frozen in zip(averaged.module.buffers(), setup.network.buffers()):
            mine.copy_(frozen)
    else:
        update_bn(_input_batches(setup.sampler, cfg.batch_size, setup.device), averaged.module)
    val_loss = val_f1 = None
    if setup.val_patches:
        mean = cast(DANNucNet, averaged.module)
        val_loss, val_f1 = validate(mean, setup.val_patches, setup.device, setup.loss_fn, cfg.batch_size,
                                    cfg.distance_weight, setup.teacher, cfg.teacher_weight)
    return {"epochs": [run.average_first, len(run.history)], "count": int(averaged.n_averaged), "val_loss": val_loss,
            "val_f1": val_f1, "shipped": False}


def _initial_weights(name_or_path: str, config: ModelConfig) -> DANNucNet:
    """Weights of an installed model, refused when its architecture differs from this run's.

    Two differences are allowed: adding the distance head to a model without one (every weight
    carries over and the new branch starts untrained, see ``distance_only``), and fewer base
    filters (each layer cut to its first channels, see ``train/distill.py``).
    """
    loaded = load_model(name_or_path)
    source = loaded.card.config.to_dict()
    if config.base_filters < source["base_filters"]:
        return narrowed(loaded.network, config)  # refuses any other difference
    adds_head = config.distance_head and not source["distance_head"]
    if {**source, "distance_head": config.distance_head} != config.to_dict() or (
        source["distance_head"] and not config.distance_head
    ):
        raise InputError(
            f"--init-from {name_or_path}: its architecture {source} differs from this run's {config.to_dict()}"
        )
    if not adds_head:
        return loaded.network
    network = DANNucNet(config)
    missing, unexpected = network.load_state_dict(loaded.network.state_dict(), strict=False)
    if unexpected or any(not k.startswith("distance.") for k in missing):  # pragma: no cover - same config
        raise InputError(f"--init-from {name_or_path}: weights do not fit ({missing}, {unexpected})")
    return network


def training_mode(network: DANNucNet, cfg: TrainConfig) -> None:
    """``network.train()``, except for what the run keeps frozen (see ``distance_only``, ``freeze_bn``)."""
    network.train()
    if cfg.distance_only:
        freeze_all_but_distance(network)
    if cfg.freeze_bn:
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()


def freeze_all_but_distance(network: DANNucNet) -> list[torch.nn.Parameter]:
    """Freeze everything except the distance branch; return the parameters left to train.

    Frozen parts are also put in eval mode (BatchNorm statistics stay those of the trained
    model), so the probability output stays exactly the trained model's: adding the head
    can change how touching nuclei are split, never which pixels are nucleus.
    """
    if network.distance is None:
        raise InputError("--distance-only needs a network with the distance head (--distance-head)")
    for name, module in network.named_children():
        if name != "distance":
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
    return list(network.distance.parameters())


# --- the model card -------------------------------------------------------------------------------------------


def _keep(
    out: Path, network: DANNucNet, cfg: TrainConfig, setup: Setup, run: RunState, average: dict[str, Any] | None = None
) -> None:
    """Save the weights the run keeps (the best epoch's, or the weight mean) with their card."""
    run.kept = Kept(run.best_epoch, round(run.elapsed(), 1), _hardware(setup.device), asdict(cfg), average)
    save_model(out, network, model_card(run.kept, run.history, setup))


def _write_card(out: Path, setup: Setup, run: RunState, end: RunEnd) -> None:
    """The card of the kept weights with the whole run's record: the last time it is written."""
    if run.kept is None:
        raise InputError(f"{out}: no weights were kept: no epoch ran, or no validation loss was a number "
                         "(NaN: try a lower --lr)")
    card = model_card(run.kept, run.history, setup, end)
    card.architecture = setup.network.config.to_dict()  # as save_model writes it: the kept weights' network
    card.save(out)


def model_card(kept: Kept, history: list[EpochLog], setup: Setup, end: RunEnd | None = None) -> ModelCard:
    """The card of the kept weights: the settings of the run that saved them, the data, every epoch so far,
    and, once the run is over, how it ended."""
    cfg = TrainConfig(**kept.config)
    scores = ((kept.average["val_loss"], kept.average["val_f1"]) if kept.average
              else (history[kept.epoch - 1].val_loss, history[kept.epoch - 1].val_f1))
    training: dict[str, Any] = {
        "command": cfg.command,
        "config": {k: v for k, v in kept.config.items() if k != "command"},
        "best_epoch": kept.epoch,
        "epochs_run": len(history),
        "wall_time_s": kept.wall_time_s,
        "hardware": kept.hardware,
        "history": [asdict(h) for h in history],
    }
    if end is not None:
        training |= {"stop_reason": end.stop_reason, "run_wall_time_s": round(end.wall_time_s, 1),
                     **({"weight_average": end.average} if end.average is not None else {})}
    colour = setup.colour
    return ModelCard(
        name=cfg.name or Path(cfg.out).name,
        version=cfg.version,
        mpp=cfg.mpp,
        tile_size=cfg.patch_size,
        trained=True,
        normalisation=(COLOUR_NORMALISATION if colour is not None else ModelCard.normalisation),
        colour_reference=colour.to_dict() if colour is not None else None,
        description="DAN-NucNet (Ahmad et al., ESWA 2023) trained with dannucnet train.",
        provenance={"software": f"dannucnet {__version__}", "torch": torch.__version__, **setup.data_info},
        licence=_licence_for(setup.data_info),
        training=training,
        # none without validation
        metrics={"validation": {"loss": scores[0], "pixel_f1": scores[1]}} if scores[0] is not None else {},
    )


def _hardware(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"{name} ({device.type}, {torch.get_num_threads()} threads)"


def _licence_for(data_info: dict[str, Any]) -> str:
    extra = [e for e in data_info.get("extra_data", []) if e.get("licence")]
    also = "".join(f" Also trained on {e['dataset_name']} ({e['licence']})." for e in extra)
    if "MoNuSeg" in str(data_info.get("dataset_name", "")):
        return ("Weights derived from MoNuSeg 2018 / Kumar 2017 data (CC BY-NC-SA 4.0): "
                "non-commercial use only, share-alike." + also)
    return "Weights inherit the licence terms of the training data." + also
