"""Every registered plug-in meets its kind's contract, and the contract check itself catches the
mistakes it is there for (a plug-in written without reading it)."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qsweep import cli, config, contracts, plan, plugins
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.engines.base import ENGINES, Engine, EngineConfig
from qsweep.engines.served import FullDistribution, ScoresPrompt, ServedModel, Tokenizes
from qsweep.methods.base import METHODS
from qsweep.settings import NEUTRAL, SPEED_ONLY, neutral, result_settings

config.register()
EVERY = [
    (registry.kind, name, plugin) for registry in plugins.registries() for name, plugin in registry.items()
]


@pytest.mark.parametrize("kind,name,plugin", EVERY, ids=[f"{k}:{n}" for k, n, _ in EVERY])
def test_registered_plugin_meets_its_contract(kind, name, plugin):
    assert contracts.problems(plugin) == []
    assert type(plugin).name == name


def test_each_plugin_has_its_own_schema_and_an_option_that_composes_to_it():
    """One registration gives the schema; at least one YAML option of the group uses it."""
    for registry in plugins.registries():
        schemas = [plugin.Config for _, plugin in registry.items()]
        assert len(schemas) == len(set(schemas)), f"two {registry.kind}s share a Config"
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        for registry in (METHODS, ENGINES):
            used = {
                type(plan_config(registry.group, option)).__name__
                for option in cli.group_options(registry.group)
            }
            for name, plugin in registry.items():
                assert plugin.Config.__name__ in used, f"no conf/{registry.group}/ option uses {name}_schema"
        for name, _ in BENCHMARKS.items():
            assert name in cli.group_options("benchmark"), f"conf/benchmark/{name}.yaml is missing"


def test_plugin_options_select_nothing_but_their_schema():
    """A model, method or engine option's defaults list names only its schema: choosing one cannot
    change which benchmarks run (plan.benchmark_order relies on it)."""
    import yaml

    for group in plan.PLUGIN_GROUPS:
        for path in sorted((config.CONF_DIR / group).glob("*.yaml")):
            defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
            own = [d for d in defaults if isinstance(d, str) and (d == "_self_" or config.is_schema(d))]
            extra = [d for d in defaults if d not in own]
            assert not extra, f"{path}: its defaults list selects {extra}"


def plan_config(group: str, option: str):
    from omegaconf import OmegaConf

    overrides = [f"{group}={option}"] + (["model.path=/x"] if group == "model" else [])
    return OmegaConf.to_object(compose("config", overrides=overrides)[group])


def test_each_benchmark_option_is_a_typed_field_of_the_benchmark_section_empty_until_selected():
    """Every conf/benchmark/*.yaml option (read from the folder, not from the registry the container
    is made from) is a field of the composed `benchmark` section: None unless selected, and then
    its plug-in's own schema."""
    from omegaconf import OmegaConf

    from qsweep.benchmarks import kld, ppl

    options = sorted(path.stem for path in (config.CONF_DIR / "benchmark").glob("*.yaml"))
    assert {"ppl", "kld", "perf", "accuracy", "lmeval"} <= set(options)
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=["benchmark=[kld,ppl]"])
    section = OmegaConf.to_object(composed.benchmark)
    assert isinstance(section.kld, kld.Config) and isinstance(section.ppl, ppl.Config)
    assert [name for name in composed.benchmark if composed.benchmark[name] is not None] == ["kld", "ppl"]
    for name in set(options) - {"kld", "ppl"}:
        assert getattr(section, name) is None, name


def test_engine_capabilities_are_what_their_served_models_implement():
    llamacpp, vllm = ENGINES.get("llamacpp"), ENGINES.get("vllm")
    assert FullDistribution in llamacpp.capabilities() and FullDistribution not in vllm.capabilities()
    assert {Tokenizes, ScoresPrompt} <= llamacpp.capabilities() & vllm.capabilities()
    assert BENCHMARKS.get("kld").unmet(llamacpp.capabilities()) is None
    assert BENCHMARKS.get("kld").unmet(vllm.capabilities()) is None
    assert "ScoresPrompt" in BENCHMARKS.get("ppl").unmet(frozenset({Tokenizes}))


def test_result_neutral_settings_are_marked_where_they_are_declared():
    """What the hand-kept VOLATILE table listed is now field metadata, with vLLM's two limits that
    the table missed (a job sized for accuracy's longer requests re-measured its perplexity)."""
    volatile = {"host", "port", "startup_timeout_s", "request_timeout_s", "smoke_prompt", "smoke_max_tokens",
                "fit_to_load", "parallel", "ctx_size", "max_num_seqs", "kv_cache_gb", "max_model_len",
                "max_logprobs", "cpu_worker_in_engine"}  # fmt: skip
    for name in ("llamacpp", "vllm"):
        cfg = ENGINES.get(name).Config()
        marked = {
            f.name for f in dataclasses.fields(cfg) if f.metadata.get(NEUTRAL) or f.metadata.get(SPEED_ONLY)
        }
        assert marked == volatile & {f.name for f in dataclasses.fields(cfg)}, name
        assert set(result_settings(cfg)) == {f.name for f in dataclasses.fields(cfg)} - volatile
        # a load test's key keeps what changes speed: slots, context, batch
        speed = set(result_settings(cfg, timing=True)) - set(result_settings(cfg))
        assert speed == {f.name for f in dataclasses.fields(cfg) if f.metadata.get(SPEED_ONLY)} != set()


def test_contract_check_catches_a_careless_engine():
    @dataclasses.dataclass
    class CarelessConfig(EngineConfig):
        port: int = 8000  # redefined without neutral(): would split every result cache by port
        threads: int = neutral(4)
        request_timeout_s: int = neutral(30)  # without minimum=1: 0 would pass the pre-flight

    class NotServed:
        pass

    class HealthElsewhere(ServedModel):
        health_path = "health"  # not a path: the start-up would wait on http://host:porthealth

    class Careless(Engine):
        Config = CarelessConfig
        formats = ()
        env = None
        served_type = NotServed

        def serve(self, cfg, artifact, ctx) -> AbstractContextManager[ServedModel]:
            raise NotImplementedError

    found = contracts.problems(Careless())
    assert any("no name" in p for p in found) and any("docstring" in p for p in found)
    assert any("formats" in p for p in found) and any("served_type" in p for p in found)
    assert any("Config.port redefines a result-neutral setting" in p for p in found)
    assert any("Config.request_timeout_s redefines a setting without its `minimum=`" in p for p in found)
    Careless.served_type = HealthElsewhere
    assert any(
        "served_type.health_path must be the server's health path" in p
        for p in contracts.problems(Careless())
    )


def test_contract_check_catches_a_careless_benchmark():
    @dataclasses.dataclass
    class NeedsValue:
        path: Path  # no default: `benchmark=[careless]` alone could never compose

    class Careless(Benchmark[NeedsValue]):
        """Counts things."""

        requires = (Path,)

        def run(self, cfg, served, ctx):
            raise NotImplementedError

    found = contracts.problems(Careless())
    assert any("no capability protocol" in p for p in found)
    assert any("every setting to have a default" in p for p in found)


def test_a_registry_refuses_a_class_outside_its_kind_and_a_second_one_under_a_name():
    with pytest.raises(TypeError, match="must subclass Method"):
        METHODS.register("not-a-method")(object)
    known = type(METHODS.get("gguf"))
    with pytest.raises(ValueError, match="registered twice"):
        METHODS.register("gguf")(type("Other", (known,), {}))


def test_a_plugins_settings_are_its_contracts_type_argument_and_a_plugin_without_any_is_refused():
    """`class P(Benchmark[Config])` gives P its Config (hooks typed `cfg: Config`); a subclass
    inherits it unless it names its own; a plug-in that declares none is refused at registration."""

    @dataclasses.dataclass
    class Counted:
        items: int = 1

    @dataclasses.dataclass
    class Weighed(Counted):
        weight: float = 1.0

    class Counts(Benchmark[Counted]):
        def run(self, cfg: Counted, served, ctx):
            raise NotImplementedError

    class Weighs(Counts, Benchmark[Weighed]):
        pass

    class Inherits(Counts):
        pass

    assert (Counts.Config, Weighs.Config, Inherits.Config) == (Counted, Weighed, Counted)
    from qsweep.benchmarks import ppl
    from qsweep.engines import vllm

    assert (type(BENCHMARKS.get("ppl")).Config, type(ENGINES.get("vllm")).Config) == (ppl.Config, vllm.Config)

    class Undeclared(Benchmark):
        def run(self, cfg, served, ctx):
            raise NotImplementedError

    with pytest.raises(TypeError, match=r"no settings: subclass Benchmark\[<its Config dataclass>\]"):
        BENCHMARKS.register("undeclared")(Undeclared)
    assert "undeclared" not in BENCHMARKS.names()
