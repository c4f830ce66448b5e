"""The run configuration: precedence, --set parsing, validation and hashing (benchmark/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from benchmark.config import (RunConfig, build_config, coerce_to_fields, config_hash, parse_assignment,
                              read_yaml)
from benchmark.errors import BenchmarkError, ConfigError


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ precedence


def test_defaults_without_any_layer():
    config = build_config()
    assert config == RunConfig()
    assert config.scenario == "synthetic"
    assert config.methods == ["zeroshot", "finetune"]
    assert config.protocol.gallery == "union" and config.protocol.task_identity == "inferred"
    assert config.protocol.tasks == "seen"
    assert config.seeds == [0]


def test_precedence_defaults_yaml_options_set(tmp_path):
    default_epochs = RunConfig().training.epochs
    yaml_file = write(tmp_path / "run.yaml", "training: {epochs: 5, batch_size: 16}\nseeds: [1, 2]\n"
                                             "output_dir: from_yaml\n")

    only_yaml = build_config(yaml_file)
    assert only_yaml.training.epochs == 5 != default_epochs
    assert only_yaml.training.batch_size == 16
    assert only_yaml.seeds == [1, 2]
    # a YAML section only overrides the keys it names
    assert only_yaml.training.eval_batch_size == RunConfig().training.eval_batch_size

    with_options = build_config(yaml_file, {"training": {"epochs": 7}, "output_dir": None, "seeds": [4]})
    assert with_options.training.epochs == 7
    assert with_options.training.batch_size == 16  # kept from the YAML: options merge into sections
    assert with_options.output_dir == "from_yaml"  # None means "option not given"
    assert with_options.seeds == [4]

    with_set = build_config(yaml_file, {"training": {"epochs": 7}, "seeds": [4]},
                            ["training.epochs=9", "seeds=[5, 6]"])
    assert with_set.training.epochs == 9
    assert with_set.seeds == [5, 6]
    assert with_set.training.batch_size == 16


def test_later_set_wins_over_earlier_set():
    config = build_config(None, None, ["training.epochs=2", "training.epochs=4"])
    assert config.training.epochs == 4


def test_set_values_are_yaml_parsed():
    config = build_config(None, None, [
        "scenario_options.tasks=[colours, backdrops]",
        "scenario_options.train_images=16",
        "method_params.finetune.lr=1.0e-4",
        "protocol.gallery=per_task",
        "backbone=clvl-tiny",
        "seeds=3",
    ])
    assert config.scenario_options == {"tasks": ["colours", "backdrops"], "train_images": 16}
    assert config.method_params == {"finetune": {"lr": 1e-4}}
    assert isinstance(config.scenario_options["train_images"], int)
    assert config.protocol.gallery == "per_task"
    assert config.backbone == "clvl-tiny"
    assert config.seeds == [3]  # a single integer becomes a one-seed list


def test_set_merges_into_yaml_mappings(tmp_path):
    yaml_file = write(tmp_path / "run.yaml", "scenario_options: {train_images: 40, test_images: 8}\n"
                                             "method_params: {finetune: {lr: 0.001, replay_memory: 10}}\n")
    config = build_config(yaml_file, None, ["scenario_options.train_images=12",
                                            "method_params.finetune.replay_memory=0"])
    assert config.scenario_options == {"train_images": 12, "test_images": 8}
    assert config.method_params == {"finetune": {"lr": 0.001, "replay_memory": 0}}


def test_parse_assignment_nests_dotted_keys():
    assert parse_assignment("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_assignment("seeds=[0, 1]") == {"seeds": [0, 1]}
    assert parse_assignment("output_dir=") == {"output_dir": ""}
    # a value YAML cannot parse is kept as the raw string
    assert parse_assignment("backbone=a: b: c") == {"backbone": "a: b: c"}


@pytest.mark.parametrize("text", ["training.epochs", "=3", " =3"])
def test_parse_assignment_rejects_non_assignments(text):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment(text)


def test_methods_given_as_comma_string_in_yaml(tmp_path):
    config = build_config(write(tmp_path / "run.yaml", "methods: zeroshot, finetune\n"))
    assert config.methods == ["zeroshot", "finetune"]


# ------------------------------------------------------------------------------ coercion


@dataclass
class _Params:
    lr: float = 1e-4
    steps: int = 10
    flag: bool = False
    parts: list[str] = field(default_factory=list)
    name: str = "x"


def test_coerce_to_fields_converts_cli_strings():
    # YAML reads "5e-4" (no dot) as a string
    raw = parse_assignment("method_params.m.lr=5e-4")["method_params"]["m"]
    assert raw == {"lr": "5e-4"}
    converted = coerce_to_fields(_Params, {**raw, "steps": "3", "parts": "visual, text", "flag": True},
                                 "method_params.m")
    assert converted == {"lr": 5e-4, "steps": 3, "parts": ["visual", "text"], "flag": True}
    assert isinstance(converted["lr"], float) and isinstance(converted["steps"], int)
    assert coerce_to_fields(_Params, {"lr": 1}, "w") == {"lr": 1.0}
    assert isinstance(coerce_to_fields(_Params, {"lr": 1}, "w")["lr"], float)
    assert coerce_to_fields(_Params, {"steps": 4.0}, "w") == {"steps": 4}
    assert coerce_to_fields(_Params, {"name": "y"}, "w") == {"name": "y"}


@pytest.mark.parametrize("values, named", [
    ({"lr": "fast"}, "method_params.m.lr"),
    ({"steps": "many"}, "method_params.m.steps"),
    ({"steps": 2.5}, "method_params.m.steps"),
    ({"steps": True}, "method_params.m.steps"),
    ({"lr": False}, "method_params.m.lr"),
    ({"flag": "yes please"}, "method_params.m.flag"),
    ({"lr": [1, 2]}, "method_params.m.lr"),
])
def test_coerce_to_fields_rejects_with_the_field_name(values, named):
    with pytest.raises(ConfigError) as info:
        coerce_to_fields(_Params, values, "method_params.m")
    assert named in str(info.value)


# ------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize("assignment, unknown, suggestion", [
    ("scenaro=synthetic", "'scenaro'", "'scenario'"),
    ("seed=[1]", "'seed'", "'seeds'"),
    ("training.epoch=3", "training.'epoch'", "training.'epochs'"),
    ("training.batchsize=8", "training.'batchsize'", "training.'batch_size'"),
    ("protocol.galery=union", "protocol.'galery'", "protocol.'gallery'"),
    ("protocol.task=seen", "protocol.'task'", "protocol.'tasks'"),
])
def test_unknown_field_is_named_with_suggestion(assignment, unknown, suggestion):
    with pytest.raises(ConfigError) as info:
        build_config(None, None, [assignment])
    message = str(info.value)
    assert f"unknown config field {unknown}" in message
    assert f"did you mean {suggestion}?" in message


def test_unknown_field_without_a_close_match_lists_known_fields():
    with pytest.raises(ConfigError) as info:
        build_config(None, None, ["zzzzzz=1"])
    assert "'zzzzzz'" in str(info.value) and "did you mean" not in str(info.value)
    assert "scenario_options" in str(info.value)


def test_unknown_field_in_yaml_is_an_error(tmp_path):
    yaml_file = write(tmp_path / "run.yaml", "training:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        build_config(yaml_file)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="'training' must be a mapping"):
        build_config(None, None, ["training=3"])
    with pytest.raises(ConfigError, match="'scenario_options' must be a mapping"):
        build_config(None, None, ["scenario_options=[1, 2]"])


# ------------------------------------------------------------------------------ YAML files


def test_malformed_yaml_reports_line_and_column(tmp_path):
    yaml_file = write(tmp_path / "bad.yaml", "scenario: synthetic\nmethods: [zeroshot, finetune\n"
                                             "training: {epochs: 2}\n")
    with pytest.raises(ConfigError) as info:
        build_config(yaml_file)
    message = str(info.value)
    assert "malformed YAML" in message and str(yaml_file) in message
    assert "line 3" in message and "column " in message
    assert "\n" not in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(write(tmp_path / "list.yaml", "- zeroshot\n- finetune\n"))
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(write(tmp_path / "scalar.yaml", "42\n"))


def test_empty_yaml_gives_defaults(tmp_path):
    assert build_config(write(tmp_path / "empty.yaml", "# nothing here\n")) == RunConfig()


def test_missing_and_non_utf8_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "nope.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"scenario: \xff\xfe\x00synthetic\n")
    with pytest.raises(ConfigError):
        build_config(binary)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("assignment, fragment", [
    ("protocol.gallery=everything", "protocol.gallery"),
    ("protocol.task_identity=oracle", "protocol.task_identity"),
    ("protocol.tasks=future", "protocol.tasks"),
])
def test_bad_protocol_values(assignment, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(None, None, [assignment])
    assert fragment in str(info.value)
    assert assignment.split("=")[1] in str(info.value)


def test_protocol_object_matches_the_config():
    config = build_config(None, {"protocol": {"gallery": "per_task", "task_identity": "given", "tasks": "all"}})
    protocol = config.protocol_object()
    assert (protocol.gallery, protocol.task_identity, protocol.tasks) == ("per_task", "given", "all")


@pytest.mark.parametrize("batch_size", [1, 0, -4])
def test_batch_size_below_two_is_rejected(batch_size):
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(None, {"training": {"batch_size": batch_size}})


def test_batch_size_two_is_fine():
    assert build_config(None, {"training": {"batch_size": 2}}).training.batch_size == 2


@pytest.mark.parametrize("assignment", ["training.epochs=0", "training.epochs=three", "training.eval_batch_size=0",
                                        "training.num_workers=-1", "training.epochs=1.5", "training.epochs=true",
                                        "training.num_workers=false"])
def test_bad_training_values(assignment):
    with pytest.raises(ConfigError, match=assignment.split("=")[0].split(".")[1]):
        build_config(None, None, [assignment])


def test_method_params_for_a_method_not_run():
    with pytest.raises(ConfigError) as info:
        build_config(None, {"methods": ["zeroshot"]}, ["method_params.finetune.lr=0.1"])
    assert "'finetune'" in str(info.value) and "zeroshot" in str(info.value)
    # naming a method that is run is fine
    config = build_config(None, {"methods": ["finetune"]}, ["method_params.finetune.lr=0.1"])
    assert config.method_params == {"finetune": {"lr": 0.1}}


@pytest.mark.parametrize("assignment", ["seeds=[]", "seeds=[a, b]", "seeds=[1.5]", "seeds=zero", "seeds={a: 1}",
                                        "seeds=[true]"])
def test_bad_seeds(assignment):
    with pytest.raises(ConfigError, match="seeds"):
        build_config(None, None, [assignment])


def test_good_seeds():
    assert build_config(None, None, ["seeds=[0, 1, 2]"]).seeds == [0, 1, 2]
    assert build_config(None, {"seeds": [7]}).seeds == [7]


@pytest.mark.parametrize("assignment, fragment", [
    ("methods=[]", "methods"),
    ("methods=[zeroshot, zeroshot]", "twice"),
    ("methods=[1, 2]", "methods"),
    ("device=tpu", "device"),
    ("device=0", "device"),  # YAML reads it as an int
    ("scenario=3", "scenario"),
    ("scenario=[synthetic]", "scenario"),
    ("backbone=[a, b]", "backbone"),
    ("force=2", "force"),
    ("method_params.finetune=3", "method_params.finetune"),
])
def test_bad_methods_and_device(assignment, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(None, None, [assignment])


def test_numeric_paths_become_strings():
    config = build_config(None, None, ["output_dir=2024", "data_root=7", "cache_dir=1.5"])
    assert (config.output_dir, config.data_root, config.cache_dir) == ("2024", "7", "1.5")
    assert build_config(None, None, ["backbone=null"]).backbone is None


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, BenchmarkError)
    assert ConfigError.exit_code == 2


# ------------------------------------------------------------------------------ hashing


def test_config_hash_is_stable_under_key_order():
    a = {"method": "finetune", "seed": 0, "params": {"lr": 1e-4, "replay_memory": 0}, "tasks": ["x", "y"]}
    b = {"tasks": ["x", "y"], "params": {"replay_memory": 0, "lr": 1e-4}, "seed": 0, "method": "finetune"}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) == config_hash(dict(a))
    assert len(config_hash(a)) == 64 and int(config_hash(a), 16) >= 0


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"method": "zeroshot"}, {"params": {"lr": 2e-4, "replay_memory": 0}},
    {"tasks": ["y", "x"]},  # list order matters: task order changes results
])
def test_config_hash_changes_with_a_value(change):
    base = {"method": "finetune", "seed": 0, "params": {"lr": 1e-4, "replay_memory": 0}, "tasks": ["x", "y"]}
    assert config_hash(base) != config_hash({**base, **change})


def test_config_hash_of_effective_configs():
    one = build_config(None, None, ["training.epochs=2"]).to_dict()
    same = build_config(None, {"training": {"epochs": 2}}).to_dict()
    other = build_config(None, None, ["training.epochs=3"]).to_dict()
    assert config_hash(one) == config_hash(same)
    assert config_hash(one) != config_hash(other)


# ------------------------------------------------------------------------------ the one validator


@dataclass
class _Checked:
    rate: float = 0.5
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must lie in [0, 1], got {self.rate}")


def test_from_mapping_converts_checks_keys_and_values():
    from benchmark.config import from_mapping

    built = from_mapping(_Checked, {"rate": "2.5e-1", "names": "a, b"}, "thing")
    assert built == _Checked(rate=0.25, names=["a", "b"]) and isinstance(built.rate, float)
    assert from_mapping(_Checked, None, "thing") == _Checked()
    with pytest.raises(ConfigError) as info:
        from_mapping(_Checked, {"rat": 1}, "thing", unknown="no {key!r} in {where}{hint}; fields: {known}")
    assert str(info.value) == "no 'rat' in thing (did you mean 'rate'?); fields: names, rate"
    with pytest.raises(ConfigError, match=r"^thing\.rate must be float, got 'high'$"):
        from_mapping(_Checked, {"rate": "high"}, "thing")
    with pytest.raises(ConfigError) as info:
        from_mapping(_Checked, {"rate": 3}, "thing", invalid="bad {where}: {error}")
    assert str(info.value) == "bad thing: rate must lie in [0, 1], got 3.0"
    with pytest.raises(ConfigError, match="thing must be a mapping, got list"):
        from_mapping(_Checked, [1], "thing")


def test_one_protocol_class_for_config_and_evaluation():
    from benchmark import evaluation
    from benchmark.config import Protocol, ProtocolConfig

    assert ProtocolConfig is Protocol is evaluation.Protocol
    config = build_config(None, {"protocol": {"tasks": "all"}})
    assert type(config.protocol) is Protocol and config.protocol_object() is config.protocol
    assert config.protocol == Protocol(tasks="all")
    with pytest.raises(ValueError, match="protocol.gallery must be one of union, per_task"):
        Protocol(gallery="everything")


def test_sections_check_their_values_when_built():
    from benchmark.config import TrainingConfig

    with pytest.raises(ConfigError, match="training.batch_size must be at least 2"):
        TrainingConfig(batch_size=1)
    with pytest.raises(ConfigError, match="training.epochs must be a positive integer"):
        RunConfig(training=TrainingConfig(epochs=0))
    with pytest.raises(ConfigError, match="seeds must be a non-empty list"):
        RunConfig(seeds=[])
    # a section given as a mapping in code is read by the same validator
    assert RunConfig(protocol={"gallery": "per_task"}).protocol.gallery == "per_task"
    with pytest.raises(ConfigError, match="unknown config field protocol.'galery'"):
        RunConfig(protocol={"galery": "per_task"})


# ------------------------------------------------------------------ one name per method (out-of-tree methods)
EXAMPLE = "examples.my_method:TextPromptTuning"  # its class's `name` is "textprompt"


@pytest.fixture
def repo_on_path(monkeypatch):
    """``examples`` from this repository (avalanche-lib ships a package of that name too)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("key", ["textprompt", EXAMPLE], ids=["class-name", "module-class-path"])
