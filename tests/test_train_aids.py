"""The training-only aids of scripts/train_tiny_llava.py: each loss is minimal exactly on the
behaviour it teaches and reads its targets from the task's own answers."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

from vlcache.digits import IMAGE_SIZE, DigitScenes, vocabulary
from vlcache.hf.tiny import bundled_processor
from vlcache.tokens import IMAGE_TOKEN_TEXT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_llava.py"


@pytest.fixture(scope="module")
def train_script() -> types.ModuleType:
    """The training script imported as a module: its aids are what these tests check (the model's
    format is :mod:`vlcache.hf.tiny`'s)."""
    spec = importlib.util.spec_from_file_location("train_tiny_llava", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def encoded(train_script: types.ModuleType):
    tok = bundled_processor(vocabulary(), IMAGE_SIZE).tokenizer

    def encode(mix: dict[str, float], n: int, seed: int):
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN_TEXT)
        batch = [DigitScenes("train", seed=seed, mix=mix).sample(i) for i in range(n)]
        ids, _, lab = train_script.encode_batch(batch, tok, image_id, 256)
        return batch, ids, lab, image_id

    return encode


def _answer_position(lab: torch.Tensor, b: int) -> int:
    return int((lab[b] != -100).nonzero().flatten()[1]) - 1


def test_count_routing_loss_is_zero_only_on_the_sink_share_target(train_script, encoded) -> None:
    batch, ids, lab, image_id = encoded({"count": 1.0}, 6, seed=int(torch.randint(0, 10_000, ())))
    t = ids.shape[1]
    target = torch.zeros(len(batch), 4, t, t)
    for b, sample in enumerate(batch):
        img = (ids[b] == image_id).nonzero().flatten()
        hit = torch.zeros(256, dtype=torch.bool)
        for cell in sample.cells:
            hit |= (train_script.PATCH_CELLS == torch.tensor(cell)).all(-1)
        w = torch.zeros(t)
        w[0], w[img[hit]] = 16.0, 1.0
        target[b, :, _answer_position(lab, b)] = w / w.sum()
        # the sink's share encodes the count
        assert float(target[b, 0, _answer_position(lab, b), 0]) == pytest.approx(1 / (1 + len(sample.cells)))
    at_target, _ = train_script.routing_loss(target, batch, ids, lab, image_id, count=True)
    assert abs(float(at_target)) < 1e-3
    # all mass on the matching cells, none on the sink: the count is lost, and the loss says so
    no_sink = target.clone()
    no_sink[:, :, :, 0] = 0
    no_sink = no_sink / no_sink.sum(-1, keepdim=True).clamp_min(1e-9)
    lost, _ = train_script.routing_loss(no_sink, batch, ids, lab, image_id, count=True)
    random_attn = torch.softmax(torch.randn(len(batch), 4, t, t), -1)
    rand, _ = train_script.routing_loss(random_attn, batch, ids, lab, image_id, count=True)
    assert float(lost) > 1.0 and float(rand) > 1.0
    # without --count-aid count questions are not routed at all
    none, mass = train_script.routing_loss(random_attn, batch, ids, lab, image_id, count=False)
    assert float(none) == 0.0 and mass != mass  # NaN: nothing to report


def test_readout_probe_targets_are_the_named_digits_and_the_count(train_script, encoded) -> None:
    batch, ids, lab, _ = encoded({"lookup": 0.4, "compare": 0.3, "count": 0.3}, 24, seed=5)
    hidden = torch.zeros(len(batch), ids.shape[1], 37)
    for b, sample in enumerate(batch):  # a residual stream that holds the answers one-hot
        q = _answer_position(lab, b)
        if sample.kind == "count":
            hidden[b, q, 20 + len(sample.cells)] = 10.0
        else:
            hidden[b, q, int(sample.grid[sample.cells[0]])] = 10.0
            hidden[b, q, 10 + int(sample.grid[sample.cells[-1]])] = 10.0
    identity = torch.nn.Linear(37, 37, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(37))
    loss, acc = train_script.readout_loss(hidden, identity, batch, lab, count=True)
    assert acc == 1.0 and float(loss) < 1e-3
    shuffled = hidden[torch.randperm(len(batch))]
    loss_s, acc_s = train_script.readout_loss(shuffled, identity, batch, lab, count=True)
    assert acc_s < 1.0 and float(loss_s) > float(loss)
