"""An offline glyph benchmark: characters rendered from the TrueType fonts matplotlib ships.

Classes are characters, domains are typeface families. Every image is rendered from a seed with
affine jitter, stroke weight, colours, background gradients, blur and noise, so the task is not a
lookup. Nothing is downloaded: the fonts are part of the matplotlib wheel.

Pre-training characters (other scripts, symbols) are disjoint from the benchmark's and filtered for
look-alikes, the way ImageNet-21K pre-training is disjoint from ImageNet-R.
"""

from __future__ import annotations

import functools
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from fmlora.errors import DataError

from .images import ImageSet, TaskData

__all__ = [
    "BENCHMARK_CHARACTERS",
    "FAMILIES",
    "GlyphRenderer",
    "GlyphSampler",
    "font_directory",
    "make_glyph_stream",
    "pretraining_characters",
    "render_pretraining_set",
]

# 100 classes: Latin letters, digits, ASCII symbols and Latin-1 signs.
BENCHMARK_CHARACTERS: tuple[str, ...] = tuple(
    string.ascii_uppercase + string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[]" + "¢£¥§¶©®±÷×ßæøµ"
)

FAMILIES: dict[str, tuple[str, ...]] = {
    "dejavu-sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"),
    "dejavu-sans-mono": (
        "DejaVuSansMono.ttf",
        "DejaVuSansMono-Bold.ttf",
        "DejaVuSansMono-Oblique.ttf",
        "DejaVuSansMono-BoldOblique.ttf",
    ),
    "dejavu-serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf"),
    "stix": ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"),
    "computer-modern": ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf"),
}

# Unicode names of characters drawn like a benchmark class (small capitals, dashes, quotes, signs).
_LOOKALIKE_NAMES = (
    "LATIN",
    "MINUS",
    "HYPHEN",
    "DASH",
    "QUOTATION",
    "APOSTROPHE",
    "PRIME",
    "COMMA",
    "FULL STOP",
    "SOLIDUS",
    "VERTICAL LINE",
    "OVERLINE",
    "LOW LINE",
    "DIGIT",
    "NUMBER SIGN",
    "PERCENT",
    "PER MILLE",
    "SECTION",
    "PILCROW",
    "COPYRIGHT",
    "REGISTERED",
    "PLUS",
    "DIVISION",
    "MULTIPLICATION",
    "MICRO",
    "SHARP S",
    " MU",
    "COLON",
    "EXCLAMATION",
    "QUESTION",
    "AMPERSAND",
    "ASTERISK",
    "COMMERCIAL AT",
    "DOLLAR",
    "CENT",
    "POUND",
    "YEN",
    "LESS-THAN",
    "GREATER-THAN",
    "EQUALS",
    "PARENTHESIS",
    "SQUARE BRACKET",
)
# TeX's italic fonts put the pound sign in the dollar slot under the name "dollar".
_MISDRAWN = {"cmti10.ttf": {"$"}}
_RENDER = 64  # glyphs are drawn at this size, then transformed and downsampled


def font_directory() -> Path:
    import matplotlib  # only for the location of its bundled fonts

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _coverage(font_file: str) -> frozenset[str]:
    """Characters the font really draws: mapped, named as the character, with visible ink.

    Computer Modern maps TeX glyphs onto ASCII code points (cmr10's '<' is '¡'), so the glyph's
    name must match the character's Adobe Glyph List name.
    """
    from fontTools.agl import UV2AGL
    from fontTools.ttLib import TTFont

    path = font_directory() / font_file
    if not path.is_file():
        raise DataError(f"font {font_file} not found in {font_directory()}")
    cmap = TTFont(str(path), lazy=True).getBestCmap() or {}
    font = ImageFont.truetype(str(path), 40)
    covered = set()
    for code, glyph in cmap.items():
        char = chr(code)
        if not char.isprintable() or char.isspace():
            continue
        names = {UV2AGL.get(code), f"uni{code:04X}", f"u{code:04X}", f"u{code:05X}"}
        if glyph not in names or char in _MISDRAWN.get(font_file, set()):
            continue
        if font.getbbox(char)[2] - font.getbbox(char)[0] <= 1:
            continue
        covered.add(char)
    return frozenset(covered)


def _fonts_for(char: str, families: Sequence[str]) -> list[str]:
    return [f for family in families for f in FAMILIES[family] if char in _coverage(f)]


