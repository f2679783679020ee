"""Shared fixtures: tiny random LLaVA models built offline (also as a checkpoint folder in the bundled
llava-tiny format, :mod:`vlcache.hf.tiny`), and hand-built attention patterns."""

from __future__ import annotations

import os
from pathlib import Path

# Nothing may be downloaded: every model in the tests is built here or shipped with the package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlcache.digits import IMAGE_SIZE, vocabulary  # noqa: E402
from vlcache.hf.tiny import bundled_llava, bundled_processor, tiny_llava, tiny_llava_next  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder in the bundled llava-tiny's format, smaller, with random weights."""
    torch.manual_seed(0)
    processor = bundled_processor(vocabulary(), IMAGE_SIZE)
    model = bundled_llava(processor, vision_hidden=32, vision_layers=1, hidden=32, layers=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    out = tmp_path_factory.mktemp("llava-tiny-random")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llava():
    return tiny_llava(seed=0, layers=3)


@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava(seed=0, layers=3, attn="eager")


@pytest.fixture(scope="session")
def llava_next():
    return tiny_llava_next(seed=1, layers=3)


def peaked_qk(
    targets: list[int], prompt_len: int, query_start: int, *, q_heads: int = 2, kv_heads: int = 1, c: float = 12.0
):
    """Queries/keys whose attention is a known pattern: row i attends (almost) only to targets[i].

    Keys are scaled one-hot vectors (d = m), query row i is ``c · e_{targets[i]}``; with scale 1 the
    target's logit is c² and every other visible key's is 0. Returns (queries (1,H_q,n,m), keys (1,H_kv,m,m)).
    """
    n = len(targets)
    eye = torch.eye(prompt_len) * c
    keys = eye.expand(1, kv_heads, prompt_len, prompt_len).clone()
    rows = torch.stack([torch.eye(prompt_len)[t] * c for t in targets])
    for i, t in enumerate(targets):
        assert t <= query_start + i, "a row can only target a key it sees"
    queries = rows.expand(1, q_heads, n, prompt_len).clone()
    return queries, keys
