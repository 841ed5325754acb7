"""The service configuration: layers, every error message a user meets, and the config commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect import cli, config
from edge_inspect.cli import app
from edge_inspect.errors import ConfigError
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)

runner = CliRunner()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    out = {"in": tmp_path / "in", "cam": tmp_path / "clip.avi"}
    out["in"].mkdir()
    out["cam"].write_bytes(b"")
    return out


def minimal(folder: Path, model: Path | str = "m") -> str:
    return f'[sources.line2]\nkind = "folder"\npath = "{folder}"\nmodel = "{model}"\n'


# ------------------------------------------------------------------ layers


def test_defaults_file_environment_and_flags_override_in_that_order(tmp_path, folders):
    path = write(tmp_path / "c.toml", minimal(folders["in"]) + "settle = 2.0\nbatch_size = 4\n[http]\nport = 9000\n")
    env = {"EDGE_INSPECT_SOURCES__line2__SETTLE": "3", "EDGE_INSPECT_HTTP__PORT": "9100", "OTHER": "x"}
    loaded = config.load_with_origins(path, environ=env, overrides={"sources.line2.settle": 4.5})
    source = loaded.config.sources["line2"]
    assert source.settle == 4.5 and source.batch_size == 4 and source.readers == 2
    assert loaded.config.http.port == 9100
    assert loaded.origins["sources.line2.settle"] == "flag"
    assert loaded.origins["http.port"] == "environment EDGE_INSPECT_HTTP__PORT"
    assert loaded.origins["sources.line2.batch_size"] == f"file {path}"
    assert "sources.line2.readers" not in loaded.origins  # a default
    shown = {key: (value, origin) for key, value, origin in config.effective(loaded)}
    assert shown["sources.line2.readers"] == ("2", "default")
    assert shown["sources.line2.settle"] == ("4.5", "flag")


def test_durations_and_sizes_read_as_people_write_them(tmp_path, folders):
    path = write(tmp_path / "c.toml", minimal(folders["in"]) + 'settle = "1500ms"\nstale_after = "2m"\n'
                 '[sources.line2.retention]\nsorted_max_age = "7d"\nsorted_max_bytes = "2GB"\n[disk]\nmin_free = "500MiB"\n')
    loaded = config.load(path)
    source = loaded.sources["line2"]
    assert source.settle == 1.5 and source.stale_after == 120
    assert source.retention.sorted_max_age == 7 * 86400 and int(source.retention.sorted_max_bytes) == 2_000_000_000
    assert int(loaded.disk.min_free) == 500 * 2**20


def test_the_configuration_is_immutable(tmp_path, folders):
    loaded = config.load(write(tmp_path / "c.toml", minimal(folders["in"])))
    with pytest.raises(Exception, match="frozen"):
        loaded.sources["line2"].settle = 9


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("text, key, words", [
    ('batch_size = "eight"\n', "sources.line2.batch_size", "valid integer"),
    ("batch_size = 0\n", "sources.line2.batch_size", "greater than or equal to 1"),
    ("setle = 2\n", "sources.line2.setle", "unknown key"),
    ('device = "gpu"\n', "sources.line2.device", "'auto', 'cpu' or 'cuda'"),
    ('settle = "soon"\n', "sources.line2.settle", "is not a duration"),
    ("settle = 5\nsettle_unsure = 2\n", "sources.line2.settle_unsure", "at least settle"),
])
def test_a_bad_value_names_its_key_and_the_fix(tmp_path, folders, text, key, words):
    path = write(tmp_path / "c.toml", minimal(folders["in"]) + text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert f"At '{key}':" in str(caught.value) and words in str(caught.value), str(caught.value)


def test_every_problem_is_reported_at_once_one_line_each(tmp_path, folders):
    path = write(tmp_path / "c.toml", minimal(folders["in"]) + "batch_size = 0\nbogus = 1\nreaders = -1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("At 'sources.line2.") for line in lines), lines


@pytest.mark.parametrize("text, words", [
    ("", "no source"),
    ('[sources."bad name"]\nkind = "folder"\npath = "/x"\nmodel = "m"\n', "source name 'bad name'"),
    ('[sources.a]\nkind = "scanner"\nmodel = "m"\n', "kind must be"),
    ('[sources.a]\nkind = "camera"\nmodel = "m"\n', "At 'sources.a.uri': missing"),
    ('[sources.a]\nkind = "camera"\nuri = "0"\nmodel = "m"\n[sources.a.sinks]\nsort = true\n',
     "At 'sources.a.sinks.sort': a camera's frames are not files"),
    ("[sources.a]\nkind = \"folder\"\npath = \"/x\"\nmodel = \"m\"\n[sources.b]\nkind = \"folder\"\npath = \"/x\"\n"
     "model = \"m\"\n", "both use the ledger"),
    ("[sources.a]\nkind = \"folder\"\npath = \"/x\"\nmodel = \"m\"\nledger = \"/l/a.sqlite\"\nsinks.sort = true\n"
     "[sources.b]\nkind = \"folder\"\npath = \"/x\"\nmodel = \"m\"\nledger = \"/l/b.sqlite\"\nsinks.sort = true\n",
     "both use the sorted folders of /x"),
    ('[sources.a]\nkind = "camera"\nuri = "0"\nmodel = "m"\n[sources.b]\nkind = "camera"\nuri = "1"\nmodel = "m"\n',
     "both use the ledger edge-inspect-ledger.sqlite"),
    ('[sources.a]\nkind = "folder"\npath = "/x"\nmodel = "m"\nsinks.results = "/x/v.jsonl"\n',
     "lies in the watched folder"),
    ("[sources.a\n", "is not valid TOML"),
])
def test_structural_errors_say_what_to_do(tmp_path, text, words):
    with pytest.raises(ConfigError, match=None) as caught:
        config.load(write(tmp_path / "c.toml", text))
    assert words in str(caught.value), str(caught.value)


def test_a_missing_or_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist. Copy deploy/config.example.toml"):
        config.load(tmp_path / "none.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe[")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(tmp_path / "binary.toml")


def test_check_finds_what_only_the_machine_can_tell(tmp_path, folders, model_dir):  # noqa: F811
    tampered = tmp_path / "tampered"
    shutil.copytree(model_dir, tampered)
    graph = tampered / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-8] + b"12345678")
    text = (minimal(tmp_path / "missing", model_dir)
            + f'[sources.b]\nkind = "folder"\npath = "{folders["in"]}"\nmodel = "{tampered}"\n'
            + f'[sources.c]\nkind = "camera"\nuri = "rtsp://:99999/x"\nmodel = "{tmp_path / "no-model"}"\n'
            + f'ledger = "{tmp_path / "c.sqlite"}"\n'
            + f'[sources.d]\nkind = "folder"\npath = "{folders["in"]}"\nmodel = "{model_dir}"\ncriterion = "rnage"\n'
            + f'ledger = "{tmp_path / "d.sqlite"}"\n')
    problems = config.check(config.load(write(tmp_path / "c.toml", text)))
    text = "\n".join(problems)
    assert f"At 'sources.line2.path': folder {tmp_path / 'missing'} does not exist. Create it or fix the path." in text
    assert "At 'sources.b.model':" in text and "sha256" in text
    assert "At 'sources.c.uri':" in text and "At 'sources.c.model':" in text and "does not exist" in text
    assert "At 'sources.d.criterion': 'rnage' has no calibration" in text


# ------------------------------------------------------------------ commands


def test_config_check_exits_0_or_2(tmp_path, folders, model_dir):  # noqa: F811
    good = write(tmp_path / "good.toml", minimal(folders["in"], model_dir))
    result = runner.invoke(app, ["config", "check", str(good)])
    assert result.exit_code == 0, result.stderr
    assert "OK. Sources: line2 (folder)." in result.stdout
    bad = write(tmp_path / "bad.toml", minimal(folders["in"], model_dir) + "batch_size = 0\n")
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2 and "At 'sources.line2.batch_size'" in result.stderr
    missing = write(tmp_path / "missing.toml", minimal(tmp_path / "nowhere", model_dir))
    result = runner.invoke(app, ["config", "check", str(missing)])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_config_show_tells_where_each_value_came_from(tmp_path, folders, monkeypatch):
    path = write(tmp_path / "c.toml", minimal(folders["in"]) + "settle = 2\n")
    monkeypatch.setenv("EDGE_INSPECT_HTTP__PORT", "9200")
    result = runner.invoke(app, ["config", "show", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {row["key"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert rows["sources.line2.settle"] == {"key": "sources.line2.settle", "value": 2.0, "from": f"file {path}"}
    assert rows["http.port"]["value"] == 9200 and rows["http.port"]["from"] == "environment EDGE_INSPECT_HTTP__PORT"
    assert rows["sources.line2.readers"]["from"] == "default"
    monkeypatch.setattr(cli.console, "width", 250)
    table = runner.invoke(app, ["config", "show", str(path)])
    assert table.exit_code == 0 and "sources.line2.settle" in table.stdout


def test_config_show_says_what_an_unset_key_stands_for(tmp_path, folders, monkeypatch):
    path = write(tmp_path / "c.toml", minimal(folders["in"]))
    loaded = config.load_with_origins(path)
    assert config.unset_means(loaded.config, "sources.line2.batch_size").startswith("the model's (32 for linear-ae")
    assert config.unset_means(loaded.config, "sources.line2.precision") == "the card's"
    assert config.unset_means(loaded.config, "sources.line2.retention.heatmaps_max_age") is None  # no default to name
    assert config.unset_means(loaded.config, "no.such.key") is None
    monkeypatch.setattr(cli.console, "width", 250)  # one line a row, whatever the terminal
    table = runner.invoke(app, ["config", "show", str(path)])
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.stdout.splitlines() if line.count("│") == 4}
    assert rows["sources.line2.precision"] == "null: the card's"
    assert rows["sources.line2.batch_size"].startswith("null: the model's")
    assert rows["sources.line2.retention.heatmaps_max_age"] == "null"
    json_rows = [json.loads(line) for line in runner.invoke(app, ["config", "show", str(path), "--json"]).stdout.splitlines()]
    assert {"key": "sources.line2.batch_size", "value": None, "from": "default"} in json_rows  # machines still get null


def test_config_schema_describes_every_key(tmp_path):
    out = tmp_path / "schema.json"
    result = runner.invoke(app, ["config", "schema", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    document = json.loads(out.read_text())
    folder = document["$defs"]["FolderSource"]["properties"]
    assert folder["settle"]["default"] == 1.0 and "close event" in folder["settle"]["description"]
    assert document["$defs"]["FolderSource"]["additionalProperties"] is False
    assert set(document["properties"]) == {"sources", "http", "disk", "service", "mqtt", "opcua", "webhooks"}


def test_secrets_are_masked_in_show():
    loaded = config.Loaded(config.validate({"sources": {"a": {"kind": "folder", "path": "/x", "model": "m"}}}), {})
    rows = config.effective(loaded)
    assert all("****" not in value for _, value, _ in rows)  # nothing secret here yet
    assert config.SECRET.search("password") and config.SECRET.search("tls_key_file")


def test_watch_flags_are_named_in_errors_not_keys(tmp_path, folders, model_dir):  # noqa: F811
    result = runner.invoke(app, ["watch", str(folders["in"]), "--model", str(model_dir), "--settle", "3",
                                 "--settle-unsure", "1"])
    assert result.exit_code == 1
    assert "--settle-unsure: must be at least settle" in result.stderr, result.stderr
    assert "sources.watch" not in result.stderr


def test_environment_names_a_source_of_the_file_in_upper_case(tmp_path, folders):
    path = write(tmp_path / "c.toml", minimal(folders["in"]))
    loaded = config.load(path, environ={"EDGE_INSPECT_SOURCES__LINE2__SETTLE": "7"})
    assert set(loaded.sources) == {"line2"} and loaded.sources["line2"].settle == 7


def test_serve_refuses_a_configuration_that_cannot_start_with_exit_2(tmp_path, folders):
    """Exit 2 is what the unit's RestartPreventExitStatus= names: no restart loop on a wrong file."""
    path = write(tmp_path / "c.toml", minimal(tmp_path / "nowhere"))
    result = runner.invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2 and "At 'sources.line2.path'" in result.stderr, result.stderr
    unit = (Path(__file__).resolve().parents[1] / "deploy" / "edge-inspect.service").read_text()
    assert "RestartPreventExitStatus=2" in unit
