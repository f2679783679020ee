"""Fidelity harness: accuracy vs KV budget for any method on any task (`vlcache-eval`).

Modules, from the bottom up (light at import; torch / transformers load on first use):

* :mod:`vlcache.digits` (outside the harness: bench and generate use its scenes too) — the synthetic
  `digits` VQA task the bundled `llava-tiny` is trained on.
* :mod:`vlcache.eval.passkey` — the text task `passkey`: a pass key hidden in 1–2k tokens of filler.
* :mod:`vlcache.eval.metrics` — answer scoring: exact match, VQA accuracy, ANLS.
* :mod:`vlcache.eval.datasets` — samples of a task: `digits`, `passkey` or a local JSONL file.
* :mod:`vlcache.eval.runner` — generate one sample's answers under a list of compression configs
  (text tasks: from one shared prefill).
* :mod:`vlcache.eval.report` — aggregate, print the table, write JSON / CSV / plot atomically.

The models come from :mod:`vlcache.hf.loading` (the bundled `llava-tiny` or a local VLM folder) and
:mod:`vlcache.hf.causal_lm` (`smollm2` or a local causal-LM folder; :func:`~vlcache.hf.causal_lm.is_text_model`
tells them apart); the ``vlcache-eval`` command is :mod:`vlcache.cli.eval`. User mistakes (bad flag,
missing file, malformed dataset line) raise :class:`vlcache.errors.UserError`.
"""

from __future__ import annotations
