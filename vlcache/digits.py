"""The `digits` visual question-answering task: scenes of real handwritten digits.

A scene is a 4 × 4 grid of cells, each holding one 8 × 8 image from scikit-learn's handwritten
digits (real scans, bundled with scikit-learn, offline), upscaled to 16 × 16: a 64 × 64 RGB image,
which a patch-4 vision tower turns into 256 visual tokens. Questions depend on

* one region — ``what is at row 2 col 3 ?`` → ``7``;
* several regions — ``how many 3 ?`` → ``2``;
* a relation between two regions — ``is row 0 col 1 larger than row 3 col 2 ?`` → ``yes``.

Rows and columns count from 0, top-left. Everything is deterministic from ``(split, seed, index)``.
The digit images are split once (fixed permutation) into train / val / test pools of 70 / 15 / 15 %
that never share an image, whatever the seed.

A neutral module (numpy and Pillow; scikit-learn loads the digit images on first use): the eval
harness, ``vlcache-bench`` (its default requests) and ``vlcache-generate`` (``--image digits:N``) all
take their scenes from here.

Prompts end with ``?``; a model answers ``= <answer>``. The ``=`` is generated from the prefill
logits; the answer token itself is decoded from the (compressed) cache, so compression shows in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from vlcache.tokens import IMAGE_TOKEN_TEXT

GRID = 4
CELL = 16
IMAGE_SIZE = GRID * CELL
SPLITS = ("train", "val", "test")
KINDS = ("lookup", "count", "compare")
DEFAULT_MIX = {"lookup": 0.6, "count": 0.2, "compare": 0.2}
ANSWER_PREFIX = "="
_SPLIT_SEED = 20241030
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class Sample:
    """One question about one scene.

    Attributes:
        image: 64 × 64 RGB scene.
        question: the prompt text after the image (ends with ``?``).
        answers: accepted answers (exact match after normalisation).
        kind: ``lookup``, ``count`` or ``compare``.
        grid: (4, 4) digits of the scene; cells: the (row, col) cells the answer depends on.
    """

    image: Image.Image
    question: str
    answers: tuple[str, ...]
    kind: str
    grid: np.ndarray = field(repr=False)
    cells: tuple[tuple[int, int], ...] = ()


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits scenes need scikit-learn's digit images: pip install scikit-learn (or 'vlcache[eval]')"
        ) from None

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=3)
def split_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's digits that belong to ``split`` (fixed, disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    n = len(_digits()[1])
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    a, b = int(0.7 * n), int(0.85 * n)
    return np.sort({"train": perm[:a], "val": perm[a:b], "test": perm[b:]}[split])


def render(images: np.ndarray) -> Image.Image:
    """(16, 8, 8) digit images in [0, 16], row-major cells -> 64 × 64 RGB scene (ink white on black)."""
    cells = np.kron(images.reshape(GRID, GRID, 8, 8), np.ones((2, 2), dtype=np.float32))  # 16 × 16 each
    canvas = cells.transpose(0, 2, 1, 3).reshape(IMAGE_SIZE, IMAGE_SIZE)
    gray = np.clip(canvas * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")


def cell_of_patch(patch_index: int, patch_size: int = 4) -> tuple[int, int]:
    """(row, col) of the grid cell that row-major patch ``patch_index`` lies in."""
    per_row = IMAGE_SIZE // patch_size
    r, c = divmod(patch_index, per_row)
    return r * patch_size // CELL, c * patch_size // CELL


class DigitScenes:
    """Deterministic stream of :class:`Sample` for one split.

    Args:
        split: ``train``, ``val`` or ``test``.
        seed: changes the scenes and questions, not the split's digit pool.
        mix: probability of each question kind.
    """

    def __init__(self, split: str = "test", seed: int = 0, mix: dict[str, float] | None = None) -> None:
        self.split = split
        self.seed = int(seed)
        self.pool = split_indices(split)
        mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(mix) - set(KINDS)
        if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix must weight some of {KINDS}, got {mix}")
        total = sum(mix.values())
        self.kinds = [k for k in KINDS if mix.get(k, 0) > 0]
        self.probs = [mix[k] / total for k in self.kinds]

    def _rng(self, index: int, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split] + index, salt])

    def scene(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The ``index``-th scene: its image and (4, 4) grid of digit labels."""
        images, labels = _digits()
        chosen = self._rng(index).choice(self.pool, size=GRID * GRID, replace=False)
        return render(images[chosen]), labels[chosen].reshape(GRID, GRID)

    def sample(self, index: int, kind: str | None = None, salt: int = 1) -> Sample:
        """The question number ``salt`` about scene ``index`` (same scene for every salt)."""
        image, grid = self.scene(index)
        rng = self._rng(index, salt)
        kind = kind or str(rng.choice(self.kinds, p=self.probs))
        return make_question(image, grid, kind, rng)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index)

    def take(self, n: int, start: int = 0) -> Iterator[Sample]:
        for i in range(start, start + n):
            yield self.sample(i)

    def followup(self, index: int) -> tuple[Sample, Sample]:
        """Two different questions about the same scene (the second about other cells)."""
        first = self.sample(index, salt=1)
        for salt in range(2, 50):
            second = self.sample(index, salt=salt)
            if second.question != first.question and not set(second.cells) & set(first.cells):
                return first, second
        return first, self.sample(index, salt=2)  # pragma: no cover - 16 cells always leave room


