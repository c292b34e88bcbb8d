"""One image file -> the stored image: what both tiers hold or produce for a sample, pixel for pixel.

Decoding is Pillow's (libjpeg-turbo for JPEG), converted to RGB as timm and torchvision convert (grayscale
replicated, alpha dropped, palettes expanded). An image whose longest side exceeds the store size is reduced
to it once, keeping its aspect (JPEGs first in the DCT domain, `Image.draft`: decoding at 1/2, 1/4 or 1/8 scale,
never below the target; then Pillow's antialiased bilinear resize), and kept as a JPEG of quality 95 at that size
(FFCV's approach: every later epoch decodes the small file and resizes nothing). Images that fit are kept as they
are, their own bytes. `prepare` makes those bytes; both tiers decode them, so they hold the same pixels.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import torch

from .types import DataError


def stored_size(width: int, height: int, store_size: int) -> tuple[int, int]:
    """(width, height) of an image once stored: the longest side at most store_size (0: no limit)."""
    longest = max(width, height)
    if not store_size or longest <= store_size:
        return width, height
    scale = store_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def digest(data: bytes) -> bytes:
    """What a dataset's fingerprint hashes of an encoded image (16 bytes)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def _open(data: bytes, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        what = "an empty file" if not data else "no image format Pillow reads"
        raise DataError(f"{name}: not a readable image ({what}). Remove or replace this file.") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {_first(e)} Pillow refuses images this large (a guard against decompression "
                        "bombs): downscale it, or remove it.") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: not a readable image ({e}). Remove or replace this file.") from None


def _first(e: Exception) -> str:
    return str(e).split(", could be")[0].rstrip(".") + "."


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with _open(data, name) as img:
        return img.size


def decode_pil(data: bytes, name: str, store_size: int = 0):
    """The stored image of an encoded file as an RGB Pillow image; a damaged or truncated file is named."""
    from PIL import Image

    img = _open(data, name)
    try:
        with img:
            target = stored_size(*img.size, store_size)
            if target != img.size and img.format == "JPEG":
                img.draft(img.mode, target)  # DCT-domain reduction: a fraction of the decoding work
            rgb = img.convert("RGB")
            if rgb.size != target:
                rgb = rgb.resize(target, Image.BILINEAR)
            rgb.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated data, broken chunks
        raise DataError(f"{name}: not a readable image ({e}). Remove or replace this file.") from None
    return rgb


STORE_QUALITY = 95


def prepare(data: bytes, name: str, store_size: int) -> tuple[bytes, tuple[int, int]]:
    """The bytes a sample is kept as, and their (width, height): the file itself when it fits the store size, else
    its reduced image as a JPEG of quality STORE_QUALITY. The image is decoded either way, so a damaged file is named
    when the data is prepared, in both tiers."""
    kept, image = _kept(data, name, store_size, decoded=False)
    return kept, image.size


def _kept(data: bytes, name: str, store_size: int, decoded: bool = True):
    """(the bytes kept, the image they decode to; decoded=False: the image they were made from, of the same size)."""
    image = decode_pil(data, name, store_size)
    if image.size == image_size(data, name):
        return data, image
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=STORE_QUALITY)
    kept = out.getvalue()
    return kept, decode_pil(kept, name) if decoded else image


def decode_stored(data: bytes, name: str, store_size: int) -> torch.Tensor:
    """The stored image (3, h, w) uint8 of a source file: what the streamed tier decodes from prepare's bytes."""
    return _tensor(_kept(data, name, store_size)[1])


def decode_image(data: bytes, name: str, store_size: int = 0) -> torch.Tensor:
    """The stored image (3, h, w) uint8 of an encoded file."""
    return _tensor(decode_pil(data, name, store_size))


def _tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
