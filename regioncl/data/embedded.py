"""The embedded default dataset: a small detection problem generated offline from a seed.

Nothing can be downloaded at run time, so the default dataset is painted from the photos that
ship inside the scikit-image wheel (see ``shared/design/DATA.md``):

- background: a random crop/rescale/flip of a photo with a colour shift, sometimes blended with
  a second photo, plus clutter (irregular textured blobs and strokes of no class);
- objects of four classes (star, ring, triangle, cross), each with its own silhouette geometry
  and a class-typical texture photo, with random size (``min_object_size`` px up to
  ``max_object_fraction`` of the shorter side), aspect, rotation and position, soft edges and
  shading, painted back to front so that later objects occlude earlier ones;
- light sensor noise, then JPEG.

What carries class identity: the silhouette (outline geometry, and the ring's hole) and the
surface texture (the luminance pattern of the class's texture photos). What does not: colour.
Each object's hue is drawn uniformly from the whole circle and its saturation uniformly from
``OBJECT_SATURATION``, both independently of its class, as are its brightness, contrast,
shading, size, aspect, rotation and position. So the colour jitter and grayscale of the
self-supervised methods teach an invariance the detection task has, as on real photos
(generator version 1 gave each class a typical hue, a cue those augmentations teach a
pretrained network to drop).

Occlusion rule: an object is placed only if every object (itself included, since the image
border may cut it) keeps a visible mask of at least ``min_visible_fraction`` of its full area and
``min_visible_pixels`` pixels; otherwise the candidate is discarded and never painted. So every
painted object is annotated, and no unlabeled sliver of a class is left in an image to be
counted as a false positive. An annotation is the object's visible mask (``alpha >= 0.5`` and
not covered by a later object); its box is the tight box of that mask. A scene draws its number
of objects from [min_objects, max_objects] and redraws rejected candidates, giving up after
``ATTEMPTS_PER_OBJECT`` tries per object (a crowded scene may keep fewer; rare).

Unlabeled images come from the same generator; only their annotations are not written.

Each image depends only on ``(seed, split, index)``: generating 10 images yields the same first
10 images as generating 500, and the splits draw from disjoint random streams.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import skimage
from PIL import Image
from pycocotools import mask as mask_utils

from regioncl.io import write_bytes_atomic, write_json_atomic
from regioncl.settings import Settings, bounded, check_ranges

PHOTO_DIR = Path(skimage.__file__).parent / "data"

# Photos inside the scikit-image wheel (never fetched): colour photos and greyscale textures.
BACKGROUND_PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)

KEY_DIGITS = 6  # keys sort in index order up to 10**6 - 1 images per split
MAX_IMAGES_PER_SPLIT = 10**KEY_DIGITS - 1
SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision: 1/16 px
ATTEMPTS_PER_OBJECT = 20  # rejected candidates are redrawn; a scene gives up after this many
OBJECT_SATURATION = (0.15, 0.8)  # an object's saturation is uniform in this range, any class

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1) pixel window of an image, ends exclusive


@dataclass(frozen=True)
class EmbeddedSettings(Settings):
    """Parameters of the generator; ``version`` changes whenever its output for them changes.

    Ranges are declared on the fields (``bounded``); ``__post_init__`` checks them for settings
    built directly too, and the constraints between fields, which a range cannot state."""

    section: ClassVar[str] = "embedded"
    version: ClassVar[int] = 2

    seed: int = bounded(0, ge=0)
    n_unlabeled: int = bounded(500, ge=0, le=MAX_IMAGES_PER_SPLIT)
    n_train: int = bounded(200, ge=0, le=MAX_IMAGES_PER_SPLIT)
    n_val: int = bounded(100, ge=0, le=MAX_IMAGES_PER_SPLIT)
    image_size: int = bounded(256, ge=32)  # longer side, px
    # the shorter side is drawn from [fraction, 1] x image_size
    min_short_side_fraction: float = bounded(0.625, ge=0.25, le=1.0)
    min_objects: int = bounded(2, ge=1)
    max_objects: int = bounded(6, ge=1)  # and >= min_objects
    min_object_size: int = bounded(16, ge=4)  # smallest object diameter, px; <= the largest (below)
    max_object_fraction: float = bounded(0.6, ge=0.05, le=1.0)  # largest diameter / the shorter side
    # of an object's full area, after occlusion and the border
    min_visible_fraction: float = bounded(0.35, ge=0.0, le=1.0)
    min_visible_pixels: int = bounded(24, ge=1)
    jpeg_quality: int = bounded(90, ge=1, le=100)

    def __post_init__(self) -> None:
        check_ranges(type(self), vars(self), self.section)
        if self.max_objects < self.min_objects:
            raise ValueError(
                f"{self.section}.max_objects: expected a value >= min_objects ({self.min_objects}), "
                f"got {self.max_objects!r}"
            )
        largest = self.max_object_fraction * self.shortest_side
        if self.min_object_size > largest:
            raise ValueError(
                f"{self.section}.min_object_size: {self.min_object_size} px exceeds the largest "
                f"object size max_object_fraction x shortest side = {largest:.1f} px"
            )

    @property
    def shortest_side(self) -> int:
        return round(self.min_short_side_fraction * self.image_size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | None = None) -> EmbeddedSettings:
        """Settings from a config section or a ``dataset.json`` (whose ``version`` must match)."""
        if "version" in d and d["version"] != cls.version:
            raise ValueError(
                f"{where or cls.section}: version {d['version']!r} was written by another generator "
                f"version; this generator is version {cls.version} (regenerate the dataset)"
            )
        return super().from_dict({key: value for key, value in d.items() if key != "version"}, where)


# ---------------------------------------------------------------------------------------------
# Photos and textures


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR; decoded once per process."""
    path = PHOTO_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded dataset: photo {path} is missing; it ships inside the scikit-image wheel"
        )
    # PIL rather than cv2: libpng warns on stderr about one file's colour profile.
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def random_photo(rng: np.random.Generator, names: tuple[str, ...]) -> str:
    return names[int(rng.integers(len(names)))]


