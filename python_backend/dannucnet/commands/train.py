"""``dannucnet train``: fit DAN-NucNet on an instance dataset folder."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

NAME = "train"
HELP = "train DAN-NucNet on an instance dataset folder (images/, labels/, dataset.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="instance dataset folder (or the MoNuSeg folder)")
    p.add_argument("--out", required=True,
                   help="model folder to write, e.g. models/my-model; one holding a checkpoint.pt is resumed, one "
                        "holding a trained model without it is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the trained model in an --out folder that holds no checkpoint to resume")
    p.add_argument("--split", help="training split name (default: kumar-train, train, or all images)")
    p.add_argument("--val-split", help="validation split (default: hold out the bottom rows of each image)")
    p.add_argument(
        "--val-fraction", type=float, default=0.3,
        help="rows held out per image (default 0.3); 0 trains on every row, without validation, "
             "and keeps the last epoch",
    )
    p.add_argument("--name", help="model name in the card (default: the folder name)")
    p.add_argument("--version", default="1")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (paper: 3e-3, code: 1e-3); a resumed run goes on with its checkpoint's "
                        "learning rate and schedule (--no-resume starts over with this one)")
    p.add_argument("--loss", choices=("dan", "bce"), default="dan", help="Eq. 5 loss or BCE (ablation)")
    p.add_argument("--mpp", type=float, default=0.25, help="pixel size to train at, µm/px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop after this many minutes")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--init-from", metavar="MODEL", help="start from this model's weights (fine-tuning)")
    p.add_argument("--no-instance-gaps", action="store_true",
                   help="plain binary targets (paper) instead of a seam between touching nuclei")
    p.add_argument("--no-colour-normalise", action="store_true",
                   help="feed pixels as they are (paper) instead of Reinhard-normalised onto the training set")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if a checkpoint exists (a resumed run keeps the checkpoint's network, "
                        "learning rate and schedule)")
    # architecture: a setting left out comes from the --init-from model, else the code's default
    p.add_argument("--channel-reduction", type=int, choices=(8, 16),
                   help="16 (code) or 8 (paper); default: the --init-from model's, else 16")
    p.add_argument("--no-spatial-attention", action="store_true", help="ablation")
    p.add_argument("--no-channel-attention", action="store_true", help="ablation")
    p.add_argument("--plain-blocks", action="store_true", help="ablation: plain conv blocks instead of residual")
    p.add_argument("--distance-head", action="store_true",
                   help="add a second output, each nucleus's normalised distance to its border, "
                        "to split touching nuclei (kept anyway when the --init-from model has it)")
    p.add_argument("--distance-only", action="store_true",
                   help="train only the distance branch; the rest keeps the --init-from model's weights")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep the BatchNorm statistics of --init-from (small fine-tuning batches would shift them)")
    p.add_argument("--average-from", type=int, metavar="EPOCH",
                   help="from this epoch on, also average the epoch-end weights; the mean is shipped when its "
                        "validation loss beats the best epoch's")
    p.add_argument("--extra-data", action="append", default=[], metavar="DIR[:SPLIT]",
                   help="another training set (whole images of SPLIT, default all); repeatable")
    p.add_argument("--negatives", type=float, default=0.0, metavar="SHARE",
                   help="share of patches made nucleus-free: haematoxylin stripped, empty target (issue 20)")
    p.add_argument("--pigment", type=float, default=0.0, metavar="SHARE",
                   help="share of patches given black or brown pigment dots on their background, target unchanged")
    p.add_argument("--base-filters", type=int,
                   help="filters of the first level (default: the --init-from model's, else the code's 32; "
                        "16 = the paper's figure, 2.8x faster on a CPU)")
    p.add_argument("--teacher", metavar="MODEL",
                   help="also learn this trained model's outputs on every batch (a narrower copy of a wide model)")
    p.add_argument("--teacher-weight", type=float, default=0.5, metavar="SHARE",
                   help="the teacher's share of the loss (default 0.5); the annotations have the rest")
    p.add_argument("--distance-weight", type=float, default=0.25, help="distance loss weight beside Eq. 5")
    p.add_argument("--bn-momentum", type=float,
                   help="default: the --init-from model's, else 0.1 (0.5 = Keras original: noisy with small batches)")


def run(args: argparse.Namespace) -> int:
    from dannucnet.formats.dataset import split_spec
    from dannucnet.outputs import MODEL_FILES, model_inputs, refuse_clobbering

    refuse_clobbering(
        [("--data", args.data), ("--data", Path(args.data) / "dataset.json"),
         *(("--extra-data", split_spec(spec)[0]) for spec in args.extra_data),
         *model_inputs(args.init_from, "--init-from"), *model_inputs(args.teacher, "--teacher")],
        [("--out", args.out), *(("--out", Path(args.out) / name) for name in MODEL_FILES)],
    )
    from dannucnet.train.loop import TrainConfig, train

    architecture = run_architecture(args)
    cfg = TrainConfig(
        data=args.data, out=args.out, split=args.split, val_split=args.val_split, val_fraction=args.val_fraction,
        name=args.name, version=args.version, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, lr=args.lr, loss=args.loss, mpp=args.mpp, seed=args.seed, device=args.device,
        time_budget_min=args.time_budget, augment=not args.no_augment,
        instance_gaps=not args.no_instance_gaps, init_from=args.init_from,
        colour_normalise=not args.no_colour_normalise, architecture=architecture,
        resume=not args.no_resume, overwrite=args.overwrite, distance_weight=args.distance_weight,
        distance_only=args.distance_only, freeze_bn=args.freeze_bn,
        average_from=args.average_from, extra_data=args.extra_data, negatives=args.negatives, pigment=args.pigment,
        teacher=args.teacher, teacher_weight=args.teacher_weight,
        command="dannucnet " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    train(cfg)
    return 0


def run_architecture(args: argparse.Namespace) -> dict[str, Any]:
    """The network this run trains: what the flags ask, and for every setting they leave out the
    ``--init-from`` model's (its card; the weights are loaded later), else the loop's
    :func:`~dannucnet.train.loop.default_architecture`.

    So ``train --init-from dannucnet-monuseg`` fine-tunes 1.6 as it is, distance head included (it was
    refused as an architecture change without ``--distance-head``), and a lite model keeps its 16 filters.
    A flag that contradicts the model is still the loop's to refuse or allow (``_initial_weights``).
    """
    given = {
        "channel_reduction": args.channel_reduction,
        "spatial_attention": False if args.no_spatial_attention else None,
        "channel_attention": False if args.no_channel_attention else None,
        "block": "plain" if args.plain_blocks else None,
        "bn_momentum": args.bn_momentum,
        "distance_head": True if args.distance_head else None,
        "base_filters": args.base_filters,
    }
    if args.init_from is None:
        from dannucnet.train.loop import default_architecture

        base = default_architecture()
    else:
        from dannucnet.model.card import ModelCard
        from dannucnet.model.registry import resolve_model_dir

        base = ModelCard.load(resolve_model_dir(args.init_from)).config.to_dict()
    return {**base, **{k: v for k, v in given.items() if v is not None}}
