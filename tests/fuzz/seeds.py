"""Small valid images in every format and mode the decoder is likely to meet, to start fuzzing from.

Random bytes rarely get past a decoder's magic number; mutating real files reaches the header parsers
and the decompressors behind them. `python tests/fuzz/seeds.py DIR` writes them as a libFuzzer corpus.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _digit(size: int = 24) -> Image.Image:
    """A hand-drawn-looking 7: dark ink on white, like a photo or a canvas export."""
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    draw.line([(size * 0.2, size * 0.2), (size * 0.8, size * 0.2), (size * 0.45, size * 0.85)], fill=0,
              width=max(1, size // 8))
    return page


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes | None:
    out = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # IM: deprecated, still decoded
            image.save(out, format=fmt, **options)
    except (OSError, ValueError, KeyError):  # a format or mode this Pillow build cannot write
        return None
    return out.getvalue()


def seed_images() -> dict[str, bytes]:
    """name -> encoded bytes; every entry decodes with Pillow."""
    gray = _digit()
    rgb, rgba = gray.convert("RGB"), gray.convert("RGBA")
    rgba.putalpha(Image.eval(gray, lambda v: 255 - v))  # ink opaque, paper transparent
    wide = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16))
    floats = Image.fromarray(np.asarray(gray, dtype=np.float32) / 255.0)
    candidates: dict[str, bytes | None] = {
        "gray.png": _encode(gray, "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "palette.png": _encode(gray.convert("P"), "PNG"),
        "bilevel.png": _encode(gray.convert("1"), "PNG"),
        "la.png": _encode(gray.convert("LA"), "PNG"),
        "16bit.png": _encode(wide, "PNG"),
        "gray.jpg": _encode(gray, "JPEG", quality=80),
        "rgb-progressive.jpg": _encode(rgb, "JPEG", quality=80, progressive=True),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray.gif": _encode(gray, "GIF"),
        "gray.bmp": _encode(gray, "BMP"),
        "rgba.bmp": _encode(rgba, "BMP"),
        "gray.tiff": _encode(gray, "TIFF"),
        "lzw.tiff": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "deflate.tiff": _encode(gray, "TIFF", compression="tiff_deflate"),
        "packbits.tiff": _encode(gray, "TIFF", compression="packbits"),
        "float.tiff": _encode(floats, "TIFF"),
        "16bit.tiff": _encode(wide, "TIFF"),
        "lossless.webp": _encode(rgba, "WEBP", lossless=True),
        "lossy.webp": _encode(rgb, "WEBP", quality=50),
        "gray.pgm": _encode(gray, "PPM"),
        "rgb.ppm": _encode(rgb, "PPM"),
        "gray.ico": _encode(rgba, "ICO", sizes=[(24, 24)]),
        "gray.tga": _encode(gray, "TGA"),
        "rle.tga": _encode(rgb, "TGA", compression="tga_rle"),
        "gray.pcx": _encode(gray, "PCX"),
        "gray.sgi": _encode(gray, "SGI"),
        "gray.im": _encode(gray, "IM"),
        "gray.qoi": _encode(rgba, "QOI"),
        "gray.jp2": _encode(gray, "JPEG2000"),
        "gray.dds": _encode(rgba, "DDS"),
    }
    return {name: data for name, data in candidates.items() if data is not None}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tests/fuzz/seeds.py CORPUS_DIR", file=sys.stderr)
        return 2
    directory = Path(argv[1])
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seed_images().items():
        (directory / name).write_bytes(data)
    print(f"wrote {len(seed_images())} seed images to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
