"""Where images come from: dataset layouts -> sorted ``(key, path)`` lists, and how they are decoded.

Keys follow the project contract (docs/architecture.md): letters, digits, ``_`` and ``-`` only,
``/`` replaced by ``__``, so WebDataset (which splits a member name at its first dot) and tar
member names stay unambiguous. Any other character becomes ``_``; accented letters lose their
accents first, and a path with any non-ASCII character gets a short hash of the path appended
(``写真1.jpg`` and ``画像1.jpg`` would otherwise both be ``__1``). Two files that still end up
with the same key are an error rather than a silent overwrite.

Decoding lives here too because the proposal stage and the training reader must turn the same
bytes into the same pixels, or the boxes would not refer to the image the model sees.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tempfile
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageFile

from regioncl.io import write_text_atomic

# Truncated files must fail loudly instead of being padded with grey: the default, made explicit
# because any imported library could flip this process-wide switch.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# PIL format name -> file extension used in shards (the real format, not the file's suffix).
# MPO is a camera's multi-picture JPEG: a JPEG whose first frame is the picture.
SUPPORTED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp"}
# Modes of 16-bit (and 32-bit integer) grayscale PNGs, whose 0..65535 values ``convert("RGB")``
# would clip at 255 (a near-white picture) instead of scaling.
WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What libjpeg says about damaged entropy-coded (scan) data; it only warns and goes on.
JPEG_DAMAGE_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")


@dataclass(frozen=True)
class Layout:
    """Where a source kind keeps its images under ``root``, and which files count."""

    subdir: str
    pattern: str
    description: str


# Keys of these kinds are the path relative to ``root / subdir``.
LAYOUTS = {
    "imagenet": Layout("train", "*/*.JPEG", "root/train/<wnid>/*.JPEG (ImageNet class folders)"),
    "coco": Layout("train2017", "*.jpg", "root/train2017/*.jpg (COCO 2017)"),
    "embedded": Layout("unlabeled", "*.jpg", "root/unlabeled/*.jpg (regioncl embedded dataset)"),
}
EXPECTED_LAYOUT = {
    "folder": "a folder holding .jpg/.jpeg/.png/.bmp/.webp files (any depth)",
    **{kind: layout.description for kind, layout in LAYOUTS.items()},
    "filelist": "a text file with one image path per line",
}

_NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_for(relative: str) -> str:
    """``a/b.c/img.001.jpg`` -> ``a__b_c__img_001``: drop the extension, ``/`` -> ``__``, rest -> ``_``.

    Accents are dropped (``café`` -> ``cafe``); a non-ASCII path also gets ``-`` and 8 hex digits
    of its sha256 appended (of the NFC form, so the key is the same on every filesystem)."""
    relative = unicodedata.normalize("NFC", relative.strip("/"))
    stem = PurePosixPath(relative).with_suffix("")
    key = "__".join(_NOT_KEY_CHARS.sub("_", _without_accents(part)) for part in stem.parts)
    if not relative.isascii():
        key += "-" + hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return key


def _without_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def list_images(kind: str, root: Path) -> list[tuple[str, Path]]:
    """All images of a source as ``(key, path)`` sorted by key.

    ``folder``: every .jpg/.jpeg/.png/.bmp/.webp (any case) under ``root``, recursively;
    ``imagenet``/``coco``/``embedded``: the layouts in ``LAYOUTS``;
    ``filelist``: ``root`` is a text file with one image path per line (relative paths are
    relative to the list's folder; blank lines and ``#`` comments are skipped).
    """
    root = Path(root)
    if kind not in EXPECTED_LAYOUT:
        known = ", ".join(EXPECTED_LAYOUT)
        raise ValueError(f"image source kind {kind!r} is unknown; expected one of {known}")
    expected = EXPECTED_LAYOUT[kind]
    if not root.exists():
        raise FileNotFoundError(f"image source {kind!r}: {root} does not exist; expected {expected}")
    if kind == "folder":
        # A dangling symlink stays in the list, so the proposal stage reports it as a bad file.
        found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or _dangling(p))]
        entries = [(key_for(p.relative_to(root).as_posix()), p) for p in found]
    elif kind == "filelist":
        entries = _read_filelist(root) if root.is_file() else []
    else:
        base = root / LAYOUTS[kind].subdir
        entries = [(key_for(p.relative_to(base).as_posix()), p) for p in base.glob(LAYOUTS[kind].pattern)]
    if not entries:
        raise FileNotFoundError(f"image source {kind!r}: no images in {root}; expected {expected}")
    return _sorted_unique(entries, where=f"image source {kind!r} at {root}")


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _read_filelist(listfile: Path) -> list[tuple[str, Path]]:
    entries = []
    for lineno, line in enumerate(listfile.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text) if Path(text).is_absolute() else listfile.parent / text
        if not path.is_file():
            raise FileNotFoundError(f"{listfile}:{lineno}: image {text!r} does not exist (looked at {path})")
        entries.append((key_for(text), path))
    return entries


def _sorted_unique(entries: list[tuple[str, Path]], where: str) -> list[tuple[str, Path]]:
    entries = sorted(entries, key=lambda entry: (entry[0], str(entry[1])))
    for (key_a, path_a), (key_b, path_b) in zip(entries, entries[1:]):
        if key_a == key_b:
            raise ValueError(f"{where}: {path_a} and {path_b} both map to sample key {key_a!r}; rename one")
    return entries


def write_image_list(entries: Sequence[tuple[str, Path]], out: Path) -> None:
    """Write ``key<TAB>path`` lines (sorted by key), atomically."""
    lines = []
    for key, path in sorted(entries, key=lambda entry: entry[0]):
        text = str(path)
        if "\t" in text or "\n" in text or "\t" in key or "\n" in key:
            raise ValueError(f"image list {out}: key {key!r} / path {text!r} contains a tab or newline")
        lines.append(f"{key}\t{text}\n")
    write_text_atomic(out, "".join(lines))


def read_image_list(path: Path) -> list[tuple[str, Path]]:
    """Read a list written by ``write_image_list``; checks the format and that keys are unique."""
    entries = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 2 or not _KEY.fullmatch(fields[0]):
            raise ValueError(
                f"{path}:{lineno}: expected 'key<TAB>path' with a key of letters, digits, '_' and '-', "
                f"got {line!r}"
            )
        entries.append((fields[0], Path(fields[1])))
    return _sorted_unique(entries, where=f"image list {path}")


def chunk_of(entries: Sequence[tuple[str, Path]], chunk: int, num_chunks: int) -> list[tuple[str, Path]]:
    """Chunk ``chunk`` (0-based) of ``num_chunks`` contiguous pieces of the key-sorted list.

    Piece ``i`` is ``sorted[i*n//N : (i+1)*n//N]``, so sizes differ by at most one and every
    entry lands in exactly one chunk, whatever the order of ``entries``.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk < num_chunks:
        raise ValueError(f"chunk must be in [0, {num_chunks - 1}] for num_chunks={num_chunks}, got {chunk}")
    ordered = sorted(entries, key=lambda entry: entry[0])
    n = len(ordered)
    return ordered[chunk * n // num_chunks : (chunk + 1) * n // num_chunks]


class UnreadableImage(Exception):
    """An image file that cannot become an RGB picture; the message is the reason to record."""


def decode_rgb(
    data: bytes, *, min_side: int = 1, max_pixels: int | None = None, check_jpeg_scan: bool = True
) -> tuple[Image.Image, str]:
    """Decode image bytes to an RGB PIL image; returns ``(image, format extension)``.

    Grayscale, palette, alpha and CMYK images are converted to RGB (alpha is dropped, as
    torchvision's loaders do; PIL undoes Adobe's inverted CMYK); 16-bit grayscale is scaled
    to 8 bits. EXIF orientation is not applied: boxes refer to the stored pixel grid. Raises
    ``UnreadableImage`` for empty, non-image, truncated, unsupported, too small (a side <
    ``min_side``) or too large (> ``max_pixels``, checked from the header before decoding)
    files, and (``check_jpeg_scan``) JPEGs whose scan data libjpeg finds damaged: the
    admission check of the proposal stage; readers of admitted bytes skip its extra decode.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in SUPPORTED_FORMATS:
            raise UnreadableImage(
                f"unsupported format {image.format} (supported: {', '.join(SUPPORTED_FORMATS)})"
            )
        width, height = image.size
        if min(width, height) < min_side:
            raise UnreadableImage(f"too small: {width}x{height} px, need both sides >= {min_side}")
        if max_pixels is not None and width * height > max_pixels:
            raise UnreadableImage(
                f"too large: {width}x{height} px > {max_pixels} pixels (decompression bomb guard)"
            )
        image.load()
        if check_jpeg_scan and image.format in ("JPEG", "MPO"):
            damage = jpeg_scan_damage(data)
            if damage:
                raise UnreadableImage(f"damaged JPEG scan data (libjpeg: {damage})")
        return _to_rgb(image), SUPPORTED_FORMATS[image.format]
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports broken files as OSError (truncated, unidentified), SyntaxError (broken PNG
        # chunks) or ValueError/EOFError (bad headers).
        raise UnreadableImage(f"cannot decode: {type(err).__name__}: {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode not in WIDE_GRAY_MODES:
        return image.convert("RGB")
    wide = np.asarray(image).astype(np.int64).clip(0, 65535)
    eight_bit = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # 0..65535 -> 0..255, rounded
    return Image.fromarray(eight_bit, "L").convert("RGB")


# fd 2 is one per process: one capture at a time (threads of a process would swap it mid-way).
_STDERR_CAPTURE = threading.Lock()


def jpeg_scan_damage(data: bytes) -> str:
    """libjpeg's warnings about damaged scan data in a JPEG ('' if none).

    PIL silences libjpeg's warnings and decodes damaged entropy-coded data into wrong pixels.
    OpenCV's libjpeg prints them on the process's stderr, so the bytes are decoded once more by
    OpenCV (at 1/8 scale: the entropy decoding that finds the damage is complete, the inverse
    DCT is cheap) with file descriptor 2 pointed at a temporary file, which is read back.
    """
    import cv2

    with _STDERR_CAPTURE, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = captured.read().decode("utf-8", "replace").splitlines()
    return "; ".join(line.strip() for line in said if line.startswith(JPEG_DAMAGE_WARNINGS))
