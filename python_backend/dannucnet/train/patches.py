"""Training patches: random crops with the paper's augmentation plus stain jitter.

The paper flips (and rotates/shifts small sets); we add the dihedral
rotations, random crop positions (the shift), and haematoxylin/eosin jitter
in optical-density space so the model copes with stain variation between
labs instead of memorising one lab's colours. Patches without a nucleus are
mostly rejected (the paper removes blank patches) but a few are kept so the
model still sees empty stroma.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dannucnet.engine.colour import ColourReference, normalise_colour
from dannucnet.formats.dataset import Sample
from dannucnet.geometry.stain import hed_to_rgb, od_to_rgb, rgb_to_hed, rgb_to_od


@dataclass
class TrainImage:
    """One image held in memory at the model's pixel size."""

    stem: str
    rgb: np.ndarray  # uint8 HxWx3
    mask: np.ndarray  # uint8 HxW, 1 = nucleus
    valid: np.ndarray  # uint8 HxW, 1 = annotated (counted by the loss)
    rows: tuple[int, int]  # row range patches may come from (train/validation hold-out)
    depth: np.ndarray | None = None  # uint8 HxW, 255 × normalised distance to the nucleus's own border

    @property
    def patch_area(self) -> tuple[int, int]:
        """Rows × columns that patches may come from: the training rows, the full width."""
        return self.rows[1] - self.rows[0], int(self.rgb.shape[1])

    def holds(self, size: int) -> bool:
        """Whether a ``size``² patch fits in :attr:`patch_area`."""
        return min(self.patch_area) >= size


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """Each nucleus's distance to its own border, divided by its largest value: 1 at its centre.

    The target of the optional distance head. Distances are measured inside the
    seam-separated foreground, so two touching nuclei each get their own hill and
    the valley between them reaches zero — the cue the instance split needs and a
    plain foreground probability (≈1 across both) does not carry.
    """
    labels = np.asarray(labels)
    fg = separated_foreground(labels)
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    lab = np.where(fg > 0, labels, 0).astype(np.int64)
    peak = np.zeros(int(lab.max()) + 1, np.float32)
    np.maximum.at(peak, lab.ravel(), dist.ravel())
    peak[0] = 1.0
    return (dist / np.maximum(peak[lab], 1e-6)).astype(np.float32)


