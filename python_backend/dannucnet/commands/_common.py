"""Arguments and helpers several commands share (model, device, options, progress)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from dannucnet.catalogue import AUTO, AUTO_FAST, AUTO_NAMES
from dannucnet.errors import InputError
from dannucnet.pipeline import SegmentOptions
from dannucnet.protocols import Progress, Segmenter

log = logging.getLogger("dannucnet")

UNTRAINED_WARNING = (
    "WARNING: model {name!r} is UNTRAINED (random weights): its nuclei are meaningless. "
    "Install trained weights in models/ or pass --model."
)


#: Most windows per forward pass a user may ask for: 512 windows of 512² are 1.6 GB of float32 input
#: alone, beyond what the GPU defaults (32 of 256², 8 of 512²) ever need.
MAX_BATCH = 512


def bounded(kind: type[int] | type[float], low: float, high: float, unit: str = "") -> Callable[[str], Any]:
    """An argument type: a number of ``kind`` from ``low`` to ``high`` (NaN refused), so a number a command
    cannot work with is refused by argparse before anything starts."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            whole = " whole" if kind is int else ""
            raise argparse.ArgumentTypeError(f"must be a{whole} number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low:g} to {high:g}{unit}, not {text}")
        return value
    return parse


#: ``--batch-size`` / ``--max-batch``: -1 was numpy's "negative dimensions" deep in a run, 0 silently the
#: default, 10**6 a MemoryError.
batch_size = bounded(int, 1, MAX_BATCH, " windows")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME|PATH|auto|auto-fast", default="auto",
                   help="model name (see `dannucnet models`) or a model folder; auto (default) picks, per image, "
                        "the installed model whose pixel size suits the image's; auto-fast the same, then the "
                        "cheapest network of that pixel size (the lite models: 2.3-2.6x faster on a CPU, "
                        "up to about 1 point of PQ lower)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=batch_size,
                   help="windows per forward pass (default: 2 on CPU; on GPU 32 of 256², 8 of 512²)")
    add_runtime_argument(p)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each window over four flips (slightly better, 4x model time)")


def add_runtime_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "openvino", "onnxruntime"),
                   help="what runs the network: auto (OpenVINO on a CPU when installed, else PyTorch; "
                        "PyTorch on a GPU), torch, openvino or onnxruntime (CPU only)")


def add_segment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model card's, 0.5)")
    p.add_argument("--min-area", type=float, default=SegmentOptions.min_area_um2, metavar="UM2",
                   help=f"drop nuclei smaller than this (µm², default {SegmentOptions.min_area_um2:g})")
    p.add_argument("--chunk-size", type=int, default=SegmentOptions.chunk_size,
                   help=f"chunk core side in model pixels (default {SegmentOptions.chunk_size})")
    p.add_argument("--no-tissue-detection", action="store_true", help="segment background chunks too")
    p.add_argument("--cell-expansion", type=float, default=0.0, metavar="UM",
                   help="grow each nucleus into a QuPath cell by this many µm (0-25; QuPath's Cell detection "
                        "uses 5); default 0: nucleus detections only")
    p.add_argument("--stains", metavar="JSON|auto",
                   help="stain vectors for the OD measurements, as QuPath writes them (e.g. "
                        "'{\"Name\": \"H&E\", \"Stain 1\": \"Hematoxylin\", \"Values 1\": \"0.65 0.70 0.29\", "
                        "\"Stain 2\": \"Eosin\", \"Values 2\": \"0.2159 0.8012 0.5581\", "
                        "\"Background\": \"255 255 255\"}'), "
                        "a file holding that JSON, or 'auto' to estimate them from each image as QuPath's "
                        "Estimate stain vectors does; "
                        "default: QuPath's H&E default")


def parse_stains_argument(text: str | None):  # -> Stains | None ("auto" is resolved per image by the caller)
    from pathlib import Path

    from dannucnet.geometry.qupath_stains import parse_stains

    if text is None or text.strip().lower() == "auto":
        return None
    t = text.strip()
    if not t.startswith("{"):
        path = Path(t)
        if not path.is_file():
            raise InputError(f"--stains must be QuPath stain JSON, a file holding it, or 'auto'; got {text!r}")
        try:
            t = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Notepad's UTF-8) is fine
        except UnicodeDecodeError:
            raise InputError(f"--stains file {path} is not UTF-8 text (Notepad's 'Unicode' is UTF-16): save it "
                             "as UTF-8") from None
        except OSError as exc:
            raise InputError(f"cannot read --stains file {path}: {exc.strerror or exc}") from None
    return parse_stains(t)


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    stains_arg = getattr(args, "stains", None)
    return SegmentOptions(
        threshold=args.threshold, min_area_um2=args.min_area, chunk_size=args.chunk_size,
        skip_background=not args.no_tissue_detection, cell_expansion_um=getattr(args, "cell_expansion", 0.0),
        stains=parse_stains_argument(stains_arg),
        auto_stains=stains_arg is not None and stains_arg.strip().lower() == "auto",
    )


