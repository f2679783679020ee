"""`vlcache-build`: a HF VLM checkpoint -> a verified artifact directory.

Modules, from the bottom up (light at import; torch / transformers / onnx load on first use). The
config is :class:`vlcache.config.BuildConfig`; the artifact's layout and manifest are
:mod:`vlcache.artifact`. User mistakes raise :class:`vlcache.errors.UserError`.

* :mod:`vlcache.builder.profiles` — the YAML build profiles in ``builder/`` (model aliases).
* :mod:`vlcache.builder.source` — resolve ``--model`` (alias, HF id in the local cache, folder).
* :mod:`vlcache.builder.build` — the stages, written to a temporary folder renamed when complete.
* :mod:`vlcache.cli.build` — the ``vlcache-build`` command.
"""

from __future__ import annotations