def photo_crop(rng: np.random.Generator, name: str, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 BGR in [0, 1]: a random crop of a photo, rescaled and flipped.

    The crop spans 0.5x to 3x the output size in photo pixels (less where the photo is smaller),
    so the same photo gives coarse and fine textures.
    """
    photo = load_photo(name)
    photo_h, photo_w = photo.shape[:2]
    zoom = min(log_uniform(rng, 0.5, 3.0), photo_h / height, photo_w / width)
    crop_h, crop_w = max(1, round(height * zoom)), max(1, round(width * zoom))
    y = int(rng.integers(0, photo_h - crop_h + 1))
    x = int(rng.integers(0, photo_w - crop_w + 1))
    crop = photo[y : y + crop_h, x : x + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    interpolation = cv2.INTER_AREA if zoom > 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=interpolation)
    return resized.astype(np.float32) / 255


def colour_shift(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    """Per-channel gains in 1 +- ``strength`` (which also tint greyscale photos), brightness and
    contrast."""
    gains = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
    brightness = rng.uniform(0.7, 1.15)
    contrast = rng.uniform(0.7, 1.3)
    mean = image.mean(axis=(0, 1), dtype=np.float32)
    return ((image - mean) * contrast + mean) * (gains * brightness)


def shifted_photo_crop(
    rng: np.random.Generator, height: int, width: int, strength: float
) -> np.ndarray:
    """A colour-shifted crop of any photo: backgrounds and clutter."""
    crop = photo_crop(rng, random_photo(rng, BACKGROUND_PHOTOS), height, width)
    return colour_shift(rng, crop, strength)


# ---------------------------------------------------------------------------------------------
# Silhouettes: unit outlines (radius <= 1 around the origin), placed into image pixels

# A silhouette is a list of closed contours, each with the value it paints: 255 fills, 0 cuts
# a hole (ring). Points are (N, 2) float (x, y).
Contours = list[tuple[np.ndarray, int]]


def polar(angles: np.ndarray, radii: np.ndarray | float) -> np.ndarray:
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def star_outline(rng: np.random.Generator) -> Contours:
    inner = rng.uniform(0.38, 0.52)
    vertex = np.arange(10)
    return [(polar(vertex * np.pi / 5, np.where(vertex % 2 == 0, 1.0, inner)), 255)]


def ring_outline(rng: np.random.Generator) -> Contours:
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    return [(polar(angles, 1.0), 255), (polar(angles, rng.uniform(0.45, 0.65)), 0)]


def triangle_outline(rng: np.random.Generator) -> Contours:
    angles = np.deg2rad(90 + 120 * np.arange(3) + rng.uniform(-10, 10, size=3))
    return [(polar(angles, 1.0), 255)]


def cross_outline(rng: np.random.Generator) -> Contours:
    w = rng.uniform(0.22, 0.34)  # half the width of an arm
    corner = np.array([(w, 1), (w, w), (1, w)])  # one quarter; its 4 rotations close the outline
    quarter_turns = [np.array([[c, -s], [s, c]]) for c, s in ((1, 0), (0, -1), (-1, 0), (0, 1))]
    return [(np.concatenate([corner @ turn.T for turn in quarter_turns]), 255)]


def blob_outline(rng: np.random.Generator) -> Contours:
    """Smooth irregular closed curve: clutter that is none of the classes."""
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    radii = np.ones_like(angles)
    for k in range(2, 6):
        radii += rng.uniform(0, 0.2) / k * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    return [(polar(angles, radii / radii.max()), 255)]


@dataclass(frozen=True)
class Silhouette:
    contours: Contours  # in image pixels, continuous coordinates (pixel (0, 0) spans [0, 1)^2)

    @classmethod
    def place(
        cls,
        unit: Contours,
        centre: tuple[float, float],
        radius: float,
        aspect: float,
        angle: float,
    ) -> Silhouette:
        """Stretch a unit outline to width/height ratio ``aspect``, rotate it, move it."""
        scale = np.array([radius * math.sqrt(aspect), radius / math.sqrt(aspect)])
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = np.array([[cos, -sin], [sin, cos]])
        return cls([((points * scale) @ rotation.T + centre, value) for points, value in unit])

    def full_area(self) -> float:
        """Area in px^2, including any part outside the image (shoelace formula)."""
        area = 0.0
        for points, value in self.contours:
            x, y = points[:, 0], points[:, 1]
            contour_area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
            area += contour_area if value else -contour_area
        return area

    def box_in(self, height: int, width: int) -> Box | None:
        """The window covering the silhouette inside the image, or None if it is outside."""
        points = np.concatenate([points for points, _ in self.contours])
        x0, y0 = np.floor(points.min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(points.max(axis=0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        return (int(y0), int(y1), int(x0), int(x1)) if x0 < x1 and y0 < y1 else None

    def alpha(self, box: Box) -> np.ndarray:
        """(y1-y0, x1-x0) uint8 anti-aliased coverage of the window ``box``."""
        y0, y1, x0, x1 = box
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        # cv2 puts pixel centres at integer coordinates; ours are at +0.5.
        origin = np.array([x0 + 0.5, y0 + 0.5])
        for points, value in self.contours:
            fixed = np.round((points - origin) * (1 << SUBPIXEL_BITS)).astype(np.int32)
            cv2.fillPoly(patch, [fixed], value, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        return patch


def soften(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 alpha in [0, 1] with a random edge blur (sharp to ~1 px soft)."""
    soft = alpha.astype(np.float32) / 255
    sigma = rng.uniform(0.0, 1.0)
    return cv2.GaussianBlur(soft, (0, 0), sigma) if sigma > 0.3 else soft


def composite(image: np.ndarray, box: Box, alpha: np.ndarray, paint: np.ndarray) -> None:
    """Alpha-blend ``paint`` (h, w, 3) over ``image`` in the window ``box``, in place."""
    y0, y1, x0, x1 = box
    a = alpha[:, :, None]
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - a) + paint * a