def load_predictor(args: argparse.Namespace, model: str | None = None, mpp: float | None = None):
    """The Predictor of ``model`` (default: ``--model``); ``auto`` / ``auto-fast`` choose for an image of ``mpp`` µm/px.

    Import kept lazy: torch is slow to import.
    """
    from dannucnet.engine import Predictor
    from dannucnet.model import load_model

    name = model if model is not None else getattr(args, "model", None)
    if name in AUTO_NAMES:
        name = resolve_auto(mpp, fast=name == AUTO_FAST)
    loaded = load_model(name)
    if not loaded.card.trained:
        print(UNTRAINED_WARNING.format(name=loaded.card.name), file=sys.stderr)
    predictor = Predictor(loaded, device=args.device, batch_size=args.batch_size, tta=args.tta,
                          runtime=getattr(args, "runtime", "auto"))
    log.info("model %s runs on %s", loaded.card.name, predictor.description)
    return predictor


def resolve_auto(mpp: float | None, fast: bool = False) -> str | None:
    """``--model auto`` (``auto-fast`` with ``fast``) for images of ``mpp`` µm/px: a model folder (``None``:
    none trained is installed), with one log line saying which and why."""
    from dannucnet.catalogue import choose_model

    entry, reason = choose_model(mpp, fast=fast)
    log.info("--model %s: %s", AUTO_FAST if fast else AUTO, reason)
    return entry.path if entry is not None else None


def predictor_pool(args: argparse.Namespace):  # -> engine.pool.PredictorPool
    """Predictors loaded as images need them: ``--model auto`` may pick another model per image."""
    from dannucnet.engine.pool import PredictorPool

    return PredictorPool(lambda name: load_predictor(args, model=AUTO if name is None else name), default=args.model)


def chunk_progress(desc: str, enabled: bool = True) -> tuple[Progress, Callable[[], None]]:
    """A tqdm bar over chunks showing nuclei found; returns (callback, close).

    The bar appears with the first chunk count: with ``--model auto`` the model is loaded once the
    image's pixel size is known, and a model that fails to load must leave one error line, not a bar.
    """
    from tqdm import tqdm

    bars: list = []

    def update(done: int, total: int, nuclei: int) -> None:
        if not bars:
            bars.append(tqdm(total=0, desc=desc, unit="chunk", disable=not enabled, file=sys.stderr,
                             dynamic_ncols=True))
        bar = bars[0]
        bar.total = total
        bar.n = done
        bar.set_postfix(nuclei=nuclei, refresh=False)
        bar.refresh()

    def close() -> None:
        if bars:
            bars[0].close()

    return update, close


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="HOST:PORT", help="run the model on a dannucnet server instead of in-process")
    p.add_argument("--token", help="server token (default: the DANNUCNET_TOKEN environment variable)")
    p.add_argument("--pipelined", action="store_true",
                   help="staged runner: reader threads, batched windows across chunks, post-processing pool "
                        "(fastest on a GPU; same nuclei)")


def server_token(args: argparse.Namespace) -> str | None:
    """``--token``, else the DANNUCNET_TOKEN environment variable (kept off the command line, where ``ps`` shows it)."""
    import os

    return getattr(args, "token", None) or os.environ.get("DANNUCNET_TOKEN")


def make_segmenter(args: argparse.Namespace, one_model: bool = False) -> Segmenter:
    """In-process, or on ``--server`` when given: the same nuclei either way.

    ``one_model``: the run uses one model, named before the first image (the QuPath batch tags its detections
    and its ledger with it), so ``--model auto`` is settled once: in this process without a pixel size, on a
    server as the server's default model. Otherwise ``auto`` picks per image.
    """
    from dannucnet.jobs.segmenters import LocalSegmenter, ServerSegmenter

    options = segment_options(args)
    if getattr(args, "server", None) and args.tta:
        raise InputError("--tta runs the model in this process; it cannot be combined with --server")
    if getattr(args, "server", None):
        ignored = [flag for flag, value, default in (("--device", getattr(args, "device", "auto"), "auto"),
                                                     ("--runtime", getattr(args, "runtime", "auto"), "auto"),
                                                     ("--batch-size", getattr(args, "batch_size", None), None))
                   if value != default]
        if ignored:  # the nuclei are the same; only where and how fast the network runs is the server's
            print(f"note: {', '.join(ignored)} ignored: the server runs the model with its own settings",
                  file=sys.stderr)
        model = None if one_model and args.model == AUTO else args.model  # one model: the server's default
        segmenter = ServerSegmenter(args.server, token=server_token(args), options=options, model=model,
                                    one_model=one_model)
        if not segmenter.model_trained:
            print(UNTRAINED_WARNING.format(name=segmenter.model_name), file=sys.stderr)
        return segmenter
    predictor = load_predictor(args) if one_model else predictor_pool(args)
    return LocalSegmenter(predictor, options, pipelined=getattr(args, "pipelined", False))
