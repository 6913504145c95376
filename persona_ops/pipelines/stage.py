"""How a stage is declared, once: ``@stage(...)`` on a plain function ``fn(cfg, io) -> metrics``.

The declaration names the pipeline, the items the stage runs for (``each=`` a params key
holding names or a mapping name -> object, or ``matrix=`` several keys), the params it reads
(``cfg`` holds exactly those; they are what MLflow and provenance record and what DVC tracks),
named inputs and outputs as path templates, what it registers (with a kind) and an optional
input check. ``dvc.yaml``, the CLI, the Prefect flows and input validation are generated from
these declarations (:mod:`persona_ops.pipelines.registry`); stage code resolves its paths
through ``io`` and never joins them by hand.

Templates: ``{item}`` is the item's name, ``{item.KEY}`` a matrix key's value, and any other
``{a.b.c}`` a params value (``{persona_vectors.traits.dir}``). DVC gets them as ``${...}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from persona_ops.errors import InputError

KINDS = ("persona-vector", "persona-space", "capping-spec", "lora-adapter")
FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


@dataclass(frozen=True)
class Output:
    """Another stage's output used as an input: ``Output("vectors", "vectors")`` is the
    ``vectors`` output of the ``vectors`` stage for the same item (``item=`` another item
    template, e.g. ``"default"``)."""

    stage: str
    name: str
    item: str = "{item}"


@dataclass(frozen=True)
class AllOutputs:
    """One output of every item of a stage (e.g. every role's transcripts). DVC depends on
    the directory that holds them; provenance lists each file."""

    stage: str
    name: str


@dataclass(frozen=True)
class ParamPaths:
    """Input paths listed by a params key (a list of paths, or a mapping's values)."""

    key: str


@dataclass(frozen=True)
class Register:
    """Register output ``output`` as a new version of model ``name`` (template: ``{item}``,
    ``{model}`` = the slug of the stage's first model) of registry kind ``kind``."""

    output: str
    name: str
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"registry kind {self.kind!r}: expected one of {KINDS}")


@dataclass(frozen=True)
class Items:
    """What a stage runs for: ``each`` (a params key: a list of names, or a mapping whose keys are
    the names and whose values the stage reads as ``io.item.value``) or ``matrix`` (key -> params
    key of a list; one item per combination, named ``v1-v2``). ``default(params, root)`` gives
    the names when the ``each`` key holds null (e.g. every role file of a directory)."""

    each: str | None = None
    matrix: Mapping[str, str] | None = None
    default: Callable[[Any, Path], list[str]] | None = None


@dataclass(frozen=True)
class Item:
    """One item: its name (a DVC stage suffix, a directory and a shell word: always a safe
    name), its value (a mapping item's object, a matrix item's key -> value, else the name)."""

    name: str
    value: Any = None


@dataclass(eq=False)
class Stage:
    """A declared stage (see the module docstring)."""

    name: str
    pipeline: str
    fn: Callable[[Any, "StageIO"], dict]
    params: tuple[str, ...]
    outputs: dict[str, str]
    inputs: dict[str, str | Output | AllOutputs | ParamPaths] = field(default_factory=dict)
    items: Items | None = None
    per_item: str | None = None  # params key of per-item overrides merged into its section
    registers: tuple[Register, ...] = ()
    persist: tuple[str, ...] = ()  # outputs kept between runs (stages that resume)
    check: Callable[[Any, "StageIO"], None] | None = None
    timeout_s: float = 6 * 3600
    adapter_output: str | None = None  # the output a {stage: NAME} adapter reference points at

    @property
    def module(self) -> str:
        return self.fn.__module__

    def validator(self, fn: Callable[[Any, "StageIO"], None]) -> Callable:
        """Decorate ``fn(cfg, io)``: checks the stage's inputs before any model is loaded."""
        self.check = fn
        return fn

    def __call__(self, cfg, io: "StageIO") -> dict:
        return self.fn(cfg, io)

    def __repr__(self) -> str:
        return f"<stage {self.name} of {self.pipeline}>"


def stage(name: str, *, pipeline: str, params: list[str], outputs: dict[str, str],
          inputs: dict | None = None, each: str | None = None, matrix: Mapping[str, str] | None = None,
          each_default: Callable | None = None, per_item: str | None = None, registers: tuple = (),
          persist: tuple[str, ...] = (), timeout_s: float = 6 * 3600,
          adapter_output: str | None = None) -> Callable[[Callable], Stage]:
    """Declare a stage (see the module docstring); returns the :class:`Stage`."""
    if each and matrix:
        raise ValueError(f"stage {name}: give each= or matrix=, not both")
    unknown = [o for o in persist if o not in outputs]
    if unknown or (adapter_output and adapter_output not in outputs):
        raise ValueError(f"stage {name}: {unknown or adapter_output} not among its outputs {sorted(outputs)}")
    items = Items(each, matrix, each_default) if (each or matrix) else None

    def wrap(fn: Callable) -> Stage:
        return Stage(name=name, pipeline=pipeline, fn=fn, params=tuple(params), outputs=dict(outputs),
                     inputs=dict(inputs or {}), items=items, per_item=per_item, registers=tuple(registers),
                     persist=tuple(persist), timeout_s=timeout_s, adapter_output=adapter_output)

    return wrap


@dataclass(frozen=True)
class Pipeline:
    """A pipeline: its own stages, in order. What else runs first is derived: every stage item
    that makes one of their inputs."""

    name: str
    stages: tuple[Stage, ...]
    description: str


# --- what a stage function receives ----------------------------------------------------------

class View:
    """Read-only access to the declared parts of the params: ``cfg.persona_vectors.generate``.

    Reading a key the stage did not declare raises, so a stage cannot depend on a parameter DVC
    does not track for it."""

    def __init__(self, obj: Any, declared: tuple[str, ...], prefix: str = ""):
        self._obj, self._declared, self._prefix = obj, declared, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        path = f"{self._prefix}{name}"
        if any(path == d or path.startswith(d + ".") for d in self._declared):
            return getattr(self._obj, name)
        if any(d.startswith(path + ".") for d in self._declared):
            return View(getattr(self._obj, name), self._declared, path + ".")
        raise AttributeError(f"params key {path!r} is not declared by this stage (declared: "
                             f"{', '.join(self._declared)})")

    def __repr__(self) -> str:
        return f"View({self._prefix or '<params>'}: {', '.join(self._declared)})"


class StageIO:
    """A stage's paths and models for one item (made by the runner).

    ``input``/``output`` give resolved paths; ``model`` comes from the process's shared pool
    (each base model loaded once) and is recorded in provenance (pass ``io.model`` as the
    ``load`` of a judge or generator); ``made_with`` names what made an output when no local model
    did (a served model)."""

    def __init__(self, stage: Stage, item: Item | None, root: Path, inputs: dict[str, Path | list[Path]],
                 outputs: dict[str, Path], pool=None):
        self.stage, self.item, self.root = stage, item, Path(root)
        self._inputs, self._outputs, self.pool = inputs, outputs, pool
        self.used: list[tuple[str, Path]] = []  # inputs beyond the declared ones (adapters)
        self.extra: dict = {}  # stage facts recorded in the outputs' provenance (e.g. a resume fingerprint)
        self.tags: dict[str, str] = {}  # tags of the stage's MLflow run
        self.registered: dict[str, Path] = {}  # models:/ URIs in the declared params -> local copies
        self.models: list[dict] = []
        self.labels: list[str] = []

    def input(self, name: str) -> Path:
        value = self._get(self._inputs, name, "input")
        if isinstance(value, list):
            raise KeyError(f"input {name!r} of stage {self.stage.name} is a list: use io.inputs({name!r})")
        return value

    def inputs(self, name: str) -> list[Path]:
        value = self._get(self._inputs, name, "input")
        if isinstance(value, dict):
            return list(value.values())
        return list(value) if isinstance(value, list) else [value]

    def each(self, name: str) -> dict[str, Path]:
        """An ``AllOutputs`` input: ``{item: path}`` in the producer's item order."""
        value = self._get(self._inputs, name, "input")
        if not isinstance(value, dict):
            raise KeyError(f"input {name!r} of stage {self.stage.name} is not one output of every item")
        return dict(value)

    def output(self, name: str) -> Path:
        return self._get(self._outputs, name, "output")

    def model(self, ref):
        """The loaded model ``ref`` names (adapter attached and active), recorded in provenance."""
        loaded = self._pool().get(ref)
        self._record(ref, loaded.label)
        return loaded

    def plain_model(self, ref):
        """The base model of ``ref`` with no adapter layers (what training wraps)."""
        loaded = self._pool().plain(ref)
        self._record(ref.base, loaded.label)
        return loaded

    def num_layers(self, ref) -> int:
        """Decoder blocks of ``ref``'s base model, read without loading it (for input checks)."""
        from persona_ops.models.loading import num_layers

        return num_layers(self._pool().config(ref))

    def tokenizer(self, ref):
        """``ref``'s tokenizer, read without loading the weights (for input checks)."""
        return self._pool().tokenizer(ref)

    def check_layers(self, ref, where: str, layers, first: int = 1) -> None:
        """``layers`` (``hidden_states`` indices, the params key ``where``) exist in ``ref``'s model."""
        n = self.num_layers(ref)
        bad = [layer for layer in layers if not first <= layer <= n]
        if bad:
            raise InputError(f"{where}: {bad} outside {first}..{n} (layer L = hidden_states[L]; "
                             f"the model has {n} blocks)")

    def made_with(self, label: str) -> None:
        """Name what made the outputs when it is not a model loaded here (a served model, a judge,
        the model recorded in an input's header): recorded in provenance and MLflow's ``model`` tag."""
        if label not in self.labels:
            self.labels.append(label)
            self.models.append({"id": None, "revision": None, "adapter": None, "adapter_sha256": None,
                                "label": label})

    def path(self, relative: str) -> Path:
        """A path that params hold (``ParamPaths`` inputs), resolved against the project root; a
        ``models:/`` URI gives the local copy of the registered file (fetched by the runner)."""
        if relative in self.registered:
            return self.registered[relative]
        return self.root / relative

    def _pool(self):
        if self.pool is None:
            from persona_ops.models.pool import ModelPool

            self.pool = ModelPool()
        return self.pool

    def _record(self, ref, label: str) -> None:
        from persona_ops.models.adapters import adapter_sha256

        adapter = ref.adapter if isinstance(ref.adapter, str) else None
        entry = {"id": ref.name, "revision": ref.revision, "adapter": ref.adapter_source or adapter,
                 "adapter_sha256": adapter_sha256(adapter) if adapter else None, "label": label}
        if entry not in self.models:
            self.models.append(entry)
            self.labels.append(label)
            if adapter:  # the adapter's files are an input: lineage reaches the stage that trained them
                self.used.append(("adapter", Path(adapter)))

    def _get(self, table: dict, name: str, what: str):
        if name not in table:
            raise KeyError(f"stage {self.stage.name} declares no {what} {name!r} (has {sorted(table)})")
        return table[name]


def fill(template: str, values: Callable[[str], Any]) -> str:
    """Replace every ``{field}`` of ``template`` with ``values(field)``."""
    return FIELD.sub(lambda m: str(values(m.group(1))), template)


def template_fields(template: str) -> list[str]:
    return FIELD.findall(template)