@dataclass(frozen=True)
class GlyphRenderer:
    """Renders one character in one font with seeded augmentation to uint8 (3, size, size)."""

    size: int = 32
    augment: bool = True
    # "em": glyphs sit on the font's line box, so x-height and baseline tell 'o' from 'O' (benchmark).
    # "ink": each glyph's ink is centred (how the shipped backbone's pre-training glyphs were drawn).
    placement: str = "em"
    scale_range: tuple[float, float] = (0.85, 1.05)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _font(font_file: str) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(font_directory() / font_file), int(_RENDER * 0.62))

    def render(self, char: str, font_file: str, rng: np.random.Generator) -> np.ndarray:
        font = self._font(font_file)
        aug = self.augment
        stroke = int(rng.integers(0, 3)) if aug else 0
        mask = Image.new("L", (_RENDER, _RENDER), 0)
        draw = ImageDraw.Draw(mask)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font, stroke_width=stroke)
        x = (_RENDER - (right - left)) / 2 - left
        if self.placement == "ink":
            y = (_RENDER - (bottom - top)) / 2 - top
        else:
            ascent, descent = font.getmetrics()
            y = (_RENDER - (ascent + descent)) / 2
        draw.text((x, y), char, fill=255, font=font, stroke_width=stroke)
        if aug:
            angle = float(rng.uniform(-12, 12))
            scale = float(rng.uniform(*self.scale_range))
            shear = float(rng.uniform(-0.2, 0.2))
            tx, ty = rng.uniform(-4, 4, size=2)
            mask = _affine(mask, angle, scale, shear, float(tx), float(ty))
        glyph = np.asarray(mask.resize((self.size, self.size), Image.Resampling.LANCZOS), dtype=np.float32) / 255
        if not aug:
            return np.repeat(((1 - glyph) * 255).astype(np.uint8)[None], 3, axis=0)
        return _colourise(glyph, rng, self.size)