def make_question(image: Image.Image, grid: np.ndarray, kind: str, rng: np.random.Generator) -> Sample:
    if kind == "lookup":
        r, c = (int(x) for x in rng.integers(0, GRID, size=2))
        return Sample(image, f"what is at row {r} col {c} ?", (str(int(grid[r, c])),), kind, grid, ((r, c),))
    if kind == "count":
        # Mostly digits that are present, so counts of 1-3 dominate rather than 0.
        digit = int(rng.choice(grid.flatten())) if rng.random() < 0.8 else int(rng.integers(0, 10))
        cells = tuple((int(r), int(c)) for r, c in zip(*np.nonzero(grid == digit)))
        return Sample(image, f"how many {digit} ?", (str(len(cells)),), kind, grid, cells)
    if kind == "compare":
        while True:
            r1, c1, r2, c2 = (int(x) for x in rng.integers(0, GRID, size=4))
            if grid[r1, c1] != grid[r2, c2]:
                break
        answer = "yes" if grid[r1, c1] > grid[r2, c2] else "no"
        q = f"is row {r1} col {c1} larger than row {r2} col {c2} ?"
        return Sample(image, q, (answer,), kind, grid, ((r1, c1), (r2, c2)))
    raise ValueError(f"unknown question kind {kind!r}; choose from {', '.join(KINDS)}")


def vocabulary() -> list[str]:
    """Every word the task's prompts and answers use (for the bundled model's word-level tokenizer)."""
    words = ["what", "is", "at", "row", "col", "how", "many", "larger", "than", "?", ANSWER_PREFIX, "yes", "no"]
    return words + [str(i) for i in range(GRID * GRID + 1)]


def format_prompt(question: str, image_token: str = IMAGE_TOKEN_TEXT) -> str:
    """The text a processor receives for one sample: the image placeholder, then the question (what
    :func:`vlcache.hf.inputs.image_prompt` gives for a processor without a chat template)."""
    return f"{image_token} {question}"


def parse_answer(generated: str) -> str:
    """The answer in a generation ``= 7 ...``: the first word after ``=`` (or the first word)."""
    words = generated.replace(ANSWER_PREFIX, f" {ANSWER_PREFIX} ").split()
    if ANSWER_PREFIX in words:
        words = words[words.index(ANSWER_PREFIX) + 1 :]
    return words[0] if words else ""
