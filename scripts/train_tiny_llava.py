"""Train `llava-tiny`: a real LlavaForConditionalGeneration on the `digits` task, on a CPU.

Recipe (deterministic from --seed):
1. Vision pretraining: the CLIP tower (patch 4 on 64 × 64 → 256 tokens) learns, on *every* patch
   token, the digit in its cell and the cell's row and column (linear heads, discarded afterwards).
   This gives image features that differ between images and carry their location, and whichever of
   a cell's tokens the language model reads holds the digit. ``--steps 0`` stops after this stage
   and saves a checkpoint; ``--vision-from CKPT`` reuses its tower.
2. Instruction tuning (tower frozen, its features cached for a pool of training scenes): projector
   and language model learn to answer ``<image> question ?`` with ``= answer </s>``; loss on the
   answer tokens only. Lookup questions first, then count and compare mixed in. Trained end to end
   this sits at the answer prior for thousands of steps: the lookup needs a two-hop circuit
   (gather row and column into the answer position, then attend to that cell among 256 tokens).
   Training-only aids (linear probes and losses discarded after training) teach the circuit one
   piece at a time, on lookup and compare questions (count too with ``--count-aid``):
   * ``--gather-loss``: a linear probe must read the named cells' rows and columns from the
     residual stream at the answer position entering layer ``--route-layer`` (first hop; with
     ``--count-aid`` also the digit a count question asks about);
   * ``--route-loss``: -log of that layer's attention mass from the answer position on the named
     cell (second hop; half the heads on a compare question's first cell, half on its second);
     with ``--count-aid``, a count question's attention is pulled towards the matching cells' tokens
     plus the first token weighted as one cell, so the sink's share, 1 / (1 + count), says how many;
   * ``--readout-loss``: a linear probe must read the named cells' digits (and the count) from the
     residual stream leaving that layer: what the routed heads looked at must reach the output.
   All act at the position that *generates* the answer, which no compression method observes at
   prefill; they hold for ``--route-hold`` steps, then fade to 0 by ``--route-steps``. With the
   first two, routing forms in ~300 steps and the digit readout ~200 steps later (run J, 73%);
   the readout probe makes lookup reach 0.97 by step 500, and with ``--count-aid`` count rises
   from its prior to 0.71 (run L, 86%).
   Tried and not kept (docs/fidelity.md): distractor fading (``--isolate-steps``), a short image
   of 16 cell-mean tokens (``--pooled-until``), single-axis questions (``--axis-questions``), and
   the routing loss without the gather probe; continuing the shipped run for 1,500 more steps
   (``--init-from``, run N) gained 1.1 points and was not kept.
3. Validation accuracy (greedy, full cache) on the val split; the checkpoint, tokenizer and
   processor are saved in standard HF format (safetensors) to --out, with training_log.json.

The model's format (word-level tokenizer, processor, configs before training) is
:mod:`vlcache.hf.tiny`'s ``bundled_processor`` / ``bundled_llava``, which tests and benchmarks use too.

The two bundled models (docs/fidelity.md has their training curves). ``llava-tiny-late`` (run L:
6 min of stage 1 and 37 min of stage 2 on 2 idle cores) has the aids at the answer position, so its
question tokens never look at the image:

    .venv/bin/python scripts/train_tiny_llava.py --out /tmp/vision --steps 0 --threads 2 \
        --vision-steps 800 --vision-cosine --vision-weight-decay 0.05
    .venv/bin/python scripts/train_tiny_llava.py --out vlcache/models/llava-tiny-late --vision-from /tmp/vision \
        --threads 2 --steps 3000 --lookup-only-steps 700 --constant-frac 0.4 --route-loss 1.0 \
        --gather-loss 1.0 --readout-loss 1.0 --count-aid --route-hold 1800 --route-steps 2400 \
        --route-layer 2 --eval-every 250

``llava-tiny`` (run Q, the default model) reuses that tower and has the aids at the question's last
token ``?`` (``--aid-at prompt``), on follow-up pairs too (``--pair-aids``): its question reads the
asked cells at prefill, like a real VLM's (the premise of prompt-attention scorers). A long run can
be stopped and continued with ``--resume`` (same flags; OUT/checkpoint holds the optimiser state):

    .venv/bin/python scripts/train_tiny_llava.py --out vlcache/models/llava-tiny \
        --vision-from vlcache/models/llava-tiny-late --threads 2 --steps 2500 --lookup-only-steps 700 \
        --constant-frac 0.4 --route-loss 1.0 --gather-loss 1.0 --readout-loss 1.0 --count-aid \
        --route-hold 1500 --route-steps 2000 --route-layer 2 --eval-every 250 --aid-at prompt --pair-aids
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from vlcache.digits import ANSWER_PREFIX, CELL, IMAGE_SIZE, DigitScenes, cell_of_patch, format_prompt, vocabulary
from vlcache.hf.tiny import PATCH, bundled_llava, bundled_processor


def pixels(images) -> torch.Tensor:
    """PIL 64 × 64 RGB -> (B, 3, 64, 64) normalised like the processor (mean 0.5, std 0.5)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy((arr - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


PATCH_CELLS = torch.tensor([cell_of_patch(i, PATCH) for i in range((IMAGE_SIZE // PATCH) ** 2)])  # (256, 2)


def cell_means(feats: torch.Tensor) -> torch.Tensor:
    """(B, 256, H) row-major patch features -> (B, 4, 4, H) mean over each cell's 4 × 4 patches."""
    b, _, h = feats.shape
    side = IMAGE_SIZE // PATCH
    per = side // 4
    return feats.reshape(b, 4, per, 4, per, h).mean(dim=(2, 4))


def shift_cells(px: torch.Tensor, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Augmentation for vision pretraining: each cell's content rolled by up to ``max_shift`` pixels
    in each direction (the digits' borders are blank), so the tower learns digits rather than the
    1,257 training images' exact pixels. px: (B, 3, 64, 64) -> same shape."""
    b = px.shape[0]
    cells = px.reshape(b, 3, 4, CELL, 4, CELL).clone()
    shifts = rng.integers(-max_shift, max_shift + 1, size=(b, 4, 4, 2))
    for i in range(b):
        for r in range(4):
            for c in range(4):
                dy, dx = (int(x) for x in shifts[i, r, c])
                cells[i, :, r, :, c, :] = torch.roll(cells[i, :, r, :, c, :], shifts=(dy, dx), dims=(1, 2))
    return cells.reshape_as(px)


def pretrain_vision(model, args, log):
    tower = model.model.vision_tower
    hidden = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict(
        {"digit": torch.nn.Linear(hidden, 10), "row": torch.nn.Linear(hidden, 4), "col": torch.nn.Linear(hidden, 4)}
    )
    opt = torch.optim.AdamW(
        list(tower.parameters()) + list(heads.parameters()), lr=args.vision_lr, weight_decay=args.vision_weight_decay
    )
    # optional cosine decay to 5% (--vision-cosine); the shipped tower used a constant rate
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, args.vision_steps))))
            if args.vision_cosine
            else 1.0
        ),
    )
    scenes = DigitScenes("train", seed=args.seed)
    aug = np.random.default_rng([args.seed, 7])
    rows, cols = PATCH_CELLS[:, 0], PATCH_CELLS[:, 1]
    bar = tqdm(range(args.vision_steps), desc="vision pretraining", mininterval=5)
    for step in bar:
        idx = range(step * args.batch, (step + 1) * args.batch)
        batch = [scenes.scene(i) for i in idx]
        px = pixels([b[0] for b in batch])
        if args.vision_shift:
            px = shift_cells(px, args.vision_shift, aug)
        grid = torch.from_numpy(np.stack([b[1] for b in batch]))  # (B, 4, 4)
        feats = tower(px, output_hidden_states=True).hidden_states[-1][:, 1:]  # (B, 256, H), CLS dropped
        # Every patch token on its own carries its cell's digit, row and column: whichever of a
        # cell's tokens the language model attends to, the value it reads holds the digit.
        cell_feats = cell_means(feats)  # (B, 4, 4, H)
        patch_digits = grid[:, rows, cols]  # (B, 256)
        loss = (
            F.cross_entropy(heads["digit"](feats).flatten(0, 1), patch_digits.flatten())
            + F.cross_entropy(heads["row"](feats).flatten(0, 1), rows.repeat(len(batch)))
            + F.cross_entropy(heads["col"](feats).flatten(0, 1), cols.repeat(len(batch)))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            with torch.no_grad():
                acc = float((heads["digit"](cell_feats).argmax(-1) == grid).float().mean())
                acc_patch = float((heads["digit"](feats).argmax(-1) == patch_digits).float().mean())
            bar.set_postfix(loss=f"{loss.item():.3f}", cell_acc=f"{acc:.3f}", patch_acc=f"{acc_patch:.3f}")
            log.append({"stage": "vision", "step": step, "loss": loss.item(), "train_cell_digit_acc": acc})
    # held-out check on val digits
    val = DigitScenes("val", seed=args.seed)
    with torch.no_grad():
        batch = [val.scene(i) for i in range(64)]
        feats = tower(pixels([b[0] for b in batch]), output_hidden_states=True).hidden_states[-1][:, 1:]
        grid = torch.from_numpy(np.stack([b[1] for b in batch]))
        cell_acc = float((heads["digit"](cell_means(feats)).argmax(-1) == grid).float().mean())
        patch_acc = float((heads["digit"](feats).argmax(-1) == grid[:, rows, cols]).float().mean())
    log.append({"stage": "vision", "val_cell_digit_acc": cell_acc, "val_patch_digit_acc": patch_acc})
    print(f"vision pretraining: held-out digit accuracy per cell {cell_acc:.3f}, per patch token {patch_acc:.3f}")
    return cell_acc


def encode_batch(items, tokenizer, image_token_id, n_image):
    """Token ids ``<s> <image>*256 Q ? = A </s>``; a pair of samples on one scene continues with
    ``Q2 ? = A2 </s>`` (the follow-up format). Labels on the ``= A </s>`` tokens only."""
    seqs, labels = [], []
    for item in items:
        first, *rest = item if isinstance(item, tuple) else (item,)
        prompt = tokenizer(format_prompt(first.question))["input_ids"]
        img_pos = prompt.index(image_token_id)
        ids = prompt[:img_pos] + [image_token_id] * n_image + prompt[img_pos + 1 :]
        lab = [-100] * len(ids)
        for k, s in enumerate([first, *rest]):
            if k:
                q = tokenizer(s.question, add_special_tokens=False)["input_ids"]
                ids, lab = ids + q, lab + [-100] * len(q)
            answer = tokenizer(f"{ANSWER_PREFIX} {s.answers[0]}", add_special_tokens=False)["input_ids"]
            answer = answer + [tokenizer.eos_token_id]
            ids, lab = ids + answer, lab + answer
        seqs.append(ids)
        labels.append(lab)
    width = max(len(x) for x in seqs)
    pad = tokenizer.pad_token_id
    ids_t = torch.tensor([x + [pad] * (width - len(x)) for x in seqs])
    lab_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
    return ids_t, mask, lab_t


@torch.no_grad()
def vision_features(model, images, batch: int = 64) -> torch.Tensor:
    """(N, 256, H_vision) the tower's features as LLaVA selects them (layer -1, CLS dropped)."""
    out = []
    for i in range(0, len(images), batch):
        hs = model.model.vision_tower(pixels(images[i : i + batch]), output_hidden_states=True).hidden_states
        out.append(hs[model.config.vision_feature_layer][:, 1:].clone())
    return torch.cat(out)


def embed_with_features(model, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """What LlavaForConditionalGeneration does with pixel_values, from cached tower features:
    token embeddings with the image placeholders replaced by the projected features."""
    embeds = model.get_input_embeddings()(ids)
    projected = model.model.multi_modal_projector(feats)  # (B, 256, hidden)
    mask = (ids == model.config.image_token_index).unsqueeze(-1)
    return embeds.masked_scatter(mask, projected.to(embeds.dtype))


def fade_distractors(feats, blank, batch, progress: float, gen) -> torch.Tensor:
    """Lookup scenes with the cells not asked about blended towards an empty scene's features:
    ``blank + λ · (scene − blank)``, λ ~ U(0, progress) per sample. Early on the answer is readable
    from any attention pattern, so the readout forms first and then pulls the routing along."""
    feats = feats.clone()
    lam = torch.rand(len(batch), generator=gen) * progress
    for k, item in enumerate(batch):
        sample = item[0] if isinstance(item, tuple) else item
        if sample.kind != "lookup":
            continue
        other = ~(PATCH_CELLS == torch.tensor(sample.cells[0])).all(-1)  # (256,) patches outside the cell
        feats[k, other] = blank[0, other] + lam[k] * (feats[k, other] - blank[0, other])
    return feats


def axis_question(sample, rng: np.random.Generator):
    """Training-only question that teaches position one axis at a time: a lookup on cell (r, c)
    becomes ``what is at row r ?`` about a scene whose only visible column is c (or ``what is at col
    c ?`` with only row r visible). Returns the sample and the (256,) patches that stay visible."""
    r, c = sample.cells[0]
    if rng.random() < 0.5:
        question, keep = f"what is at row {r} ?", PATCH_CELLS[:, 1] == c
    else:
        question, keep = f"what is at col {c} ?", PATCH_CELLS[:, 0] == r
    return dataclasses.replace(sample, question=question, kind="axis"), keep


POOLED_CELLS = torch.tensor([(r, c) for r in range(4) for c in range(4)])  # (16, 2) cell-mean tokens


ROUTED_KINDS = ("lookup", "compare")  # questions that name cells: the aids below apply to them


def named_cells(sample) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first and the last cell a question names (the same cell twice for a lookup)."""
    return sample.cells[0], sample.cells[-1]


def count_digit(sample) -> int:
    """The digit a ``how many D ?`` question asks about."""
    return int(sample.question.split()[2])


def aid_position(lab: torch.Tensor, b: int, at: str = "answer", question: int = 0) -> int:
    """Where the aids act in sample ``b`` for its ``question``-th question (1: a pair's follow-up):
    ``answer``, the ``=`` position that predicts the answer token (a decode step, which no
    compression method observes at prefill), or ``prompt``, the question's last token ``?`` (for the
    first question, inside the post-vision window that VL-Cache and SnapKV score)."""
    labelled = (lab[b] != -100).nonzero().flatten()
    starts = labelled[torch.cat([torch.tensor([True]), labelled[1:] != labelled[:-1] + 1])]  # each `= A </s>`
    start = int(starts[question])
    return start if at == "answer" else start - 1


def aid_sites(batch, lab: torch.Tensor, at: str, pairs: bool = False):
    """(b, sample, position) for every question the aids act on: single questions, and with
    ``pairs`` both questions of a follow-up pair (each at its own aid position)."""
    for b, item in enumerate(batch):
        if isinstance(item, tuple):
            if pairs:
                for k, sample in enumerate(item):
                    yield b, sample, aid_position(lab, b, at, k)
            continue
        yield b, item, aid_position(lab, b, at)


def routing_loss(
    attn: torch.Tensor,
    batch,
    ids: torch.Tensor,
    lab: torch.Tensor,
    image_token_id: int,
    count: bool = False,
    at: str = "answer",
    pairs: bool = False,
) -> tuple[torch.Tensor, float]:
    """Mean over lookup and compare samples of -log(attention mass on a named cell's image tokens),
    taken at the position that predicts the answer: the first half of the heads on the first named
    cell, the second half on the last (both on the one cell of a lookup). attn: (B, H, T, T) one
    layer's weights. Returns the loss and the mean mass (for the progress bar).

    With ``count``, a count question adds, for all heads, the cross-entropy between the attention
    and a target that gives the first token (the sink) one cell's worth of weight and each matching
    cell's 16 tokens one each: the sink's share is then 1 / (1 + count), so the layer's output
    says how many cells matched."""
    terms, masses = [], []
    half = attn.shape[1] // 2
    for b, item, q in aid_sites(batch, lab, at, pairs):
        counted = count and item.kind == "count"
        if not counted and item.kind not in ROUTED_KINDS:
            continue
        img = (ids[b] == image_token_id).nonzero().flatten()
        cells = PATCH_CELLS if len(img) == len(PATCH_CELLS) else POOLED_CELLS
        if counted:  # all heads: sink weight 1 / (1 + count), each matching cell the same
            hit = torch.zeros(len(img), dtype=torch.bool)
            for cell in item.cells:
                hit |= (cells == torch.tensor(cell)).all(-1)
            per_cell = int((cells == cells[0]).all(-1).sum())  # tokens per cell: 16, or 1 if pooled
            keys = torch.cat([torch.tensor([0]), img[hit]])
            target = torch.cat([torch.tensor([float(per_cell)]), torch.ones(int(hit.sum()))])
            target = target / target.sum()
            probs = attn[b, :, q, keys]  # (H, K)
            terms.append(-(target * torch.log(probs + 1e-6)).sum(-1).mean() + (target * torch.log(target)).sum())
            masses.append(float(probs.sum(-1).mean().detach()))
            continue
        else:
            groups = [
                (heads, img[(cells == torch.tensor(cell)).all(-1)])
                for heads, cell in zip((slice(0, half), slice(half, None)), named_cells(item))
            ]
        for heads, target in groups:
            mass = attn[b, heads, q, target].sum(-1).mean()
            terms.append(-torch.log(mass + 1e-6))
            masses.append(float(mass.detach()))
    if not terms:
        return attn.new_zeros(()), float("nan")
    return torch.stack(terms).mean(), sum(masses) / len(masses)


def gather_loss(
    hidden: torch.Tensor,
    probe: torch.nn.Module,
    batch,
    lab: torch.Tensor,
    count: bool = False,
    at: str = "answer",
    pairs: bool = False,
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of a training-only linear probe that reads the named cells' rows and columns
    (first and last named cell, see :func:`named_cells`) from the residual stream at the answer
    position, entering the routed layer. hidden: (B, T, H). It teaches the first hop (gather
    ``row R col C`` into the answer position) directly, so the routing loss has a query to shape.
    With ``count``, the probe's last 10 outputs must also read the digit a count question asks
    about. Returns the loss and the probe's accuracy (every read right)."""
    return _probe_loss(
        hidden,
        probe,
        batch,
        lab,
        at,
        routed=lambda item: [*named_cells(item)[0], *named_cells(item)[1]],
        routed_heads=(4, 4),
        counted=count_digit if count else None,
        count_slice=slice(16, 26),
        pairs=pairs,
    )


def readout_loss(
    hidden: torch.Tensor,
    probe: torch.nn.Module,
    batch,
    lab: torch.Tensor,
    count: bool = False,
    at: str = "answer",
    pairs: bool = False,
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of a training-only linear probe that reads, from the residual stream at the
    answer position leaving the routed layer, the digits in the first and last named cells (lookup
    and compare) and, with ``count``, the count (0-16) of a count question: the routed layer's
    output must carry what it attended to. hidden: (B, T, H). Returns the loss and the accuracy."""
    return _probe_loss(
        hidden,
        probe,
        batch,
        lab,
        at,
        routed=lambda item: [int(item.grid[cell]) for cell in named_cells(item)],
        routed_heads=(2, 10),
        counted=(lambda item: len(item.cells)) if count else None,
        count_slice=slice(20, 37),
        pairs=pairs,
    )


def _probe_loss(hidden, probe, batch, lab, at, routed, routed_heads, counted, count_slice, pairs=False):
    """Shared by the probes: cross-entropy of ``probe`` at each single question's aid position.
    Lookup and compare questions read ``routed(item)`` from the first ``k * classes`` outputs
    (``routed_heads = (k, classes)``); count questions, when ``counted`` is given, read
    ``counted(item)`` from ``count_slice``. Returns the mean loss and the accuracy (all reads right)."""
    feats, targets, count_feats, count_targets = [], [], [], []
    for b, item, q in aid_sites(batch, lab, at, pairs):
        if item.kind in ROUTED_KINDS:
            feats.append(hidden[b, q])
            targets.append(routed(item))
        elif counted is not None and item.kind == "count":
            count_feats.append(hidden[b, q])
            count_targets.append(counted(item))
    k, classes = routed_heads
    losses, right, n = [], 0.0, 0
    if feats:
        logits = probe(torch.stack(feats))[:, : k * classes].reshape(len(feats), k, classes)
        target = torch.tensor(targets)  # (N, k)
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten()))
        right += float((logits.argmax(-1) == target).all(-1).float().sum())
        n += len(feats)
    if count_feats:
        logits = probe(torch.stack(count_feats))[:, count_slice]
        target = torch.tensor(count_targets)
        losses.append(F.cross_entropy(logits, target))
        right += float((logits.argmax(-1) == target).float().sum())
        n += len(count_feats)
    if not losses:
        return hidden.new_zeros(()), float("nan")
    return torch.stack(losses).mean(), right / n


def running_mean(mean: float, value: float) -> float:
    """The progress bar's running mean of an aid's mass or accuracy; a NaN ``value`` (a batch
    without a question the aid acts on) leaves it as it is."""
    return mean if math.isnan(value) else 0.9 * mean + 0.1 * value


def curriculum_mix(step, args):
    if step < args.lookup_only_steps:
        return {"lookup": 1.0}
    return {"lookup": 0.5, "count": 0.25, "compare": 0.25}


@torch.no_grad()
def evaluate(model, tokenizer, split, n, seed, image_token_id, n_image):
    """Greedy full-cache accuracy on n samples of a split, per kind."""
    model.eval()
    scenes = DigitScenes(split, seed=seed)
    correct: dict[str, list[int]] = {}
    for i in range(0, n, 32):
        batch = [scenes.sample(j) for j in range(i, min(i + 32, n))]
        ids, mask, lab = encode_batch(batch, tokenizer, image_token_id, n_image)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels([s.image for s in batch])).logits
        # the answer token is the second labelled position ('=' first); teacher-forced '=' is
        # what greedy decoding produces once the model has learnt the format
        for b, s in enumerate(batch):
            pos = (lab[b] != -100).nonzero().flatten()
            pred = tokenizer.decode([int(logits[b, pos[1] - 1].argmax())]).strip()
            ok_prefix = int(logits[b, pos[0] - 1].argmax()) == int(lab[b, pos[0]])
            correct.setdefault(s.kind, []).append(int(ok_prefix and pred in s.answers))
    model.train()
    per_kind = {k: sum(v) / len(v) for k, v in correct.items()}
    overall = sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values())
    return overall, per_kind


TRAINER_STATE = "trainer_state.pt"  # in OUT/checkpoint: what --resume needs beyond the weights


def save(model, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    model.train(was_training)


# glibc hands every freed block above its mmap threshold back to the kernel, and a step allocates
# tens of MB of attention weights: the page faults took over half the CPU time (1.8 s/step, 55% in
# the kernel). Keeping freed memory in the heap makes a stage-2 step 2.3x faster (0.77 s/step).
_MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
}


def _reexec_with_heap_reuse() -> None:
    """Restart this process once with :data:`_MALLOC_ENV` (glibc reads it only at start-up)."""
    if sys.platform.startswith("linux") and not all(k in os.environ for k in _MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC_ENV})


def main() -> None:
    _reexec_with_heap_reuse()
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("vlcache/models/llava-tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vision-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=3000, help="instruction-tuning steps")
    p.add_argument("--lookup-only-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--projector-lr", type=float, default=3e-3)
    p.add_argument("--vision-lr", type=float, default=1e-3)
    p.add_argument("--vision-weight-decay", type=float, default=0.0)
    p.add_argument("--vision-cosine", action="store_true", help="cosine learning-rate decay in vision pretraining")
    p.add_argument("--vision-shift", type=int, default=0, help="vision augmentation: roll each cell by up to N px")
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--scene-pool", type=int, default=8192, help="training scenes whose tower features are cached for stage 2"
    )
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--vision-from", type=Path, default=None, help="reuse the vision tower of this checkpoint")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start stage 2 from every weight of this checkpoint (continue a run; overrides --vision-from)",
    )
    p.add_argument("--constant-frac", type=float, default=0.0, help="fraction of steps at full LR before cosine decay")
    p.add_argument(
        "--isolate-steps",
        type=int,
        default=0,
        help="distractor curriculum: over the first N steps the other cells of a lookup scene fade in from "
        "blank to real (readout is learnt before routing); 0: off",
    )
    p.add_argument(
        "--pooled-until",
        type=float,
        default=0.0,
        help="short-context curriculum: batches show the image as its 16 cell-mean tokens (not 256 patch "
        "tokens, 4x faster steps) until the running training accuracy on lookup answers reaches this "
        "value; then the share of such batches falls linearly to 0 over --pooled-decay steps; 0: off",
    )
    p.add_argument("--pooled-decay", type=int, default=1000, help="steps over which pooled batches phase out")
    p.add_argument(
        "--axis-questions",
        type=float,
        default=0.0,
        help="while pooled batches are in use, this fraction of lookup questions asks for one axis "
        "(what is at row r ?) about a scene with one visible column (or row): position is taught first",
    )
    p.add_argument(
        "--route-loss",
        type=float,
        default=0.0,
        help="weight of an auxiliary loss on lookup questions: -log of the attention mass (mean over the "
        "heads of layer --route-layer) that the answer position puts on the asked cell's image tokens; 0: off",
    )
    p.add_argument(
        "--route-steps", type=int, default=0, help="the --route-loss weight falls linearly to 0 over N steps"
    )
    p.add_argument("--route-hold", type=int, default=0, help="steps at full --route-loss weight before its fade")
    p.add_argument(
        "--gather-loss",
        type=float,
        default=0.0,
        help="weight of a training-only probe loss: the asked row and column must be linearly readable at "
        "the answer position entering --route-layer (teaches the first hop); same schedule as --route-loss "
        "(--route-hold, --route-steps)",
    )
    p.add_argument(
        "--count-aid",
        action="store_true",
        help="extend the aids to count questions: the gather probe reads the asked digit, the routed layer's "
        "attention is pulled to the matching cells plus the first token (the sink, weighted as one cell), "
        "and the readout probe reads the count",
    )
    p.add_argument(
        "--readout-loss",
        type=float,
        default=0.0,
        help="weight of a training-only probe loss: the named cells' digits (and, with --count-aid, the "
        "count) must be linearly readable at the answer position leaving --route-layer; same schedule",
    )
    p.add_argument(
        "--aid-at",
        choices=("answer", "prompt"),
        default="answer",
        help="position the aids act at: the answer position '=' (a decode step; the shipped model), or the "
        "prompt's last token '?', which prompt-attention scorers see at prefill (a model for testing their premise)",
    )
    p.add_argument(
        "--pair-aids",
        action="store_true",
        help="the aids act on both questions of a follow-up pair too (each at its own aid position); "
        "without it pairs get no aid and follow-up accuracy lags first questions",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a cut-short run from OUT/checkpoint (weights, optimiser, probes, step, random state); "
        "same flags as the run being resumed",
    )
    p.add_argument("--route-layer", type=int, default=2, help="decoder layer whose attention --route-loss shapes")
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    processor = bundled_processor(vocabulary(), IMAGE_SIZE)  # the bundled format: vlcache.hf.tiny
    tok = processor.tokenizer
    model = bundled_llava(
        processor,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        hidden=args.hidden,
        layers=args.layers,
    )
    image_token_id = model.config.image_token_index
    n_image = model.config.image_seq_length
    n_params = sum(p.numel() for p in model.parameters())
    print(f"llava-tiny: {n_params / 1e6:.2f}M parameters, {n_image} image tokens")
    log: list[dict] = []
    model.train()
    resume_dir = args.out / "checkpoint"
    if args.resume:
        if not (resume_dir / TRAINER_STATE).exists():
            raise SystemExit(f"--resume: no {TRAINER_STATE} in {resume_dir}; nothing to resume")
        args.init_from = resume_dir
    if args.init_from or args.vision_from:
        from transformers import LlavaForConditionalGeneration

        donor = LlavaForConditionalGeneration.from_pretrained(args.init_from or args.vision_from)
        if args.init_from:  # continue training a whole checkpoint (stage 2 only)
            model.load_state_dict(donor.state_dict())
            print(f"all weights taken from {args.init_from} (no vision pretraining)")
        else:
            model.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
            print(f"vision tower taken from {args.vision_from} (no vision pretraining)")
        del donor
    else:
        pretrain_vision(model, args, log)

    if args.steps == 0:  # vision pretraining only: a checkpoint to reuse with --vision-from
        save(model, processor, args.out)
        (args.out / "training_log.json").write_text(
            json.dumps({"recipe": vars(args) | {"out": str(args.out)}, "log": log}, default=str)
        )
        return

    # Stage 2: the tower is frozen; its features for a pool of training scenes are computed once.
    for p_ in model.model.vision_tower.parameters():
        p_.requires_grad_(False)
    pool = DigitScenes("train", seed=args.seed + 1)
    print(f"caching tower features of {args.scene_pool} training scenes")
    pool_feats = vision_features(model, [pool.scene(i)[0] for i in range(args.scene_pool)])
    check = [pool.sample(0), pool.sample(1)]
    ids, mask, lab = encode_batch(check, tok, image_token_id, n_image)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels([s.image for s in check])).logits
        mine = model(inputs_embeds=embed_with_features(model, ids, pool_feats[:2]), attention_mask=mask).logits
    assert torch.allclose(ref, mine, atol=1e-4), "cached-feature path differs from pixel_values path"

    blank = vision_features(model, [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))])  # (1, 256, H): an empty scene

    if args.route_loss > 0:  # attention weights are needed: eager attention in the language model
        model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})

    projector_params = list(model.model.multi_modal_projector.parameters())
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    # training-only (--gather-loss), not part of the model: rows, columns (16) and, with --count-aid, the digit (10)
    probe = torch.nn.Linear(args.hidden, 26 if args.count_aid else 16)
    lm_params += list(probe.parameters())
    if args.readout_loss > 0:  # training-only: the named cells' 2 digits (20) and a count (17)
        reader = torch.nn.Linear(args.hidden, 37)
        lm_params += list(reader.parameters())
    opt = torch.optim.AdamW(
        [{"params": projector_params, "lr": args.projector_lr}, {"params": lm_params, "lr": args.lr}],
        weight_decay=0.01,
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = 100
    gen = torch.Generator().manual_seed(args.seed)
    lookup_acc, route_mass, gather_acc, readout_acc, decay_from = 0.0, 0.0, 0.0, 0.0, None
    first_step = 0
    if args.resume:
        state = torch.load(resume_dir / TRAINER_STATE, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        probe.load_state_dict(state["probe"])
        if args.readout_loss > 0:
            reader.load_state_dict(state["reader"])
        gen.set_state(state["generator"])
        first_step, log = state["step"], state["log"]
        lookup_acc, route_mass, gather_acc, readout_acc, decay_from = state["running"]
        print(f"resumed from {resume_dir} at step {first_step}")
    bar = tqdm(
        range(first_step, args.steps), desc="instruction tuning", mininterval=5, initial=first_step, total=args.steps
    )
    for step in bar:
        flat = int(args.constant_frac * args.steps)
        progress = max(0.0, (step - flat) / max(1, args.steps - flat))
        scale = min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + 0.1)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        mix = curriculum_mix(step, args)
        scenes = DigitScenes("train", seed=args.seed + 1, mix=mix)
        chosen = torch.randint(0, args.scene_pool, (args.batch,), generator=gen).tolist()
        pairs = step >= args.lookup_only_steps
        batch = [
            (scenes.sample(i, salt=step * 2 + 1), scenes.sample(i, salt=step * 2 + 2))
            if pairs and k % 4 == 0
            else scenes.sample(i, salt=step * 2 + 1)
            for k, i in enumerate(chosen)
        ]
        feats = pool_feats[chosen]
        if args.pooled_until > 0 and decay_from is None and lookup_acc >= args.pooled_until:
            decay_from = step
            tqdm.write(f"step {step}: lookup train accuracy {lookup_acc:.3f}; phasing out pooled images")
        share = 1.0 if decay_from is None else max(0.0, 1 - (step - decay_from) / args.pooled_decay)
        pooled = args.pooled_until > 0 and torch.rand((), generator=gen).item() < share
        if args.axis_questions and args.pooled_until > 0 and share > 0:
            rng = np.random.default_rng([args.seed, step])
            feats = feats.clone()
            for k, item in enumerate(batch):
                if not isinstance(item, tuple) and item.kind == "lookup" and rng.random() < args.axis_questions:
                    batch[k], keep = axis_question(item, rng)
                    feats[k, ~keep] = blank[0, ~keep]
        if pooled:
            feats = cell_means(feats).flatten(1, 2)  # (B, 16, H): one token per cell, row-major
        ids, mask, lab = encode_batch(batch, tok, image_token_id, feats.shape[1])
        if step < args.isolate_steps and not pooled:
            feats = fade_distractors(feats, blank, batch, step / args.isolate_steps, gen)
        out = model(
            inputs_embeds=embed_with_features(model, ids, feats),
            attention_mask=mask,
            labels=lab,
            output_attentions=step < args.route_steps and args.route_loss > 0,
            output_hidden_states=step < args.route_steps and (args.gather_loss > 0 or args.readout_loss > 0),
        )
        loss = out.loss
        aid = 0.0  # the aids' schedule: 1 for --route-hold steps, then a linear fade to 0 at --route-steps
        if args.route_steps:
            hold = min(args.route_hold, args.route_steps)
            aid = min(1.0, max(0.0, (args.route_steps - step) / max(1, args.route_steps - hold)))
        aid_options = {"count": args.count_aid, "at": args.aid_at, "pairs": args.pair_aids}  # shared by the aids
        if aid > 0 and args.route_loss > 0:
            r_loss, r_mass = routing_loss(
                out.attentions[args.route_layer], batch, ids, lab, image_token_id, **aid_options
            )
            loss = loss + aid * args.route_loss * r_loss
            route_mass = running_mean(route_mass, r_mass)
        if aid > 0 and args.gather_loss > 0:
            g_loss, g_acc = gather_loss(out.hidden_states[args.route_layer], probe, batch, lab, **aid_options)
            loss = loss + aid * args.gather_loss * g_loss
            gather_acc = running_mean(gather_acc, g_acc)
        if aid > 0 and args.readout_loss > 0:
            o_loss, o_acc = readout_loss(out.hidden_states[args.route_layer + 1], reader, batch, lab, **aid_options)
            loss = loss + aid * args.readout_loss * o_loss
            readout_acc = running_mean(readout_acc, o_acc)
        with torch.no_grad():  # running accuracy of the answer token on lookup questions
            hits = [
                float(out.logits[b, pos[1] - 1].argmax() == lab[b, pos[1]])
                for b, item in enumerate(batch)
                if not isinstance(item, tuple) and item.kind == "lookup"
                for pos in [(lab[b] != -100).nonzero().flatten()]
            ]
            if hits:
                lookup_acc = 0.95 * lookup_acc + 0.05 * sum(hits) / len(hits)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector_params + lm_params, 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(
                loss=f"{out.loss.item():.3f}",
                lookup=f"{lookup_acc:.2f}",
                route=f"{route_mass:.2f}",
                gather=f"{gather_acc:.2f}",
                readout=f"{readout_acc:.2f}",
            )
            log.append(
                {
                    "stage": "lm",
                    "step": step,
                    "loss": out.loss.item(),
                    "train_lookup_acc": lookup_acc,
                    "route_mass": route_mass if aid > 0 and args.route_loss > 0 else None,
                    "gather_acc": gather_acc if aid > 0 and args.gather_loss > 0 else None,
                    "readout_acc": readout_acc if aid > 0 and args.readout_loss > 0 else None,
                    "seconds": time.time() - t_start,
                }
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc, per_kind = evaluate(model, tok, "val", args.eval_samples, args.seed, image_token_id, n_image)
            log.append(
                {
                    "stage": "lm",
                    "step": step + 1,
                    "val_acc": acc,
                    "per_kind": per_kind,
                    "seconds": time.time() - t_start,
                }
            )
            tqdm.write(
                f"step {step + 1}: val accuracy {acc:.3f} {json.dumps({k: round(v, 3) for k, v in per_kind.items()})}"
            )
            save(model, processor, resume_dir)  # a usable model, and what --resume needs, if the run is cut short
            state = {
                "step": step + 1,
                "optimizer": opt.state_dict(),
                "probe": probe.state_dict(),
                "reader": reader.state_dict() if args.readout_loss > 0 else None,
                "generator": gen.get_state(),
                "log": log,
                "running": (lookup_acc, route_mass, gather_acc, readout_acc, decay_from),
            }
            torch.save(state, resume_dir / (TRAINER_STATE + ".tmp"))
            os.replace(resume_dir / (TRAINER_STATE + ".tmp"), resume_dir / TRAINER_STATE)

    acc, per_kind = evaluate(model, tok, "val", 1024, args.seed, image_token_id, n_image)
    print(f"final validation accuracy (1024 samples, full cache): {acc:.3f} {per_kind}")
    save(model, processor, args.out)
    shutil.rmtree(args.out / "checkpoint", ignore_errors=True)
    meta = {
        "recipe": vars(args) | {"out": str(args.out)},
        "val_accuracy": acc,
        "val_per_kind": per_kind,
        "parameters": n_params,
        "train_seconds": time.time() - t_start,
        "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(meta, indent=1, default=str))
    print(json.dumps({"val_accuracy": acc, "per_kind": per_kind, "train_seconds": round(time.time() - t_start)}))


if __name__ == "__main__":
    main()
