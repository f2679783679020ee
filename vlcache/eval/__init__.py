"""Fidelity harness: accuracy vs KV budget for any method on any task (`vlcache-eval`).

Modules, from the bottom up (light at import; torch / transformers load on first use):

* :mod:`vlcache.eval.tasks` — the synthetic `digits` VQA task the bundled `llava-tiny` is trained on.
* :mod:`vlcache.eval.passkey` — the text task `passkey`: a pass key hidden in 1–2k tokens of filler.
* :mod:`vlcache.eval.metrics` — answer scoring: exact match, VQA accuracy, ANLS.
* :mod:`vlcache.eval.datasets` — samples of a task: `digits`, `passkey` or a local JSONL file.
* :mod:`vlcache.eval.models` — locate and load a checkpoint (bundled `llava-tiny`, `smollm2`, or a
  local VLM or causal-LM folder).
* :mod:`vlcache.eval.runner` — generate one sample's answers under a list of compression configs
  (text tasks: from one shared prefill).
* :mod:`vlcache.eval.report` — aggregate, print the table, write JSON / CSV / plot atomically.
* :mod:`vlcache.eval.cli` — the ``vlcache-eval`` command.
"""

from __future__ import annotations


class EvalError(Exception):
    """A user mistake (bad flag, missing file, malformed dataset line): the CLI prints its message on
    one line and exits with status 2, without a traceback."""
