"""The `passkey` text task: a five-digit pass key hidden in 1–2k tokens of filler, asked for at the end.

A sample is a *context* — filler sentences built from fixed word lists (varied, natural-ish, no
digits, nothing downloaded) with one needle sentence ``The pass key is 48213. Remember it. 48213 is
the pass key.`` at a random depth — and the question ``What is the pass key?``. The prompt is the
:data:`INSTRUCTION`, the context and the question (in that order, in the tokenizer's chat template
when it has one), then the answer prefix ``The pass key is``; the answer is scored by exact match on
its first run of digits (:func:`parse_answer`; :data:`MAX_NEW_TOKENS` covers the space, five digits
and the token after them). The instruction is the classic pass-key prompt's (Mohtashami & Jaggi,
"Landmark Attention", arXiv:2305.16300): without it SmolLM2-135M-Instruct answered 3 of 7 trial
samples with words from the filler, on the full cache. Filler length is drawn per sample
(:data:`SENTENCES`): prompts of 1,040–1,700 tokens (mean 1,340) with SmolLM2's tokenizer and chat
template. Samples are grouped by the needle's depth in the context (quartiles: ``depth0-25`` …
``depth75-100``).

Everything is deterministic from ``(seed, index)`` and independent of any tokenizer: the prompt is
text; :func:`vlcache.eval.runner.encode_text_prompt` tokenises it and finds the context's token span,
which compression methods treat as the span a question is asked about (the image's role in a VLM
prompt), so VL-Cache's query window is the trailing question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
MAX_NEW_TOKENS = 7
#: filler sentences per sample, drawn uniformly in [low, high]
SENTENCES = (80, 130)
KEY_DIGITS = 5
DEPTH_BINS = ("depth0-25", "depth25-50", "depth50-75", "depth75-100")
_SEED_SALT = 20_250_704

_NAMES = (
    "Anna", "Boris", "Clara", "Daniel", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin",
    "Leo", "Marta", "Nils", "Olga", "Paul", "Rosa", "Simon", "Tara", "Victor",
)  # fmt: skip
_NOUNS = (
    "river", "garden", "library", "market", "bridge", "kitchen", "forest", "harbour", "village", "window",
    "lantern", "orchard", "meadow", "workshop", "station", "mountain", "courtyard", "bakery", "museum", "valley",
)  # fmt: skip
_THINGS = (
    "a basket of apples", "an old map", "a blue umbrella", "a wooden chair", "a letter", "a small boat",
    "a bunch of flowers", "a warm loaf of bread", "a heavy coat", "a pair of boots", "a paper kite",
    "a clay pot", "a silver spoon", "a woollen scarf", "a jar of honey", "a green notebook",
)  # fmt: skip
_ADJECTIVES = (
    "quiet", "busy", "bright", "narrow", "cold", "warm", "crowded", "peaceful", "windy", "green", "old",
    "tidy", "dusty", "sunny", "grey", "wide",
)  # fmt: skip
_TIMES = (
    "In the morning", "Later that day", "Every autumn", "On most evenings", "Before the rain",
    "After lunch", "During the winter", "Early in spring", "At dusk", "Once a week",
)  # fmt: skip
_VERBS = (
    "walked to", "looked at", "painted", "cleaned", "visited", "talked about", "dreamed of", "wrote about",
    "sketched", "passed by",
)  # fmt: skip
_WEATHER = (
    "the wind was soft", "the clouds moved slowly", "the air smelled of rain", "the sun was low",
    "the birds were singing", "the leaves were turning yellow", "the snow had melted", "the sky was clear",
)  # fmt: skip


_TEMPLATES = (
    "{time}, {name} {verb} the {adjective} {noun}.",
    "The {noun} near the {noun} was {adjective}, and {weather}.",
    "{name} carried {thing} across the {noun}.",
    "{name} told {name} that {weather}.",
    "Nobody remembered why the {noun} had {thing} in it.",
    "{time}, the {noun} felt {adjective} and {weather}.",
)
_SLOTS = {
    "name": _NAMES,
    "noun": _NOUNS,
    "thing": _THINGS,
    "adjective": _ADJECTIVES,
    "time": _TIMES,
    "verb": _VERBS,
    "weather": _WEATHER,
}
_SLOT = re.compile(r"\{(\w+)\}")


def _filler_sentence(rng: np.random.Generator) -> str:
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return _SLOT.sub(lambda m: _SLOTS[m.group(1)][int(rng.integers(len(_SLOTS[m.group(1)])))], template)


def needle_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass(frozen=True)
class PassKeySample:
    """One pass-key question.

    Attributes:
        context: the filler with the needle sentence inside (no digits other than the key's).
        question: :data:`QUESTION`. answer: the key (five digits, no leading zero).
        depth: the needle's position among the context's sentences, in [0, 1].
        kind: the depth quartile (one of :data:`DEPTH_BINS`).
    """

    context: str
    question: str
    answer: str
    depth: float
    kind: str


class PassKeyTask:
    """Deterministic stream of :class:`PassKeySample`: sample ``i`` depends only on ``(seed, i)``."""

    def __init__(self, seed: int = 0, sentences: tuple[int, int] = SENTENCES) -> None:
        low, high = sentences
        if not 1 <= low <= high:
            raise ValueError(f"sentences must be 1 <= low <= high, got {sentences}")
        self.seed = int(seed)
        self.sentences = (int(low), int(high))

    def sample(self, index: int) -> PassKeySample:
        rng = np.random.default_rng([_SEED_SALT, self.seed, index])
        n = int(rng.integers(self.sentences[0], self.sentences[1] + 1))
        key = str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)))
        slot = int(rng.integers(n + 1))  # the needle goes before filler sentence `slot`
        filler = [_filler_sentence(rng) for _ in range(n)]
        sentences = filler[:slot] + [needle_sentence(key)] + filler[slot:]
        depth = slot / n
        kind = DEPTH_BINS[min(int(depth * len(DEPTH_BINS)), len(DEPTH_BINS) - 1)]
        return PassKeySample(" ".join(sentences), QUESTION, key, depth, kind)

    def __getitem__(self, index: int) -> PassKeySample:
        return self.sample(index)


_DIGITS = re.compile(r"\d+")


def parse_answer(text: str) -> str:
    """The first run of digits in a generation ('' when there is none)."""
    match = _DIGITS.search(text)
    return match.group(0) if match else ""


def vocabulary() -> list[str]:
    """Every word and punctuation mark of the task's prompts, then the ten digits (a key's characters):
    the vocabulary of a word-level tokenizer for tiny test models."""
    texts = [INSTRUCTION, QUESTION, ANSWER_PREFIX, needle_sentence("0")]
    texts += [_SLOT.sub(" ", t) for t in _TEMPLATES]
    texts += [w for words in _SLOTS.values() for w in words]
    found = re.findall(r"[^\W\d]+|[^\w\s]", " ".join(texts))
    return sorted(set(found)) + [str(d) for d in range(10)]