def separated_foreground(labels: np.ndarray) -> np.ndarray:
    """Nucleus mask with a background seam wherever two different nuclei touch.

    The network predicts one foreground probability and nothing about instances,
    so touching nuclei in a plain ``labels > 0`` target teach it to draw them as
    one blob, which no post-processing can undo reliably. Clearing the pixels
    that border a *different* nucleus (a 2 px seam between touching nuclei,
    outer outlines untouched) teaches it to leave a gap the instance split finds.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected 2-D instance labels, got shape {labels.shape}")
    lab = labels.astype(np.int32, copy=False)
    kernel = np.ones((3, 3), np.uint8)
    highest = cv2.dilate(lab.astype(np.float32), kernel)
    # erode ignoring background: background becomes +inf so it never wins the minimum
    lowest = cv2.erode(np.where(lab > 0, lab, np.iinfo(np.int32).max).astype(np.float32), kernel)
    own = lab.astype(np.float32)
    touches_other = (lab > 0) & ((highest != own) | ((lowest != own) & (lowest < np.iinfo(np.int32).max)))
    return ((lab > 0) & ~touches_other).astype(np.uint8)


def load_train_image(
    sample: Sample,
    target_mpp: float | None,
    rows_fraction: tuple[float, float],
    instance_gaps: bool = True,
    distance: bool = False,
) -> TrainImage:
    """Load a sample, resample to ``target_mpp`` when its pixel size differs by more than 2 %.

    The instance labels are resampled (nearest neighbour, so ids stay ids) *before* the
    targets are made, so the seam between touching nuclei and the distance hills are
    drawn at the pixel size the network sees: a 2 px seam made at 0.25 µm/px and then
    halved would shrink to 1 px or vanish at 0.5 µm/px (the native-20× model).
    ``instance_gaps`` cuts a background seam between touching nuclei in the target
    (see :func:`separated_foreground`); off gives the paper's plain binary mask.
    ``distance`` adds the distance-head target (:func:`normalised_distance`).
    """
    rgb = sample.load_image()
    labels = sample.load_labels()
    region = sample.load_region()
    valid = np.ones(labels.shape, np.uint8) if region is None else region.astype(np.uint8)
    if target_mpp and sample.mpp and abs(sample.mpp / target_mpp - 1.0) > 0.02:
        scale = sample.mpp / target_mpp
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        labels = cv2.resize(labels.astype(np.float32), size, interpolation=cv2.INTER_NEAREST).astype(np.int32)
        valid = cv2.resize(valid, size, interpolation=cv2.INTER_NEAREST)
    mask = separated_foreground(labels) if instance_gaps else (labels > 0).astype(np.uint8)
    depth = np.round(normalised_distance(labels) * 255).astype(np.uint8) if distance else None
    h = rgb.shape[0]
    rows = (int(h * rows_fraction[0]), int(h * rows_fraction[1]))
    return TrainImage(sample.stem, rgb, mask, valid, rows, depth)


#: HED concentration scale range (±). Frozen sections and other labs differ by more than 15 %.
STAIN_JITTER = 0.3


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = STAIN_JITTER) -> np.ndarray:
    """Scale and shift each stain's concentration (H, E, residual) by a random amount."""
    conc = rgb_to_hed(rgb)
    alpha = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
    beta = rng.uniform(-strength / 4, strength / 4, size=3).astype(np.float32)
    return hed_to_rgb(conc * alpha + beta * 0.4343)  # beta was tuned in natural-log OD; stain.py uses log10


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation changes of a different scanner or a darker section.

    Without them the network learns "dark purple = nucleus", which holds in the
    training labs and fails on dense, dark tissue (frozen colon and bladder in
    the Kumar test split were called nucleus almost everywhere).
    """
    x = rgb.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + (x - grey[..., None]) * rng.uniform(0.7, 1.3)  # saturation
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean()  # contrast
    x = x * rng.uniform(0.85, 1.15)  # brightness
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def dihedral(arrays: list[np.ndarray], k: int, flip: bool) -> list[np.ndarray]:
    out = [np.rot90(a, k, axes=(0, 1)) for a in arrays]
    if flip:
        out = [a[:, ::-1] for a in out]
    return [np.ascontiguousarray(a) for a in out]


#: Haematoxylin left in a negative patch: 0-10 % of its own (a faint nucleus in a real slide keeps ≥ 30 %).
NEGATIVE_H_SCALE = 0.1


def strip_haematoxylin(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same tissue with its haematoxylin removed (scaled to 0-10 %): eosin-only, nucleus-free.

    The false nuclei of issue 20 are pink: cytoplasm, collagen and fat septa
    stretched or simply dark enough to pass for a nucleus. A real training patch
    with its haematoxylin taken out keeps the texture, the eosin and the ghost
    outlines of its nuclei, and its target is empty: it teaches "pink is not a
    nucleus, however dark or round", which the annotated images, where almost
    every dark blob is a nucleus, never say.
    """
    conc = rgb_to_hed(rgb)
    conc[..., 0] *= rng.uniform(0.0, NEGATIVE_H_SCALE)
    return hed_to_rgb(conc)


#: Pigment and debris colours, optical density per unit amount (R, G, B): black (carbon, formalin
#: pigment, debris: absorbs all three alike) and brown (haemosiderin, melanin: absorbs blue most).
#: A nucleus absorbs green most and blue least (haematoxylin ≈ 0.65, 0.70, 0.29), so neither is one.
PIGMENT_OD = {"black": (0.56, 0.58, 0.60), "brown": (0.27, 0.57, 0.78)}
#: Pigment amount per dot: black 0.8-1.8 adds OD ≈ 0.45-1.05 in every channel at its centre; on NuInsSeg
#: spleen, the black dots 1.6 called nuclei measure 0.7-0.95 (mean over the dot, tissue included).
PIGMENT_AMOUNT = {"black": (0.8, 1.8), "brown": (0.6, 1.6)}
#: Dot diameters in µm: 1.5-6 µm; the black dots called nuclei on NuInsSeg spleen cover 15-28 µm² (4-6 µm).
PIGMENT_DIAMETER_UM = (1.5, 6.0)


