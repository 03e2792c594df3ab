"""Which slides make up a cohort, and where each one's output goes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dannucnet.errors import InputError

#: Files a folder scan picks up (tiffslide formats and the plain images ``segment`` reads).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".png", ".jpg", ".jpeg")
#: Multi-part suffixes stripped whole when naming outputs (``a.ome.tif`` → ``a``).
_COMPOUND = (".ome.tiff", ".ome.tif")


def slide_stem(path: Path) -> str:
    name = path.name
    for suffix in _COMPOUND:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_slides(dir_or_list: str | Path | Sequence[str | Path]) -> list[Path]:
    """Slides of a folder (sorted, not recursive), of a text file (one path per line,
    relative to the file's folder, ``#`` comments) or of an explicit sequence."""
    if isinstance(dir_or_list, (list, tuple)):
        slides = [Path(p) for p in dir_or_list]
    else:
        src = Path(dir_or_list)
        if not src.exists():
            raise InputError(f"{src} does not exist: give a folder of slides or a text file listing them")
        if src.is_dir():
            slides = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES))
            if not slides:
                raise InputError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in {src}")
        else:
            try:
                lines = src.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read the slide list {src}: {exc}") from None
            slides = []
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line).expanduser()
                    slides.append(p if p.is_absolute() else src.parent / p)
            if not slides:
                raise InputError(f"the slide list {src} names no slides")
    seen: dict[str, Path] = {}
    for p in slides:
        stem = slide_stem(p)
        if stem in seen and seen[stem] != p:
            raise InputError(f"two slides would write the same output {stem!r}: {seen[stem]} and {p}; rename one")
        seen[stem] = p
    return list(dict.fromkeys(slides))


def output_path_for(slide: Path, outdir: Path, suffix: str = ".geojson.gz") -> Path:
    return Path(outdir) / f"{slide_stem(Path(slide))}{suffix}"