# ---------------------------------------------------------------------------------------------
# Object classes


@dataclass(frozen=True)
class ObjectClass:
    category_id: int
    name: str
    outline: Callable[[np.random.Generator], Contours]
    texture_photos: tuple[str, ...]  # class-typical surface texture (its luminance only)


OBJECT_CLASSES = (
    ObjectClass(1, "star", star_outline, ("gravel.png", "hubble_deep_field.jpg")),
    ObjectClass(2, "ring", ring_outline, ("brick.png", "coffee.png")),
    ObjectClass(3, "triangle", triangle_outline, ("grass.png", "chelsea.png")),
    ObjectClass(4, "cross", cross_outline, ("moon.png", "ihc.png")),
)


def object_surface(
    rng: np.random.Generator,
    object_class: ObjectClass,
    alpha: np.ndarray,
    box: Box,
    centre: tuple[float, float],
    radius: float,
) -> np.ndarray:
    """(h, w, 3) float32 BGR: the luminance of a class texture, tinted with a hue and saturation
    drawn independently of the class, lit from one side."""
    height, width = alpha.shape
    texture = photo_crop(rng, random_photo(rng, object_class.texture_photos), height, width)
    luminance = cv2.cvtColor(texture, cv2.COLOR_BGR2GRAY)
    # Normalised contrast: a crop of mostly black sky (moon, hubble) must not hide the object.
    contrast = rng.uniform(0.06, 0.16) / (luminance.std() + 0.02)
    value = np.clip(rng.uniform(0.35, 0.8) + (luminance - luminance.mean()) * contrast, 0, 1)
    hue = np.full_like(value, rng.uniform(0, 360))
    saturation = np.full_like(value, rng.uniform(*OBJECT_SATURATION))
    surface = cv2.cvtColor(np.stack([hue, saturation, value], axis=2), cv2.COLOR_HSV2BGR)
    # Shading: a brightness gradient towards a random light direction, darker near the rim.
    y0, _, x0, _ = box
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    light = rng.uniform(0, 2 * np.pi)
    towards_light = (xs + x0 + 0.5 - centre[0]) * math.cos(light) + (
        ys + y0 + 0.5 - centre[1]
    ) * math.sin(light)
    shade = 1 + rng.uniform(0, 0.35) * towards_light / radius
    rim = cv2.GaussianBlur(alpha, (0, 0), max(0.8, 0.12 * radius))
    shade *= 0.65 + 0.35 * rim
    return surface * shade[:, :, None]


