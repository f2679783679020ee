"""Samples of an evaluation task: the synthetic `digits` task, the text task `passkey`, or a local
JSONL file.

Contract:
* :func:`load_task` returns a :class:`Task` holding the first ``n`` samples (all of a JSONL file
  when ``n`` is None), each with its question, reference answers, question kind and metric.
* `digits` (:class:`vlcache.digits.DigitScenes`): prompt ``<image> question``, scored by exact
  match on :func:`vlcache.digits.parse_answer`; with ``followup`` every sample carries a second
  question about the same scene (``DigitScenes.followup``).
* `passkey` (:class:`vlcache.eval.passkey.PassKeyTask`, text only): each sample carries a
  ``context`` (filler with the pass key inside) and the question; scored by exact match on
  :func:`vlcache.eval.passkey.parse_answer`; kinds are the needle's depth quartiles. Needs a text model.
* JSONL: one object a line, ``{"image": path, "question": str, "answers": [str, ...]}`` plus the
  optional ``"metric"`` (``vqa``, ``anls`` or ``exact``; the file-wide default otherwise) and
  ``"kind"`` (a label to group accuracy by). Relative image paths are resolved against the file's
  folder. Blank lines are skipped; other keys are ignored. Images are opened (header only) at load
  time and decoded when evaluated. Any problem raises :class:`~vlcache.errors.UserError` naming the
  file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlcache.errors import UserError
from vlcache.eval.metrics import METRICS

DEFAULT_DIGITS_SAMPLES = 100
DEFAULT_PASSKEY_SAMPLES = 50
#: prompt styles of text-only tasks (the others put an image in the prompt)
TEXT_STYLES = ("passkey",)


@dataclass(frozen=True)
class EvalSample:
    """One question about one image (or, for a text task, about a text context).

    Attributes:
        index: position in the task (digits, passkey: the sample index; JSONL: the 1-based line number).
        question: the text after the image (after the context).
        answers: reference answers.
        kind: label to group accuracy by (digits: lookup / count / compare; passkey: the needle's
            depth quartile; JSONL: "kind" or "all").
        metric: one of :data:`vlcache.eval.metrics.METRICS`.
        image: the image when held in memory (digits); image_path: where to read it from (JSONL).
        followup: a second question about the same image (follow-up mode), or None.
        context: a text task's context, the text the question is about (None for image tasks).
    """

    index: int
    question: str
    answers: tuple[str, ...]
    kind: str = "all"
    metric: str = "exact"
    image: Image.Image | None = None
    image_path: Path | None = None
    followup: EvalSample | None = None
    context: str | None = None

    def load_image(self) -> Image.Image:
        """The sample's image as RGB."""
        if self.image is not None:
            return self.image
        if self.image_path is None:
            raise ValueError(f"sample {self.index} has no image")
        with Image.open(self.image_path) as im:
            return im.convert("RGB")


@dataclass(frozen=True)
class Task:
    """Samples plus how to prompt and read answers.

    Attributes:
        name: ``digits``, ``passkey`` or the JSONL path.
        samples: the samples, in order.
        prompt_style: ``digits`` (``<image> question``, answers parsed after ``=``), ``chat`` (the
            processor's chat template when it has one, else ``<image>\\n question``; the whole
            generated text is the answer) or ``passkey`` (text only: instruction, context and
            question in the tokenizer's chat template, answer prefix, first digits parsed).
        max_new_tokens: tokens generated per answer unless the command line says otherwise.
    """

    name: str
    samples: list[EvalSample]
    prompt_style: str
    max_new_tokens: int = 4

    @property
    def text_only(self) -> bool:
        """True for a task without images (it needs a text-only causal LM)."""
        return self.prompt_style in TEXT_STYLES


