"""Incremental detokenization (:class:`vlcache.serving.engine.TextDeltas`): the streamed deltas add up
to the decoded answer, for the tokenizer kinds LLaVA checkpoints use — byte-level BPE (multi-byte
characters split across tokens: held back until complete) and SentencePiece-style Metaspace (a
word's leading space that a decoder drops at the start of a text) — on random ids and on text."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlcache.serving.engine import TextDeltas

CORPUS = [
    "Hello, world! Ça va? 日本語のテキストです。 Émile a vu 3 chats, 12 chiens…",
    "the quick brown fox jumps over the lazy dog; naïve café déjà-vu 🙂 ok",
    "row 1 col 2 is a seven . how many 3 ? two",
]


def _trained(kind: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["bytelevel", "metaspace", "bundled"])
def tokenizer(request):
    if request.param == "bundled":
        from vlcache.digits import vocabulary
        from vlcache.hf.tiny import bundled_tokenizer

        return bundled_tokenizer(vocabulary())
    return _trained(request.param)


def _stream(tokenizer, ids):
    parts: list[str] = []
    deltas = TextDeltas(tokenizer, parts.append)
    for token in ids:
        deltas.add(token)
    deltas.end()
    return parts, deltas


def test_deltas_add_up_to_the_decoded_answer(tokenizer):
    rng = np.random.default_rng(0)
    texts = [*CORPUS, " leading space", "a  b   c", "🙂🙂 é"]
    cases = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cases += [[int(i) for i in rng.integers(0, len(tokenizer), int(rng.integers(1, 50)))] for _ in range(200)]
    for ids in cases:
        parts, deltas = _stream(tokenizer, ids)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(parts) == whole == deltas.emitted, ids
        assert all(parts), "an empty delta was sent"


def test_an_incomplete_character_is_held_back_until_complete():
    tok = _trained("bytelevel")
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    if len(ids) < 2 or "\ufffd" not in "".join(pieces):
        pytest.skip("this vocabulary learnt the emoji as one token")
    parts, _ = _stream(tok, ids)
    assert parts == ["🙂"]


def test_each_token_decodes_a_short_window_not_the_whole_answer(tokenizer):
    """The work per token does not grow with the answer: the decoded windows stay a few tokens long."""
    lengths: list[int] = []

    class Counting:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return tokenizer.decode(ids, **kw)

    ids = tokenizer(" ".join([CORPUS[2]] * 12), add_special_tokens=False)["input_ids"]  # words every vocabulary has
    deltas = TextDeltas(Counting(), None)
    for token in ids:
        deltas.add(token)
    assert len(ids) > 60 and max(lengths) <= 8