# ---------------------------------------------------------------------------------------------
# Scenes


class VisibleMasks:
    """Which object each pixel shows, and the occlusion rule for painting one more on top."""

    def __init__(self, height: int, width: int) -> None:
        self.instance_map = np.zeros((height, width), np.int16)  # 0 background, i + 1 object i
        self.visible: list[int] = []  # visible pixels of each object
        self.required: list[float] = []  # the fewest visible pixels each object may keep

    def add_on_top(self, box: Box, mask: np.ndarray, required: float) -> bool:
        """Record an object (``mask``: its pixels in the window ``box``) over the others, unless
        it is too cut by the border or would hide too much of an earlier object."""
        y0, y1, x0, x1 = box
        window = self.instance_map[y0:y1, x0:x1]
        covered = np.bincount(window[mask], minlength=len(self.visible) + 1)[1:]
        remaining = np.array(self.visible, dtype=np.int64) - covered
        own = int(mask.sum())
        if own < required or np.any(remaining < np.array(self.required)):
            return False
        self.visible = [*remaining.tolist(), own]
        self.required.append(required)
        window[mask] = len(self.visible)
        return True


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 BGR
    instance_map: np.ndarray  # (H, W) int16: 0 background, i + 1 the visible pixels of object i
    category_ids: tuple[int, ...]  # category of object i


def image_shape(rng: np.random.Generator, settings: EmbeddedSettings) -> tuple[int, int]:
    short = int(rng.integers(settings.shortest_side, settings.image_size + 1))
    return (short, settings.image_size) if rng.random() < 0.5 else (settings.image_size, short)


def paint_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = shifted_photo_crop(rng, height, width, 0.3)
    if rng.random() < 0.4:
        weight = rng.uniform(0.15, 0.45)
        image = image * (1 - weight) + shifted_photo_crop(rng, height, width, 0.3) * weight
    return image


def paint_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """3-8 textured blobs and strokes of no class, under the objects."""
    height, width = image.shape[:2]
    short = min(height, width)
    for _ in range(int(rng.integers(3, 9))):
        if rng.random() < 0.5:
            shape = Silhouette.place(
                blob_outline(rng),
                centre=(rng.uniform(0, width), rng.uniform(0, height)),
                radius=log_uniform(rng, 0.03, 0.25) * short,
                aspect=log_uniform(rng, 0.4, 2.5),
                angle=rng.uniform(0, 2 * np.pi),
            )
            box = shape.box_in(height, width)
            if box is None:
                continue
            alpha = shape.alpha(box)
        else:
            steps = rng.normal(0, 0.15 * short, size=(int(rng.integers(3, 7)), 2))
            points = np.cumsum(steps, axis=0) + (rng.uniform(0, width), rng.uniform(0, height))
            fixed = np.round((points - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)
            box = (0, height, 0, width)
            alpha = np.zeros((height, width), np.uint8)
            thickness = int(rng.integers(1, 7))
            cv2.polylines(
                alpha, [fixed], False, 255, thickness, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS
            )
        paint = shifted_photo_crop(rng, *alpha.shape, strength=0.5)
        composite(image, box, soften(alpha, rng) * rng.uniform(0.5, 1.0), paint)


def render_scene(rng: np.random.Generator, settings: EmbeddedSettings) -> Scene:
    """Background, clutter, then objects back to front under the occlusion rule, then noise."""
    height, width = image_shape(rng, settings)
    image = paint_background(rng, height, width)
    paint_clutter(rng, image)

    masks = VisibleMasks(height, width)
    category_ids: list[int] = []
    target = int(rng.integers(settings.min_objects, settings.max_objects + 1))
    largest = settings.max_object_fraction * min(height, width)
    for _ in range(ATTEMPTS_PER_OBJECT * target):
        if len(category_ids) == target:
            break
        object_class = OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        radius = log_uniform(rng, settings.min_object_size, largest) / 2
        shape = Silhouette.place(
            object_class.outline(rng),
            centre,
            radius,
            aspect=log_uniform(rng, 0.6, 1.67),
            angle=rng.uniform(0, 2 * np.pi),
        )
        box = shape.box_in(height, width)
        if box is None:
            continue
        required = max(
            settings.min_visible_fraction * shape.full_area(), settings.min_visible_pixels
        )
        alpha = soften(shape.alpha(box), rng)
        if masks.add_on_top(box, alpha >= 0.5, required):
            category_ids.append(object_class.category_id)
            surface = object_surface(rng, object_class, alpha, box, centre, radius)
            composite(image, box, alpha, surface)

    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.0, 0.02)
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return Scene(pixels, masks.instance_map, tuple(category_ids))


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class Split:
    folder: str
    key_prefix: str
    count_setting: str  # the EmbeddedSettings field giving the number of images
    stream: int  # the split's entry in each image's seed; distinct streams keep splits disjoint
    labeled: bool


