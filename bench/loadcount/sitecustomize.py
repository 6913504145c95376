"""Count language-model loads: put this directory on PYTHONPATH and set PERSONA_OPS_LOAD_LOG.

Python imports ``sitecustomize`` at start-up of every process. This one imports neither torch nor
transformers; it puts an import hook in front of ``sys.meta_path`` that, once
``transformers.modeling_utils`` has been executed, wraps ``PreTrainedModel.from_pretrained`` (what
``AutoModelForCausalLM.from_pretrained`` ends in) so that each top-level call appends
``{"pid", "model", "seconds", "ok"}`` as one JSON line to ``$PERSONA_OPS_LOAD_LOG``. Nothing is
installed when the variable is unset. Any other ``sitecustomize`` further along ``sys.path`` still runs.
"""

import os
import sys

TARGET = "transformers.modeling_utils"


def _patch(module) -> None:
    import functools
    import json
    import threading
    import time

    cls = module.PreTrainedModel
    orig = cls.__dict__["from_pretrained"].__func__
    log, depth = os.environ["PERSONA_OPS_LOAD_LOG"], threading.local()

    @functools.wraps(orig)
    def from_pretrained(klass, *args, **kwargs):
        if getattr(depth, "n", 0):  # a load inside a load counts once
            return orig(klass, *args, **kwargs)
        depth.n, t0, ok = 1, time.perf_counter(), False
        try:
            out = orig(klass, *args, **kwargs)
            ok = True
            return out
        finally:
            depth.n = 0
            model = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            line = json.dumps({"pid": os.getpid(), "model": str(model),
                               "seconds": round(time.perf_counter() - t0, 4), "ok": ok})
            with open(log, "a") as f:
                f.write(line + "\n")

    cls.from_pretrained = classmethod(from_pretrained)


class _Hook:
    """A meta-path finder that lets the other finders find ``TARGET``, then patches it once executed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_patch(module):
                    exec_module(module)
                    _patch(module)

                spec.loader.exec_module = exec_and_patch  # this spec's own loader instance
                return spec
        return None


def _chain() -> None:
    """Run the ``sitecustomize`` this one shadows (the next one on sys.path), if any."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("PERSONA_OPS_LOAD_LOG") and not any(f is _Hook for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook)
_chain()
