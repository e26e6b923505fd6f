"""The parameter contract of an evaluator: one :class:`EvaluatorSchema` per evaluator.

A schema declares

* the evaluator's **options** (``[[evaluators]] options = {...}``): type, default, allowed
  values; :meth:`EvaluatorSchema.check_options` validates them and fills in defaults;
* the **parameters** it reads from a trial (dotted names or fnmatch patterns such as
  ``quant.layer.*.weights``), with their type and allowed values (a ``format`` must parse
  with ``quant.get_format``); some are read only under some options (``when``);
* the **metrics** it returns (floats; ``info`` lists the non-float trial information).

The same object is used by the spec validator (``dse validate`` / ``dse run`` reject an
unknown option, a parameter no evaluator reads, a choice that does not parse, an
objective or constraint metric no evaluator returns), by the evaluator itself (a
:class:`Plugin` checks its options before building) and by ``dse evaluators`` and
docs/params.md (generated from it).

Names may hold ``{option}`` placeholders filled from the checked options (the ``gpu``
metrics ``{prefix}tokens_per_s``), and ``{i}`` with ``repeat = (option, start)``: one name
per ``i`` in ``start .. start + options[option] - 1`` (the benchmark problems' ``x.{i}``).

A user evaluator (an entry point, or ``"package.module:factory"`` in a spec) gets the same
checks by being a :class:`Plugin`; a plain factory without a schema is accepted, but then
the spec validator cannot tell which parameters and metrics it uses and skips those
checks (docs/driver.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dse.registry import EvalContext, Evaluator

#: the value types of options and parameters
TYPES = ("int", "float", "bool", "str", "format", "table", "list", "any")
_REQUIRED = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what
    a one-line error shows of an error raised by a library (messages run to many lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def format_error(value: Any) -> str | None:
    """Why ``value`` is not a number format ``quant.get_format`` parses (``None``: it is)."""
    if not isinstance(value, str):
        return f"expected a format name (a string), got {value!r}"
    from quant.desc import describe  # the parser of quant.get_format, without torch

    try:
        describe(value)
    except ValueError as e:
        why = str(e).split("; valid families")[0]
        return f"expected a format quant.get_format parses (docs/quant.md), got {value!r} ({why})"
    return None


def _range_text(low: float | None, high: float | None, what: str) -> str:
    if low is not None and high is not None:
        return f"{what} in [{low:g}, {high:g}]"
    if low is not None:
        return f"{what} >= {low:g}"
    if high is not None:
        return f"{what} <= {high:g}"
    return what


@dataclass(frozen=True)
class _Typed:
    """What options and parameters share: a type, allowed values, a range, a doc line.

    ``check``: extra validation of a value; raises ``ValueError`` with a one-line
    ``expected ..., got ...`` message.
    """

    name: str
    type: str
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"{self.name}: type expected one of {', '.join(TYPES)}, got {self.type!r}")

    def expected(self) -> str:
        """What a valid value looks like, for messages and docs (``an integer >= 1``)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        what = {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a non-empty string", "format": "a number format (quant.get_format)",
                "table": "a table", "list": "a list", "any": "any value"}[self.type]
        return _range_text(self.low, self.high, what)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid (``expected ..., got ...``), or ``None``."""
        t = self.type
        ok = {"int": _is_int(value), "float": _is_num(value), "bool": isinstance(value, bool),
              "str": isinstance(value, str) and bool(value), "format": True,
              "table": isinstance(value, Mapping), "list": isinstance(value, list | tuple),
              "any": True}[t]
        if not ok:
            return f"expected {self.expected()}, got {value!r}"
        if t == "format":
            return format_error(value)
        if self.choices is not None and value not in self.choices:
            return f"expected {self.expected()}, got {value!r}"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"expected {self.expected()}, got {value!r}"
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as e:
                return str(e)
        return None


@dataclass(frozen=True)
class Option(_Typed):
    """One evaluator option.

    Attributes:
        default: the value when the option is not given (``None``: not set, the library's
            own default applies; :data:`REQUIRED`: the option must be given).
    """

    default: Any = None

    @property
    def required(self) -> bool:
        """Whether the option has no default."""
        return self.default is _REQUIRED


#: :attr:`Option.default` of an option that must be given
REQUIRED: Any = _REQUIRED


@dataclass(frozen=True)
class Param(_Typed):
    """A trial parameter an evaluator reads: a dotted name or an fnmatch pattern.

    Attributes:
        when: read only when this holds for the checked options (``None``: always).
        when_doc: the condition in words (docs, ``dse evaluators``).
        repeat: ``(option, start)``: the name holds ``{i}``, one name per index.
    """

    when: Callable[[Mapping[str, Any]], bool] | None = None
    when_doc: str = ""
    repeat: tuple[str, int] | None = None


@dataclass(frozen=True)
class Metric:
    """A metric an evaluator returns (a float, units in the name), or trial information.

    Attributes:
        name: the metric name; may hold ``{option}`` placeholders and ``{i}`` (``repeat``).
        doc: meaning and unit.
        when / when_doc / repeat: as for :class:`Param`.
    """

    name: str
    doc: str = ""
    when: Callable[[Mapping[str, Any]], bool] | None = None
    when_doc: str = ""
    repeat: tuple[str, int] | None = None


def _expand(name: str, repeat: tuple[str, int] | None, opts: Mapping[str, Any]) -> list[str]:
    fill = {k: v for k, v in opts.items() if isinstance(v, str | int | float)}
    if repeat is None:
        return [name.format(**fill)]
    key, start = repeat
    return [name.format(**fill, i=i) for i in range(start, start + int(opts[key]))]


class CheckedOptions(dict[str, Any]):
    """Options :meth:`EvaluatorSchema.check_options` returned: defaults filled, checked
    (checking them again returns them as they are)."""


@dataclass(frozen=True)
class EvaluatorSchema:
    """Everything the search needs to know about one evaluator, without building it.

    Attributes:
        name: the evaluator's registered name (in messages).
        doc: one line: what it measures.
        options: its options.
        params: the trial parameters it reads.
        metrics: the float metrics it returns.
        info: the non-float trial information it returns (docs only).
        finish: cross-option checks after the per-option ones; gets the options with
            defaults filled and returns them (possibly completed), raising a one-line
            ``ValueError`` naming the option.
        cheap: whether one evaluation costs less than a Ray round trip (about a
            millisecond), so that it runs in the driver process, no actor: ``True``,
            ``False`` or a function of the checked options (e.g. a benchmark problem is
            cheap unless it is told to sleep); ``cheap_doc`` says when, for the docs.
    """

    name: str
    doc: str
    options: tuple[Option, ...] = ()
    params: tuple[Param, ...] = ()
    metrics: tuple[Metric, ...] = ()
    info: tuple[Metric, ...] = ()
    finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    cheap: bool | Callable[[Mapping[str, Any]], bool] = False
    cheap_doc: str = ""

    def is_cheap(self, options: Mapping[str, Any]) -> bool:
        """Whether the evaluator runs in the driver process under ``options`` (checked here)."""
        if isinstance(self.cheap, bool):
            return self.cheap
        return bool(self.cheap(self.check_options(options)))

    def cheap_text(self) -> str:
        """Where it runs, in words (docs, ``dse evaluators``)."""
        if self.cheap is False:
            return "Ray actors"
        return "the driver process (cheap)" + (f" when {self.cheap_doc}" if self.cheap_doc else "")

    def option(self, name: str) -> Option:
        """The option called ``name`` (``KeyError`` if none)."""
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def check_options(self, options: Mapping[str, Any]) -> CheckedOptions:
        """Validate ``options``; return them with every default filled in.

        Raises:
            ValueError: one line, ``<name> option <key>: expected ..., got ...``.
        """
        if isinstance(options, CheckedOptions):
            return options
        known = {o.name: o for o in self.options}
        for key in options:
            if key not in known:
                raise ValueError(f"{self.name} option {key!r} is unknown; expected one of "
                                 f"{', '.join(known) or 'no options'}")
        out: dict[str, Any] = {}
        for o in self.options:
            if o.name not in options:
                if o.required:
                    raise ValueError(f"{self.name} option {o.name}: required; expected {o.expected()}"
                                     + (f" ({o.doc})" if o.doc else ""))
                out[o.name] = o.default
                continue
            value = options[o.name]
            msg = o.problem(value)
            if msg is not None:
                raise ValueError(f"{self.name} option {o.name}: {msg}")
            out[o.name] = value
        return CheckedOptions(self.finish(out) if self.finish is not None else out)

    def params_read(self, opts: Mapping[str, Any]) -> list[tuple[str, Param]]:
        """``(name or pattern, declaration)`` of every parameter read under checked ``opts``."""
        return [(n, p) for p in self.params if p.when is None or p.when(opts)
                for n in _expand(p.name, p.repeat, opts)]

    def metric_names(self, opts: Mapping[str, Any]) -> list[str]:
        """Names of the float metrics returned under checked ``opts``."""
        return [n for m in self.metrics if m.when is None or m.when(opts)
                for n in _expand(m.name, m.repeat, opts)]

    def describe(self) -> dict[str, Any]:
        """The schema as JSON-able data (what ``dse evaluators --json`` prints)."""

        def typed(x: _Typed) -> dict[str, Any]:
            d: dict[str, Any] = {"name": x.name, "type": x.type, "expected": x.expected(),
                                 "doc": x.doc}
            if x.choices is not None:
                d["choices"] = list(x.choices)
            return d

        def cond(x: Param | Metric) -> dict[str, Any]:
            d: dict[str, Any] = {}
            if x.when_doc:
                d["when"] = x.when_doc
            if x.repeat is not None:
                d["repeat"] = {"option": x.repeat[0], "start": x.repeat[1]}
            return d

        return {
            "name": self.name, "doc": self.doc,
            "options": [{**typed(o), "required": o.required,
                         "default": None if o.required else o.default} for o in self.options],
            "params": [{**typed(p), **cond(p)} for p in self.params],
            "metrics": [{"name": m.name, "doc": m.doc, **cond(m)} for m in self.metrics],
            "info": [{"name": m.name, "doc": m.doc, **cond(m)} for m in self.info],
            "runs_in": self.cheap_text(),
        }


def _cond(x: Param | Metric) -> str:
    out = []
    if x.repeat is not None:
        out.append(f"i = {x.repeat[1]} .. {x.repeat[1]} + {x.repeat[0]} - 1")
    if x.when_doc:
        out.append(f"when {x.when_doc}")
    return "; ".join(out)


def as_text(schema: EvaluatorSchema) -> str:
    """A plain-text listing of ``schema`` (what ``dse evaluators NAME`` prints)."""
    lines = [f"{schema.name}: {schema.doc}", f"  runs in: {schema.cheap_text()}", "  options:"]
    for o in schema.options:
        d = "required" if o.required else "unset" if o.default is None else f"default {o.default!r}"
        lines.append(f"    {o.name:<18} {o.expected()}; {d}. {o.doc}")
    lines.append("  parameters read:")
    for p in schema.params:
        c = _cond(p)
        lines.append(f"    {p.name:<30} {p.expected()}. {p.doc}" + (f" [{c}]" if c else ""))
    lines.append("  metrics returned:")
    for m in schema.metrics:
        c = _cond(m)
        lines.append(f"    {m.name:<30} {m.doc}" + (f" [{c}]" if c else ""))
    if schema.info:
        lines.append("  trial information (not metrics):")
        lines += [f"    {m.name:<30} {m.doc}" + (f" [{_cond(m)}]" if _cond(m) else "")
                  for m in schema.info]
    return "\n".join(lines)


def as_markdown(schemas: Sequence[EvaluatorSchema]) -> str:
    """The evaluators' reference section of docs/params.md (a test keeps it in step)."""

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    out: list[str] = []
    for sc in schemas:
        out += [f"### `{sc.name}`", "", cell(sc.doc), "", f"Runs in {cell(sc.cheap_text())}.", "",
                "| option | expected | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{o.name}` | {cell(o.expected())} | "
                f"{'required' if o.required else 'unset' if o.default is None else f'`{o.default!r}`'}"
                f" | {cell(o.doc)} |"
                for o in sc.options]
        out += ["", "| parameter read | expected | meaning |", "|---|---|---|"]
        out += [f"| `{p.name}` | {cell(p.expected())} | {cell(p.doc)}"
                f"{' (' + cell(_cond(p)) + ')' if _cond(p) else ''} |" for p in sc.params]
        out += ["", "Metrics: " + ", ".join(
            f"`{m.name}`" + (f" ({cell(_cond(m))})" if _cond(m) else "") for m in sc.metrics)
            + "."]
        if sc.info:
            out += ["", "Trial information: " + ", ".join(
                f"`{m.name}`" + (f" ({cell(_cond(m))})" if _cond(m) else "") for m in sc.info)
                + "."]
        out.append("")
    return "\n".join(out)