def add_pigment(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator, mpp: float = 0.25) -> np.ndarray:
    """The patch with 1-6 dots of black or brown pigment painted on its background; the target is unchanged.

    Of 1.6's 23 false nuclei on the nuclei-poor crops of NuInsSeg ``val``, 7 are dark dots
    (carbon, haemosiderin, debris; most others are pale nuclei left unannotated). The Kumar
    images hold almost none, so the network never learnt that a dark dot is not a nucleus.
    A dot is one blob or a cluster of 3-8 granules, added in optical-density space (so it
    darkens the tissue below it as a real pigment does), with a soft edge, and kept whole at
    least 3 px off every nucleus pixel so the unchanged target stays right (a dot that would
    touch one is not painted).
    """
    free = cv2.erode((mask == 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    ys, xs = np.nonzero(free)
    if len(ys) == 0:
        return rgb
    od = rgb_to_od(rgb)  # a new array: the table lookup copies
    wanted, painted = int(rng.integers(1, 7)), 0
    for _ in range(10 * wanted):  # dense tissue leaves few places whole dots fit: try more than we need
        if painted == wanted:
            break
        kind = "black" if rng.random() < 0.6 else "brown"
        at = int(rng.integers(len(ys)))
        cy, cx = int(ys[at]), int(xs[at])
        diameter = rng.uniform(*PIGMENT_DIAMETER_UM) / mpp
        granules = 1 if rng.random() < 0.6 else int(rng.integers(3, 9))
        layer = np.zeros(mask.shape, np.float32)
        for _ in range(granules):
            size = diameter if granules == 1 else diameter * rng.uniform(0.25, 0.5)
            dy, dx = (0.0, 0.0) if granules == 1 else rng.normal(0.0, diameter / 2, 2)
            axes = tuple(max(1, round(size / 2 * rng.uniform(0.6, 1.0))) for _ in range(2))
            cv2.ellipse(layer, (round(cx + dx), round(cy + dy)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), 0.2 / mpp)
        if (layer[~free] > 0.02).any():
            continue
        amount = rng.uniform(*PIGMENT_AMOUNT[kind])
        od += layer[..., None] * (amount * np.asarray(PIGMENT_OD[kind], np.float32))
        painted += 1
    return od_to_rgb(od)


#: How far a foreign lab's average colour lies from the reference (OpenCV 8-bit L*, a*, b*; 1.6's reference
#: 139 / 159 / 116): NuInsSeg's spleen averages 101 / 137 / 119 with half the L* spread, GBM40 112 / 164 / 94.
FOREIGN_LAB_SHIFT = ((-45.0, -25.0, -25.0), (10.0, 5.0, 10.0))
FOREIGN_SPREAD = (0.5, 1.25)


def add_pigment_as_scanned(
    rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator, mpp: float, reference: ColourReference,
) -> np.ndarray:
    """Pigment as another lab's scan holds it, after the engine's colour normalisation.

    A black dot in a dark, grey-blue scan is normalised with the whole chunk: the shift that
    brings the tissue to the reference turns the dot dark purple, the colour of a dense nucleus
    (seen on NuInsSeg spleen). A dot painted black on the already normalised patch never looks
    like that. So the patch is first mapped onto a random foreign lab's colours, the dots are
    painted there, and the result is normalised back as the engine would (same clamps).
    """
    mean = np.asarray(reference.mean) + rng.uniform(*FOREIGN_LAB_SHIFT)
    std = np.asarray(reference.std) * rng.uniform(*FOREIGN_SPREAD, 3)
    foreign = ColourReference(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                              max_scale=10.0)
    scanned = add_pigment(normalise_colour(rgb, foreign), mask, rng, mpp)
    return normalise_colour(scanned, reference)


class PatchSampler:
    """Draws augmented training patches from images held in memory.

    Images are picked in proportion to their area (uniformly when, as in the
    Kumar set, all have one size), so adding a set of small images does not let
    them crowd out the large ones. With ``negatives`` > 0 that share of the
    patches are made nucleus-free by :func:`strip_haematoxylin`, with an empty
    target; with ``pigment`` > 0 that share get dark dots on their background
    (:func:`add_pigment`, ``mpp`` sizing them), target unchanged; given the colour
    ``reference``, half of them as another lab's scan holds them
    (:func:`add_pigment_as_scanned`).
    """

    def __init__(
        self,
        images: list[TrainImage],
        size: int = 256,
        seed: int = 0,
        augment: bool = True,
        keep_empty: float = 0.1,
        negatives: float = 0.0,
        pigment: float = 0.0,
        mpp: float = 0.25,
        reference: ColourReference | None = None,
    ) -> None:
        self.images = [im for im in images if im.holds(size)]
        if not self.images:
            raise ValueError(f"no image has a {size}x{size} area to sample patches from")
        if not 0.0 <= negatives < 1.0:
            raise ValueError(f"negative share {negatives} must be at least 0 and below 1")
        if not 0.0 <= pigment <= 1.0:
            raise ValueError(f"pigment share {pigment} must be between 0 and 1")
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.keep_empty = keep_empty
        self.negatives = negatives
        self.pigment = pigment
        self.mpp = mpp
        self.reference = reference
        areas = np.array([np.prod(im.patch_area) for im in self.images], np.float64)
        self._weights = None if np.all(areas == areas[0]) else areas / areas.sum()

    def _pick(self) -> TrainImage:
        if self._weights is None:
            return self.images[self.rng.integers(len(self.images))]
        return self.images[self.rng.choice(len(self.images), p=self._weights)]

    def sample(self, clean: bool = False) -> tuple[np.ndarray, ...]:
        """(rgb, mask, valid) — plus the distance target when the images carry one, and with ``clean``
        last of all the same patch before any pigment was painted on it, under the same augmentation:
        what a teacher is asked (:meth:`batch`)."""
        negative = self.negatives > 0 and self.rng.random() < self.negatives
        for _ in range(50):
            im = self._pick()
            y = self.rng.integers(im.rows[0], im.rows[1] - self.size + 1)
            x = self.rng.integers(0, im.rgb.shape[1] - self.size + 1)
            window = (slice(y, y + self.size), slice(x, x + self.size))
            mask, valid = im.mask[window], im.valid[window]
            if valid.mean() < 0.05:
                continue
            if negative or mask.any() or self.rng.random() < self.keep_empty:
                break
        parts = [im.rgb[window], mask, valid] + ([] if im.depth is None else [im.depth[window]])
        if negative:
            parts = [strip_haematoxylin(parts[0], self.rng), np.zeros_like(mask), np.ones_like(valid),
                     *(np.zeros_like(p) for p in parts[3:])]
        unpainted = parts[0]
        painted = self.pigment > 0 and self.rng.random() < self.pigment
        if painted:
            if self.reference is not None and self.rng.random() < 0.5:
                parts[0] = add_pigment_as_scanned(parts[0], parts[1], self.rng, self.mpp, self.reference)
            else:
                parts[0] = add_pigment(parts[0], parts[1], self.rng, self.mpp)
        if clean:
            parts.append(unpainted)
        if self.augment:
            parts = dihedral(parts, int(self.rng.integers(4)), bool(self.rng.integers(2)))
            jitter = self.rng.bit_generator.state
            parts[0] = colour_jitter(stain_jitter(parts[0], self.rng), self.rng)
            if clean and painted:  # the same draws again: the clean patch gets the painted one's colours
                self.rng.bit_generator.state = jitter
                parts[-1] = colour_jitter(stain_jitter(parts[-1], self.rng), self.rng)
            elif clean:  # nothing painted: the clean patch is the patch
                parts[-1] = parts[0]
        return tuple(parts)

    def batch(self, n: int, clean: bool = False) -> tuple[np.ndarray, ...]:
        """``n`` samples stacked. ``clean``: the patches before their pigment come last (a teacher's input:
        it answers for the unpainted patch, so it never teaches that a painted dot is a nucleus)."""
        items = [self.sample(clean) for _ in range(n)]
        return tuple(np.stack(parts) for parts in zip(*items))  # type: ignore[return-value]


def grid_patches(images: list[TrainImage], size: int = 256) -> list[tuple[np.ndarray, ...]]:
    """Fixed, non-random patches covering each image's row range: a stable validation set.

    When a held-out strip is shorter than ``size`` (the bottom 30 % of a 1000 px MoNuSeg
    image is 150 rows once halved to 0.5 µm/px), the patches take the shortest strip's
    height, rounded down to a multiple of 16 (the network's four poolings), so that every
    patch has one shape and can be batched: 144 × 256 there.
    """
    out = []
    height = min([size] + [(im.rows[1] - im.rows[0]) // 16 * 16 for im in images])
    for im in images:
        r0, r1 = im.rows
        if height < 16 or im.rgb.shape[1] < size:
            continue
        ys = sorted({*range(r0, r1 - height + 1, height), r1 - height})
        xs = sorted({*range(0, im.rgb.shape[1] - size + 1, size), im.rgb.shape[1] - size})
        for y in ys:
            for x in xs:
                w = (slice(y, y + height), slice(x, x + size))
                out.append((im.rgb[w], im.mask[w], im.valid[w]) + (() if im.depth is None else (im.depth[w],)))
    return out