def _affine(mask: Image.Image, angle: float, scale: float, shear: float, tx: float, ty: float) -> Image.Image:
    c = _RENDER / 2
    theta = np.deg2rad(angle)
    forward = (
        np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        @ np.array([[1, shear], [0, 1]])
        * scale
    )
    inverse = np.linalg.inv(forward)
    offset = np.array([c, c]) - inverse @ np.array([c + tx, c + ty])
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return mask.transform(mask.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def _colourise(glyph: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Foreground and background colours with enough contrast, a gradient, blur and noise."""
    background = rng.uniform(0, 1, size=3)
    foreground = rng.uniform(0, 1, size=3)
    while abs(foreground.mean() - background.mean()) < 0.35:
        foreground = rng.uniform(0, 1, size=3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    direction = rng.uniform(-0.15, 0.15, size=2)
    gradient = direction[0] * ramp[None, :] + direction[1] * ramp[:, None]
    bg = np.clip(background[:, None, None] + gradient[None], 0, 1)
    if rng.random() < 0.5:
        img = Image.fromarray((glyph * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
        glyph = np.asarray(img, dtype=np.float32) / 255
    image = bg * (1 - glyph[None]) + foreground[:, None, None] * glyph[None]
    image = image + rng.normal(0, rng.uniform(0.0, 0.06), size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _render_set(
    chars: Sequence[str],
    fonts_per_char: Sequence[Sequence[str]],
    per_class: int,
    seed: int,
    renderer: GlyphRenderer,
    classes: tuple[str, ...],
) -> ImageSet:
    images = np.empty((len(chars) * per_class, 3, renderer.size, renderer.size), dtype=np.uint8)
    labels = []
    for c, (char, fonts) in enumerate(zip(chars, fonts_per_char, strict=True)):
        rng = np.random.default_rng([seed, ord(char), c])
        for i in range(per_class):
            images[c * per_class + i] = renderer.render(char, fonts[int(rng.integers(len(fonts)))], rng)
        labels += [classes.index(char)] * per_class
    return ImageSet(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long), classes)


def make_glyph_stream(
    kind: str = "class",
    num_tasks: int = 10,
    train_per_class: int = 40,
    test_per_class: int = 20,
    seed: int = 0,
    image_size: int = 32,
    min_fonts: int = 6,
) -> list[TaskData]:
    """The offline benchmark as a task stream.

    ``kind='class'``: the 100 benchmark characters (those in at least ``min_fonts`` faces), shuffled by
    ``seed`` and split into ``num_tasks`` tasks; each image in a random face of any family.
    ``kind='domain'``: one typeface family per task, in the fixed order of ``FAMILIES`` (``num_tasks``
    ≤ 5), over the 81 characters that every face of every family draws (so no face gives a class
    away); train and test images of a task come from that family only. The seed drives the images.
    """
    renderer = GlyphRenderer(size=image_size)
    families = tuple(FAMILIES)
    if kind == "class":
        chars = [c for c in BENCHMARK_CHARACTERS if len(_fonts_for(c, families)) >= min_fonts]
        order = np.random.default_rng(seed).permutation(len(chars))
        chars = [chars[i] for i in order]
        if not 1 <= num_tasks <= len(chars):
            raise DataError(f"cannot split {len(chars)} classes into {num_tasks} tasks")
        groups = np.array_split(np.arange(len(chars)), num_tasks)
        tasks = []
        for t, group in enumerate(groups):
            task_chars = [chars[i] for i in group]
            classes = tuple(task_chars)
            fonts = [_fonts_for(c, families) for c in task_chars]
            train = _render_set(task_chars, fonts, train_per_class, seed * 7919 + 1, renderer, classes)
            test = _render_set(task_chars, fonts, test_per_class, seed * 7919 + 2, renderer, classes)
            tasks.append(TaskData(f"glyphs{t}", "class", train, test))
        return tasks
    if kind == "domain":
        if not 1 <= num_tasks <= len(families):
            raise DataError(f"the domain-incremental glyph benchmark has at most {len(families)} tasks")
        chars = [c for c in BENCHMARK_CHARACTERS if all(c in _coverage(f) for fam in families for f in FAMILIES[fam])]
        classes = tuple(chars)
        tasks = []
        for t in range(num_tasks):
            family = families[t]
            fonts = [_fonts_for(c, (family,)) for c in chars]
            train = _render_set(chars, fonts, train_per_class, seed * 7919 + 10 + t, renderer, classes)
            test = _render_set(chars, fonts, test_per_class, seed * 7919 + 20 + t, renderer, classes)
            tasks.append(TaskData(family, "domain", train, test))
        return tasks
    raise DataError(f"kind must be 'class' or 'domain', got {kind!r}")


def _looks_like(candidate: np.ndarray, references: np.ndarray, threshold: float) -> bool:
    c = candidate - candidate.mean()
    c /= np.linalg.norm(c) + 1e-8
    return bool((references @ c).max() > threshold)


def _canonical(char: str, font_file: str, size: int = 24) -> np.ndarray:
    img = GlyphRenderer(size=size, augment=False).render(char, font_file, np.random.default_rng(0))
    return 255.0 - img[0].astype(np.float32).ravel()


@functools.lru_cache(maxsize=4)
def pretraining_characters(
    count: int = 300, min_fonts: int = 6, similarity: float = 0.7, seed: int = 0
) -> tuple[str, ...]:
    """Characters for pre-training: non-Latin, drawn by ≥ ``min_fonts`` faces, unlike every benchmark class.

    Look-alikes leak labels (Cyrillic 'а' is Latin 'a'), so candidates are dropped when their
    compatibility decomposition contains a benchmark character or when their upright rendering
    correlates above ``similarity`` with a benchmark character's in any of three reference faces.
    """
    families = tuple(FAMILIES)
    benchmark = set(BENCHMARK_CHARACTERS)
    reference_fonts = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf")
    refs = []
    for font in reference_fonts:
        for char in BENCHMARK_CHARACTERS:
            if char in _coverage(font):
                r = _canonical(char, font)
                r -= r.mean()
                refs.append(r / (np.linalg.norm(r) + 1e-8))
    references = np.stack(refs)
    pool = sorted(set().union(*(_coverage(f) for family in families for f in FAMILIES[family])))
    # Spread the choice over scripts and symbol blocks instead of taking the lowest code points.
    pool = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    chosen: list[str] = []
    per_block: dict[str, int] = {}
    for char in pool:
        if char in benchmark or ord(char) < 0x250:  # Latin and Latin-1 blocks are the benchmark's domain
            continue
        if any(part in benchmark for part in unicodedata.normalize("NFKD", char)):
            continue
        if any(word in unicodedata.name(char, "") for word in _LOOKALIKE_NAMES):
            continue
        category = unicodedata.category(char)
        # Marks, separators, controls and modifier letters/symbols are tiny or invisible on their own.
        if category.startswith(("M", "Z", "C")) or category in ("Lm", "Sk"):
            continue
        fonts = _fonts_for(char, families)
        if len(fonts) < min_fonts:
            continue
        probes = [f for f in reference_fonts if f in fonts] or fonts[:1]
        if any(_looks_like(_canonical(char, f), references, similarity) for f in probes):
            continue
        block = unicodedata.name(char, "?").split()[0]
        if per_block.get(block, 0) >= max(1, count // 10):  # no single script or block dominates
            continue
        per_block[block] = per_block.get(block, 0) + 1
        chosen.append(char)
        if len(chosen) == count:
            break
    if len(chosen) < count:
        raise DataError(f"only {len(chosen)} pre-training characters pass the filters, {count} requested")
    return tuple(chosen)


class GlyphSampler:
    """Fresh augmented pre-training batches on the fly (rendering costs a few % of training)."""

    def __init__(self, characters: Sequence[str], image_size: int = 32, seed: int = 0, placement: str = "ink"):
        self.characters = tuple(characters)
        self.fonts = [_fonts_for(c, tuple(FAMILIES)) for c in self.characters]
        self.renderer = _pretraining_renderer(image_size, placement)
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.rng.integers(len(self.characters), size=batch_size)
        images = np.stack(
            [
                self.renderer.render(
                    self.characters[k], self.fonts[k][int(self.rng.integers(len(self.fonts[k])))], self.rng
                )
                for k in labels
            ]
        )
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def render_pretraining_set(characters: Sequence[str], per_class: int, seed: int, image_size: int = 32) -> ImageSet:
    """A fixed, seeded set of pre-training glyphs (for held-out accuracy)."""
    classes = tuple(characters)
    fonts = [_fonts_for(c, tuple(FAMILIES)) for c in classes]
    return _render_set(classes, fonts, per_class, seed, _pretraining_renderer(image_size, "ink"), classes)


def _pretraining_renderer(image_size: int, placement: str) -> GlyphRenderer:
    # The shipped backbone saw ink-centred glyphs scaled 0.8-1.1; keep that to reproduce it.
    return GlyphRenderer(size=image_size, placement=placement, scale_range=(0.8, 1.1))