Build = Callable[[dict[str, Any], "EvalContext"], "Evaluator"]


@dataclass(frozen=True)
class Plugin:
    """A registrable evaluator: its schema and a builder.

    Calling it (``plugin(options, ctx)``, the registry's factory contract) checks the
    options against the schema and calls ``build`` with them, defaults filled in.
    """

    schema: EvaluatorSchema
    build: Build

    def __call__(self, options: Mapping[str, Any], ctx: EvalContext) -> Evaluator:
        return self.build(self.schema.check_options(options), ctx)

    def validate_options(self, options: Mapping[str, Any]) -> CheckedOptions:
        """The checked options with defaults (see :meth:`EvaluatorSchema.check_options`)."""
        return self.schema.check_options(options)


def schema_of(factory: Any) -> EvaluatorSchema | None:
    """The schema of a registered factory (``None`` for a plain function)."""
    return factory.schema if isinstance(factory, Plugin) else None


# ----------------------------------------------------------------------------- shared groups
# Parameter families several evaluators read. Defined once here; the libraries parse them
# (quant.QuantConfig / quant.SparsityConfig.from_params) and tests keep the two in step; the
# choices come from quant.desc (no torch).


def quant_params(names: Sequence[str] | None = None, when: Callable[[Mapping[str, Any]], bool]
                 | None = None, when_doc: str = "") -> tuple[Param, ...]:
    """The ``quant.*`` parameters (all, or those named), read by ``quant.QuantConfig``."""
    from quant.desc import KV_LAYOUTS, RATIO_RULES

    allp = (
        Param("quant.weights", "format", "default format of every Linear/Conv weight"),
        Param("quant.acts", "format", "default format of every matmul/conv input activation"),
        Param("quant.kv", "format", "K and V cache format (quantized on write)"),
        Param("quant.attn", "format", "inputs of the attention matmuls (QK^T, PV); "
              "default: quant.acts"),
        Param("quant.lqer.rank", "int", "LQER rank k for every quantized Linear (0 = off)",
              low=0),
        Param("quant.lqer.format", "format", "format of the LQER factors A, B"),
        Param("quant.ratio", "float", "share of Linear/Conv weight parameters in quant.weights "
              "(the low-precision format); the other layers get quant.ratio_high "
              "(docs/quant.md)", low=0.0, high=1.0),
        Param("quant.ratio_rule", "str", "which layers go low first: depth (from the input), "
              "sensitivity (calibration-measured), random (study seed)", choices=RATIO_RULES),
        Param("quant.ratio_high", "format", "format of the layers outside the low-precision "
              "share (default bf16; wider than quant.weights)"),
        Param("quant.kv_k_layout", "str", "K cache layout: token (per token, along head_dim) "
              "or channel (per channel, along tokens; KIVI)", choices=KV_LAYOUTS),
        Param("quant.kv_v_layout", "str", "V cache layout: token or channel",
              choices=KV_LAYOUTS),
        Param("quant.kv_window", "int", "most recent tokens of every query's past kept in "
              "full precision (0 = none; causal attention only)", low=0),
        Param("quant.layer.*.weights", "format", "weight format of modules whose qualified "
              "name matches the pattern (fnmatch glob; the longest pattern wins)"),
        Param("quant.layer.*.acts", "format", "input-activation format of matching modules"),
    )
    chosen = allp if names is None else tuple(p for p in allp if p.name in names)
    return tuple(Param(**{**p.__dict__, "when": when, "when_doc": when_doc}) for p in chosen)


