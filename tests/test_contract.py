"""The parameter contract: evaluator schemas (dse.schema) checked by `dse validate`/`run`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dse import registry
from dse.cli import main
from dse.schema import CheckedOptions, EvaluatorSchema
from dse.spec import SpecError, load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLENA = (EXAMPLES / "plena_vs_baselines.toml").read_text()
QUICK = (EXAMPLES / "quickstart.toml").read_text()
HASS = (EXAMPLES / "hass_glyph_cnn.toml").read_text()
RESNET = (EXAMPLES / "hass_resnet18_u250.toml").read_text()


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    return e.value.errors


def test_every_builtin_has_a_schema() -> None:
    # built-ins are registered by "module:factory" path; other test modules register plain
    # factory objects (test_driver's test_broken, ...) that need no schema
    for name in [n for n in registry.names() if n in registry._BUILTIN]:
        sc = registry.schema(name)
        assert isinstance(sc, EvaluatorSchema) and sc.name == name, name
        assert sc.metrics and sc.params, name


def test_unread_parameter_rejected() -> None:
    bad = PLENA.replace("mlen = {", "mlne = {").replace('"hw.mlen" = 4096\n', "")
    (line,) = errors(bad)
    assert line.startswith("<spec>: space.hw.mlne: expected a parameter an evaluator reads")
    assert "did you mean 'hw.mlen'?" in line


def test_unparsable_format_choice_rejected() -> None:
    bad = PLENA.replace('weights = { choices = ["mxint4",', 'weights = { choices = ["mxint44", "mxint4",')
    (line,) = errors(bad)
    assert line.startswith("<spec>: space.quant.weights.choices: expected a format")
    assert "'mxint44'" in line and "plena reads quant.weights" in line


def test_unknown_objective_and_constraint_metric_rejected() -> None:
    bad = QUICK.replace('metric = "area_mm2"', 'metric = "area_mm"').replace(
        'metric = "fits_memory"', 'metric = "fits_memroy"')
    lines = errors(bad)
    assert [ln.split(":")[1].strip() for ln in lines] == ["objectives[1].metric",
                                                          "constraints[0].metric"]
    assert "did you mean 'area_mm2'?" in lines[0]


@pytest.mark.parametrize("text,old,new,field", [
    # accuracy evaluator (lm): an unknown option, a bad fidelity, a bad lqer rank range
    (QUICK, "budget_tokens = 4096 }", "budget_token = 4096 }", "evaluators[0].options"),
    (QUICK, "budget_tokens = 4096 }", 'budget_tokens = 4096, fidelity = "fast" }',
     "evaluators[0].options"),
    # accuracy evaluator (vision): a salience that does not exist
    (HASS, 'salience = { value = "magnitude" }', 'salience = { value = "magnitud" }',
     "space.sparsity.salience.value"),
    # dataflow: a density outside [0, 1]; folding parameters while the optimiser chooses
    (RESNET, "[space.sparsity.layer.fc]\ndensity = { type = \"float\", low = 0.1, high = 1.0 }",
     "[space.sparsity.layer.fc]\ndensity = { type = \"float\", low = 0.1, high = 1.5 }",
     "space.sparsity.layer.fc.density.high"),
    (RESNET, "[[evaluators]]", '[space.hw.layer.conv1]\nfine = { choices = [1, 3] }\n[[evaluators]]',
     "space.hw.layer.conv1.fine"),
    # plena family: an int parameter searched as floats; a baseline with a bad preset
    (PLENA, "vlen = { choices = [1024, 2048, 4096, 8192] }",
     'vlen = { type = "float", low = 1024.0, high = 8192.0 }', "space.hw.vlen.type"),
    (PLENA, 'preset = "a100"', 'preset = "b100"', "evaluators[1].options"),
    # benchmark problems: a variable beyond n_vars; a metric beyond n_obj
    ((EXAMPLES / "zdt1.toml").read_text(), "[[evaluators]]",
     '[space.x.extra]\n9 = { type = "float", low = 0.0, high = 1.0 }\n[[evaluators]]', None),
])
def test_each_family_rejects_its_typos(text: str, old: str, new: str, field: str | None) -> None:
    assert old in text
    lines = errors(text.replace(old, new, 1))
    assert len(lines) == 1, lines
    if field is not None:
        assert lines[0].startswith(f"<spec>: {field}:"), lines


def test_quant_kv_not_read_by_dataflow_alone() -> None:
    bad = RESNET.replace("acts = { value = \"int8\" }", "acts = { value = \"int8\" }\n"
                         "kv = { value = \"int4\" }")
    (line,) = errors(bad)
    assert line.startswith("<spec>: space.quant.kv: expected a parameter an evaluator reads")


def test_conditional_reads_follow_options() -> None:
    # gpu reads hw.* only with iso = true: alone, without iso, hw.mlen is unread
    head, _, _ = PLENA.partition("[[evaluators]]")
    gpu_only = head.replace('"hw.mlen" = 4096\n"hw.blen" = 32\n"hw.vlen" = 4096\n', "") + (
        '[[evaluators]]\nname = "gpu"\noptions = { preset = "a100", model = "llama-3.1-8b", '
        'follow_quant = true }\n')
    gpu_only = gpu_only.replace('metric = "tokens_per_s"', 'metric = "a100_tokens_per_s"').replace(
        'metric = "area_mm2"', 'metric = "a100_tpot_s"').replace(
        'metric = "fits_memory"', 'metric = "a100_fits_memory"')
    lines = errors(gpu_only)
    assert all(re.match(r"<spec>: space\.hw\.\w+: expected a parameter an evaluator reads", ln)
               for ln in lines) and len(lines) == 9, lines


def test_when_only_parameter_is_accepted() -> None:
    # a parameter that only conditions others (when) is read by no evaluator, and allowed
    text = PLENA.replace("[space.quant]", '[space.mode]\nbig = { choices = ["a", "b"] }\n'
                         "[space.quant]").replace(
        'kv = { choices = ["mxint4", "mxint8", "bf16"] }',
        'kv = { choices = ["mxint4", "mxint8", "bf16"], when = { "mode.big" = ["a"] } }')
    parse_spec(text)


def test_plain_factory_without_schema_skips_reads_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    def factory(options: dict, ctx: registry.EvalContext) -> object:
        raise AssertionError("not built by validation")

    monkeypatch.setitem(registry._LOADED, "contract_plain", factory)  # removed afterwards
    text = (EXAMPLES / "zdt1.toml").read_text().replace('name = "zdt1"\n', 'name = "contract_plain"\n', 1)
    text = text.replace('[[evaluators]]\nname = "zdt1"', '[[evaluators]]\nname = "contract_plain"')
    s = parse_spec(text.replace('metric = "f1"', 'metric = "anything"'))
    assert s.evaluators[0].name == "contract_plain"


def test_cli_validate_and_run_exit_2_nothing_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(PLENA.replace("mlen = {", "mlne = {").replace('"hw.mlen" = 4096\n', ""))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "space.hw.mlne" in err[0]
    root = tmp_path / "studies"
    assert main(["run", str(bad), "--dir", str(root), "--no-tracking"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not root.exists()


def test_examples_validate() -> None:
    for path in sorted(EXAMPLES.glob("*.toml")):
        load_spec(path)


def test_checked_options_are_idempotent() -> None:
    for name in ("zdt1", "dtlz2", "plena", "gpu", "tpu"):
        sc = registry.schema(name)
        assert sc is not None
        once = sc.check_options({})
        assert isinstance(once, CheckedOptions) and sc.check_options(once) is once
    sc = registry.schema("dataflow")
    assert sc is not None and sc.check_options({"network": "resnet18"})["device"] == "u250"


@pytest.mark.parametrize("name,options,params,upstream", [
    ("zdt1", {"n_vars": 3}, {"x.0": 0.2, "x.1": 0.5, "x.2": 0.1}, {}),
    ("dtlz2", {"n_obj": 4, "n_vars": 6}, {f"x.{i}": 0.3 for i in range(6)}, {}),
    ("plena", {"breakdown": True}, {"hw.mlen": 1024, "quant.weights": "mxint4"}, {}),
    ("gpu", {"iso": True}, {"hw.mlen": 1024}, {"tokens_per_s": 10.0}),
    ("tpu", {"prefix": "t_"}, {}, {"tokens_per_s": 10.0}),
    ("dataflow", {"network": "resnet18"}, {"quant.weights": "int8", "quant.acts": "int8"}, {}),
    ("char_lm", {"budget_tokens": 256, "proxy_tokens": 128, "fidelity": "proxy", "cache": False},
     {"quant.weights": "mxint4", "sparsity.density": 0.5}, {}),
    ("glyph_cnn", {"budget_images": 64, "proxy_images": 32, "sparsity_images": 8,
                   "calib_batches": 1, "fidelity": "proxy", "cache": False},
     {"quant.weights": "mxint4", "sparsity.density": 0.5}, {}),
])
def test_schema_metrics_are_what_the_evaluator_returns(
    name: str, options: dict, params: dict, upstream: dict, tmp_path: Path
) -> None:
    """The schema's metric names equal the float results, and its info the other ones."""
    import torch

    torch.set_num_threads(1)
    factory = registry.get(name)
    sc = registry.schema(name)
    assert sc is not None
    ctx = registry.EvalContext(tmp_path, name=name)
    out = factory(options, ctx).evaluate(params, upstream)
    floats = {k for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert all(math.isfinite(out[k]) for k in floats)
    opts = sc.check_options(options)
    assert floats == set(sc.metric_names(opts))
    info = {m.name.format(**{k: v for k, v in opts.items() if isinstance(v, str)}) for m in sc.info}
    assert set(out) - floats <= info


def test_docs_params_reference_is_generated_from_the_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    text = (EXAMPLES.parent / "docs" / "params.md").read_text()
    begin, end = "<!-- evaluators:begin -->\n", "<!-- evaluators:end -->"
    documented = text[text.index(begin) + len(begin): text.index(end)]
    assert main(["evaluators", "--markdown"]) == 0
    assert documented == capsys.readouterr().out, "regenerate: dse evaluators --markdown"


def test_cli_evaluators_lists_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["evaluators", "plena", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["plena"]
    assert "hw.mlen" in [p["name"] for p in d["params"]]
    assert "area_mm2" in [m["name"] for m in d["metrics"]]
    assert main(["evaluators", "zdt1"]) == 0
    assert "{prefix}.{i}" in capsys.readouterr().out
    assert main(["evaluators", "zdt9"]) == 2


def _sample(decl: object) -> object:
    from dse.schema import Param

    assert isinstance(decl, Param)
    if decl.type == "format":
        return "mxint8"
    if decl.choices is not None:
        return decl.choices[0]
    if decl.type == "int":
        return int(decl.low or 0) + 1
    return 0.5 if decl.high is None or decl.high >= 0.5 else decl.high


def test_quant_and_sparsity_groups_match_the_library_parsers() -> None:
    """Every quant.*/sparsity.* name a schema declares is one quant's parsers accept (and
    the parsers reject a name no schema declares)."""
    from dse.schema import quant_params, sparsity_params
    from quant import QuantConfig, SparsityConfig

    for decl in quant_params():
        name = decl.name.replace("*", "blocks.0.mlp")
        QuantConfig.from_params({"quant.weights": "mxint4", name: _sample(decl)})
    for decl in sparsity_params():
        name = decl.name.replace("*", "blocks.0.mlp")
        SparsityConfig.from_params({name: _sample(decl)})
    with pytest.raises(ValueError, match="quant.wieghts"):
        QuantConfig.from_params({"quant.wieghts": "mxint8"})
    with pytest.raises(ValueError, match="sparsity.densty"):
        SparsityConfig.from_params({"sparsity.densty": 0.5})


def test_docs_params_hand_tables_match_the_schemas() -> None:
    """The quant.* / sparsity.* tables and the metrics paragraph of docs/params.md name
    exactly what the schemas declare (no documented name the search would reject)."""
    from dse.schema import quant_params, sparsity_params

    text = (EXAMPLES.parent / "docs" / "params.md").read_text()
    hand = text[: text.index("<!-- evaluators:begin -->")]

    def table_names(prefix: str) -> set[str]:
        names: set[str] = set()
        for row in re.findall(r"^\| (`[^|]+`) \|", hand, flags=re.M):
            for name in re.findall(r"`([^`]+)`", row):
                if name.startswith(prefix):
                    names.add(name.replace("<pattern>", "*"))
        return names

    assert table_names("quant.") == {p.name for p in quant_params()}
    assert table_names("sparsity.") == {p.name for p in sparsity_params()}
    para = hand[hand.index("## Metrics"):]
    documented = set(re.findall(r"`([a-z_0-9]+)`", para))
    schemas = [registry.schema(n) for n in registry.names()]
    returned = {m.name for sc in schemas if sc is not None for m in sc.metrics}
    assert documented <= returned, documented - returned
