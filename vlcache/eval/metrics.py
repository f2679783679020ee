"""Answer scoring: exact match, VQA accuracy and ANLS. Pure Python; every score lies in [0, 1].

* ``exact``: 1 when the prediction equals one of the answers after collapsing whitespace and
  case-folding, else 0. (The `digits` task scores the word its parser extracts this way.)
* ``vqa``: the VQA evaluation's accuracy (Antol et al. 2015; the official ``vqaEval.py``).
  Prediction and answers are normalised alike — punctuation handled as the official script does
  (removed, or replaced by a space when not adjacent to a space; a period is kept inside numbers),
  lowercased, number words ``zero … ten`` (and ``none``) turned into digits, articles ``a an the``
  dropped, apostrophe-less contractions restored (``dont`` → ``don't``). Then, with n reference
  answers:

  - n ≥ 4: the official leave-one-out average — for each reference i, ``min(1, #matches among the
    other n − 1 / 3)``, averaged over i (with the usual 10 answers, exactly the official number);
  - n < 4: too few annotators for the 3-vote rule; 1 when the prediction matches any reference,
    else 0 (exact match after VQA normalisation).
* ``anls``: Average Normalised Levenshtein Similarity (Biten et al. 2019, ST-VQA / DocVQA) for one
  question: ``max_a (1 − NL(a, pred))`` where ``NL = lev / max(len)``, counted as 0 when NL ≥ 0.5.
  Strings are compared stripped, whitespace-collapsed and lowercased.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

METRICS = ("exact", "vqa", "anls")
ANLS_THRESHOLD = 0.5

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official script's punctuation list (the apostrophe is handled by the contractions, "." below).
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # what the official (buggy-lookbehind) regex does: "." not before a digit
# The official contraction table (apostrophe-less form -> canonical form).
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in (
        "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
        "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
        "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
        "howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd "
        "itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't "
        "mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've "
        "neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at "
        "'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've "
        "shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
        "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's "
        "someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll "
        "someones:someone's somethingd:something'd somethingd've:something'd've "
        "something'dve:something'd've somethingll:something'll thats:that's thered:there'd "
        "thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd "
        "theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas "
        "wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're "
        "whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd "
        "whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're "
        "whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
        "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
        "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've "
        "youll:you'll youre:you're youve:you've"
    ).split()
)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when ``prediction`` equals an answer (whitespace collapsed, case-folded), else 0.0."""
    pred = _collapse(prediction).casefold()
    return float(any(pred == _collapse(a).casefold() for a in answers))


def normalize_vqa(text: str) -> str:
    """The VQA evaluation's answer normalisation (punctuation, case, numbers, articles, contractions)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    strip_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        if strip_all or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its reference answers (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(a) for a in answers]
    if len(refs) < 4:
        return float(pred in refs)
    matches = [r == pred for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(refs)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction: the best ``1 − NL`` over the answers, 0 where ``NL ≥ threshold``."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = _collapse(prediction).lower()
    best = 0.0
    for answer in answers:
        ref = _collapse(answer).lower()
        longest = max(len(ref), len(pred))
        nl = levenshtein(ref, pred) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


_SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact": exact_match,
    "vqa": vqa_accuracy,
    "anls": anls,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score ``prediction`` with the named metric (one of :data:`METRICS`)."""
    try:
        scorer = _SCORERS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}") from None
    return scorer(prediction, answers)