SPLITS = (
    Split("unlabeled", "unl", "n_unlabeled", stream=0, labeled=False),
    Split("train", "train", "n_train", stream=1, labeled=True),
    Split("val", "val", "n_val", stream=2, labeled=True),
)


def image_rng(seed: int, split: Split, index: int) -> np.random.Generator:
    """The generator of one image: a function of (seed, split, index) alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, split.stream, index]))


def image_keys(split: Split, settings: EmbeddedSettings) -> list[str]:
    count = getattr(settings, split.count_setting)
    return [f"{split.key_prefix}_{index:0{KEY_DIGITS}d}" for index in range(count)]


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"embedded dataset: OpenCV could not encode a {image.shape} JPEG")
    return data.tobytes()


def coco_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations of a scene's visible masks; ids count up from ``first_id``."""
    annotations = []
    for i, category_id in enumerate(scene.category_ids):
        mask = scene.instance_map == i + 1
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {
                "id": first_id + i,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return annotations


def coco_dataset(
    split: Split, version: int, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "info": {
            "description": f"regioncl embedded dataset, {split.folder} split",
            "version": str(version),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in OBJECT_CLASSES
        ],
    }


def check_no_stale_images(out_dir: Path, settings: EmbeddedSettings) -> None:
    """Refuse a directory holding images this run would not write (e.g. from a larger run)."""
    for split in SPLITS:
        folder = out_dir / split.folder
        if not folder.is_dir():
            continue
        expected = {f"{key}.jpg" for key in image_keys(split, settings)}
        stale = sorted(p.name for p in folder.glob("*.jpg") if p.name not in expected)
        if stale:
            raise FileExistsError(
                f"embedded dataset: {folder} holds {len(stale)} image(s) this run does not write "
                f"(e.g. {stale[0]}); generate into an empty directory"
            )


def generate_embedded(out_dir: Path, settings: EmbeddedSettings) -> None:
    """Write the embedded dataset under ``out_dir``; ``dataset.json`` is written last."""
    out_dir = Path(out_dir)
    check_no_stale_images(out_dir, settings)
    for split in SPLITS:
        (out_dir / split.folder).mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for index, key in enumerate(image_keys(split, settings)):
            scene = render_scene(image_rng(settings.seed, split, index), settings)
            jpeg = encode_jpeg(scene.image, settings.jpeg_quality)
            write_bytes_atomic(out_dir / split.folder / f"{key}.jpg", jpeg)
            if split.labeled:
                height, width = scene.instance_map.shape
                image_id = index + 1
                images.append(
                    {"id": image_id, "file_name": f"{key}.jpg", "width": width, "height": height}
                )
                annotations.extend(coco_annotations(scene, image_id, len(annotations) + 1))
        if split.labeled:
            write_json_atomic(
                out_dir / "annotations" / f"instances_{split.folder}.json",
                coco_dataset(split, settings.version, images, annotations),
            )
    write_json_atomic(out_dir / "dataset.json", {**settings.to_dict(), "version": settings.version})
