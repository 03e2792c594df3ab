"""Images and slides: open, pixel size, region reads, tissue mask, synthetic H&E."""

from __future__ import annotations

from dannucnet.slides.reader import ImageSource, open_image

__all__ = ["ImageSource", "open_image"]