def test_set_method_params_of_an_out_of_tree_method(repo_on_path, key):
    """`--set method_params.<key>.num_tokens=8` for a method given as package.module:Class: by
    its class's `name`, or by the path itself (kept whole despite its dots); stored by the name."""
    config = build_config(None, {"methods": ["zeroshot", EXAMPLE]}, [f"method_params.{key}.num_tokens=8"])
    assert config.method_params == {"textprompt": {"num_tokens": 8}}


def test_yaml_method_params_by_path_and_by_name_are_merged(repo_on_path, tmp_path):
    yaml_file = write(tmp_path / "run.yaml", f"methods: [{EXAMPLE}]\nmethod_params:\n"
                                             f"  '{EXAMPLE}': {{lr: 0.1}}\n  textprompt: {{num_tokens: 2}}\n")
    config = build_config(yaml_file, None, ["method_params.textprompt.lr=0.1"])
    assert config.method_params == {"textprompt": {"lr": 0.1, "num_tokens": 2}}
    with pytest.raises(ConfigError, match="textprompt.lr twice"):
        build_config(yaml_file, None, ["method_params.textprompt.lr=0.5"])


def test_method_params_for_an_unselected_out_of_tree_name(repo_on_path):
    with pytest.raises(ConfigError) as info:
        build_config(None, {"methods": [EXAMPLE]}, ["method_params.textprompts.lr=0.1"])
    message = str(info.value)
    assert "'textprompts'" in message and f"textprompt ({EXAMPLE})" in message and "did you mean" in message