def load_digits(n: int, split: str = "test", seed: int = 0, followup: bool = False) -> Task:
    """The first ``n`` samples of ``DigitScenes(split, seed)`` (follow-up pairs when ``followup``)."""
    from vlcache.digits import DigitScenes

    scenes = DigitScenes(split, seed)
    samples = []
    for i in range(n):
        if followup:
            first, second = scenes.followup(i)
            nxt = EvalSample(i, second.question, tuple(second.answers), second.kind, "exact")
        else:
            first, nxt = scenes.sample(i), None
        samples.append(EvalSample(i, first.question, tuple(first.answers), first.kind, "exact", first.image, None, nxt))
    return Task("digits", samples, "digits")


def load_passkey(n: int, seed: int = 0) -> Task:
    """The first ``n`` samples of ``PassKeyTask(seed)``."""
    from vlcache.eval.passkey import MAX_NEW_TOKENS, PassKeyTask

    task = PassKeyTask(seed)
    samples = []
    for i in range(n):
        s = task.sample(i)
        samples.append(EvalSample(i, s.question, (s.answer,), s.kind, "exact", context=s.context))
    return Task("passkey", samples, "passkey", MAX_NEW_TOKENS)


def _line_error(path: Path, lineno: int, message: str) -> UserError:
    return UserError(f"{path} line {lineno}: {message}")


def _parse_line(path: Path, lineno: int, line: str, default_metric: str) -> EvalSample:
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        raise _line_error(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _line_error(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("image", "question"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise _line_error(path, lineno, f"{key!r} must be a non-empty string")
    answers = obj.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise _line_error(path, lineno, "'answers' must be a non-empty list of strings")
    metric = obj.get("metric", default_metric)
    if metric not in METRICS:
        raise _line_error(path, lineno, f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    kind = obj.get("kind", "all")
    if not isinstance(kind, str) or not kind:
        raise _line_error(path, lineno, "'kind' must be a non-empty string")
    image_path = Path(obj["image"]).expanduser()
    if not image_path.is_absolute():
        image_path = path.parent / image_path
    if not image_path.is_file():
        raise _line_error(path, lineno, f"image file not found: {image_path}")
    try:
        with Image.open(image_path):
            pass
    except (OSError, ValueError) as e:
        raise _line_error(path, lineno, f"cannot read image {image_path}: {e}") from None
    return EvalSample(lineno, obj["question"], tuple(answers), kind, metric, None, image_path)


def load_jsonl(path: Path | str, n: int | None = None, metric: str = "vqa") -> Task:
    """The first ``n`` samples (all when None) of a JSONL file; errors name the line."""
    path = Path(path)
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    samples: list[EvalSample] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if n is not None and len(samples) >= n:
                    break
                if line.strip():
                    samples.append(_parse_line(path, lineno, line, metric))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not samples:
        raise UserError(f"{path} holds no samples")
    if n is not None and len(samples) < n:
        raise UserError(f"{path} holds {len(samples)} samples, fewer than the {n} asked for (--samples)")
    return Task(str(path), samples, "chat")


def load_task(
    task: str,
    n: int | None = None,
    *,
    split: str = "test",
    seed: int = 0,
    metric: str | None = None,
    followup: bool = False,
) -> Task:
    """``digits`` or a JSONL path -> :class:`Task`; see the module docstring for the rules."""
    if n is not None and n < 1:
        raise UserError(f"--samples must be >= 1, got {n}")
    if task in ("digits", "passkey") and metric not in (None, "exact"):
        raise UserError(f"--metric applies to JSONL tasks; {task} is scored by exact match")
    if task == "digits":
        return load_digits(DEFAULT_DIGITS_SAMPLES if n is None else n, split, seed, followup)
    if followup:
        what = "passkey" if task == "passkey" else "JSONL"
        raise UserError(f"--followup needs --task digits ({what} samples have a single question)")
    if task == "passkey":
        return load_passkey(DEFAULT_PASSKEY_SAMPLES if n is None else n, seed)
    path = Path(task).expanduser()
    if path.suffix != ".jsonl" and not path.is_file():
        raise UserError(f"unknown task {task!r}: use 'digits', 'passkey' or the path of a .jsonl file")
    return load_jsonl(path, n, metric or "vqa")