def sparsity_params(names: Sequence[str] | None = None, when: Callable[[Mapping[str, Any]],
                    bool] | None = None, when_doc: str = "") -> tuple[Param, ...]:
    """The ``sparsity.*`` parameters (all, or those named), read by ``quant.SparsityConfig``."""
    from quant.desc import SALIENCES

    allp = (
        Param("sparsity.density", "float", "weight density kept by the static mask, every "
              "prunable layer", low=0.0, high=1.0),
        Param("sparsity.salience", "str", "how weights are ranked for the mask",
              choices=SALIENCES),
        Param("sparsity.act_threshold", "float", "activations with |a| < threshold are "
              "zeroed (HASS)", low=0.0),
        Param("sparsity.layer.*.density", "float", "per-layer density override", low=0.0,
              high=1.0),
        Param("sparsity.layer.*.act_threshold", "float", "per-layer threshold override",
              low=0.0),
    )
    chosen = allp if names is None else tuple(p for p in allp if p.name in names)
    return tuple(Param(**{**p.__dict__, "when": when, "when_doc": when_doc}) for p in chosen)


def finetune_params() -> tuple[Param, ...]:
    """The ``finetune.*`` parameters, read by ``quant.FinetuneConfig`` (quant/finetune.py)."""
    from quant.desc import FINETUNE_PARAMS, SALIENCES

    return (
        Param("finetune.steps", "int", "Adam steps of a masked fine-tune on the calibration "
              "split before quantization (0 = none)", low=0),
        Param("finetune.lr", "float", "fine-tune learning rate", low=0.0),
        Param("finetune.params", "str", "which parameters train: masked (kept weights of "
              "prunable layers + biases), all, salience (SPEFT subset)",
              choices=FINETUNE_PARAMS),
        Param("finetune.density", "float", "salience mode: share of each layer's weights "
              "that trains", low=0.0, high=1.0),
        Param("finetune.salience", "str", "salience mode: the metric choosing them",
              choices=SALIENCES),
    )


def flag(name: str, doc: str, default: bool) -> Option:
    """A boolean option."""
    return Option(name, "bool", doc, default=default)


def positive_int(name: str, doc: str, default: Any = None, low: int = 1) -> Option:
    """An integer option >= ``low``."""
    return Option(name, "int", doc, low=low, default=default)


def merge(*groups: Sequence[Any]) -> tuple[Any, ...]:
    """Concatenate option/parameter/metric groups into one tuple."""
    return tuple(x for g in groups for x in g)


__all__ = ["CheckedOptions", "EvaluatorSchema", "Metric", "Option", "Param", "Plugin", "REQUIRED", "TYPES",
           "as_markdown", "as_text",
           "flag", "format_error", "merge", "positive_int", "quant_params", "schema_of",
           "sparsity_params", "finetune_params"]
