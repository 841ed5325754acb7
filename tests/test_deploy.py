"""deploy/: the example configuration (every key, explained, passing the check) and install.sh into a scratch root.

The unit itself, and install.sh's options, are tested beside sd_notify in tests/runtime/test_notify.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect import config
from edge_inspect.cli import app
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "config.example.toml"
INSTALL = ROOT / "deploy" / "install.sh"
UNIT = ROOT / "deploy" / "edge-inspect.service"
runner = CliRunner()

#: A commented setting or table ("#key = value", "#[table]"); prose comments start with "# ".
COMMENTED = re.compile(r"^#(?=\[|[A-Za-z_][A-Za-z0-9_]* = )", re.MULTILINE)


def uncommented(text: str) -> str:
    """The example with every commented setting and table switched on."""
    return COMMENTED.sub("", text)


def schema_keys(document: dict) -> tuple[set[tuple[str, ...]], set[str]]:
    """Every leaf key path of the JSON schema (a source's name as "*"), and the $defs the walk went through."""
    defs = document["$defs"]
    keys: set[tuple[str, ...]] = set()
    visited: set[str] = set()

    def walk(node: dict, path: tuple[str, ...]) -> None:
        while "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            visited.add(name)
            node = defs[name]
        if alternatives := node.get("oneOf") or node.get("anyOf"):
            sections = [a for a in alternatives if "$ref" in a or "properties" in a]
            for alternative in sections or alternatives:  # an optional table: its keys, not the table itself
                walk(alternative, path)
        elif "properties" in node:
            for key, child in node["properties"].items():
                walk(child, (*path, key))
        elif isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], (*path, "*"))
        else:
            keys.add(path)

    walk(document, ())
    return keys, visited


def document_keys(data: dict, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every leaf key path of a parsed configuration; names the user chooses (sources, webhooks, headers) as "*"."""
    keys = set()
    for key, value in data.items():
        here = (*path, "*" if path in (("sources",), ("webhooks",)) or path[-1:] == ("headers",) else key)
        keys |= document_keys(value, here) if isinstance(value, dict) else {here}
    return keys


def value_at(data: dict, path: tuple[str, ...]):
    for key in path:
        data = data[key]
    return data


def test_the_example_names_every_key_of_the_schema_and_each_one_validates():
    """Switched on, the commented settings make a configuration that holds every key, and validates."""
    keys, visited = schema_keys(config.schema())
    assert visited == set(config.schema()["$defs"]), "the walk missed a part of the schema"
    everything = tomllib.loads(uncommented(EXAMPLE.read_text(encoding="utf-8")))
    config.validate(everything)  # unknown keys, wrong types, a camera key in a folder: all refused here
    shown = document_keys(everything)
    assert sorted(keys - shown) == [], "keys of the configuration the example does not show"
    assert sorted(shown - keys) == []
    assert {kind["kind"] for kind in everything["sources"].values()} == {"folder", "camera"}


def test_the_example_as_shipped_is_one_hot_folder_under_srv():
    loaded = config.load(EXAMPLE, environ={})
    assert list(loaded.sources) == ["line1"]
    source = loaded.sources["line1"]
    assert source.kind == "folder" and source.path == Path("/srv/edge-inspect/incoming")
    assert source.model == Path("/opt/edge-inspect/models/current")
    assert source.sinks.sort is True
    for written in (source.ledger_path, source.sinks.results, source.sinks.heatmaps):
        assert written.is_relative_to("/srv/edge-inspect"), f"{written}: the unit lets the service write only there"


def test_each_commented_setting_of_a_live_table_shows_its_default():
    """"#key = value" under a table that is switched on shows the default, unless the key has none (an example)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    shipped = config.validate(tomllib.loads(text)).model_dump(mode="json")
    table: tuple[str, ...] | None = ()
    checked = 0
    for line in text.splitlines():
        if header := re.fullmatch(r"\[([^\]]+)\]", line):
            table = tuple(header[1].split("."))
        elif re.fullmatch(r"#\[[^\]]+\]", line):
            table = None  # a commented table: its settings are examples
        elif table is not None and (setting := re.fullmatch(r"#([A-Za-z_][A-Za-z0-9_]*) = (.*)", line)):
            key, default = setting[1], value_at(shipped, (*table, setting[1]))
            if default is None:
                continue  # no default: the value is an example
            data = tomllib.loads(text)
            value_at(data, table)[key] = tomllib.loads(f"v = {setting[2]}")["v"]
            shown = value_at(config.validate(data).model_dump(mode="json"), (*table, key))
            where = ".".join((*table, key))
            assert shown == default, f"{where}: the example shows {setting[2]}, the default is {default!r}"
            checked += 1
    assert checked >= 15


def _installed_copy(tmp_path: Path, model: Path, text: str | None = None) -> Path:
    """The example as install.sh puts it, with /srv/edge-inspect and the model moved into tmp_path."""
    srv = tmp_path / "srv"
    (srv / "incoming").mkdir(parents=True, exist_ok=True)
    text = (text or EXAMPLE.read_text(encoding="utf-8"))
    text = text.replace("/opt/edge-inspect/models/current", str(model)).replace("/srv/edge-inspect", str(srv))
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_check_passes_on_the_example(tmp_path, model_dir):  # noqa: F811
    result = runner.invoke(app, ["config", "check", str(_installed_copy(tmp_path, model_dir))])
    assert result.exit_code == 0, result.output + result.stderr
    assert "OK. Sources: line1 (folder)." in result.stdout


def test_config_check_passes_on_the_example_with_every_setting_switched_on(tmp_path, model_dir):  # noqa: F811
    """The commented examples too: a criterion and a precision the model has, the camera, retention.

    Offline: the example's PLC (opcua.endpoint) is not on this machine; tests/runtime/test_opcua.py checks
    nodes against a real server.
    """
    path = _installed_copy(tmp_path, model_dir, uncommented(EXAMPLE.read_text(encoding="utf-8")))
    result = runner.invoke(app, ["config", "check", "--offline", str(path)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "line1 (folder), camera1 (camera)" in result.stdout


@pytest.mark.parametrize(("change", "key", "says"), [
    (("#batch_size = 8", 'batch_size = "eight"'), "sources.line1.batch_size", "valid integer"),
    (("sort = true", "sortt = true"), "sources.line1.sinks.sortt", "unknown key"),
    (("#port = 9464", "port = 0"), "http.port", "greater than or equal to 1"),
    (("#settle = \"1s\"", 'settle = "soon"'), "sources.line1.settle", "not a duration"),
    (None, "sources.line1.path", "does not exist"),
])
def test_config_check_refuses_a_broken_copy_naming_the_key(tmp_path, model_dir, change, key, says):  # noqa: F811
    text = EXAMPLE.read_text(encoding="utf-8")
    if change is not None:
        assert text.count(change[0]) == 1
        text = text.replace(change[0], change[1])
    path = _installed_copy(tmp_path, model_dir, text)
    if change is None:
        (tmp_path / "srv" / "incoming").rmdir()  # the hot folder is missing
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 2, result.output + result.stderr
    assert f"At '{key}':" in result.stderr and says in result.stderr, result.stderr


# ------------------------------------------------------------------ install.sh --root


def _install(root: Path, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *options, "--root", str(root)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_install_into_a_root_checks_first_keeps_an_edited_configuration_and_uninstalls(tmp_path,
                                                                                      model_dir):  # noqa: F811
    """The service half of install.sh, as an image build would run it: no user, nothing started.

    The runtime is "installed" as a venv in the root whose edge-inspect is this checkout's.
    """
    root = tmp_path / "root"
    venv = root / "opt/edge-inspect"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/edge-inspect").symlink_to(Path(sys.executable).parent / "edge-inspect")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "models/current").mkdir(parents=True)
    config = root / "etc/edge-inspect/config.toml"
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-inspect.service"

    # A first install: the example, whose hot folder is missing (here for certain, through the environment).
    first = _install(root, "--service", "--no-venv", env={"EDGE_INSPECT_SOURCES__line1__PATH": str(tmp_path / "no")})
    assert first.returncode == 1, first.stdout + first.stderr
    assert "neither enables nor (re)starts" in first.stderr and "At 'sources.line1.path': folder" in first.stderr
    assert config.read_text() == EXAMPLE.read_text() and not wants.exists()
    assert (root / "etc/systemd/system/edge-inspect.service").read_text() == UNIT.read_text()
    assert (root / "srv/edge-inspect/incoming").is_dir()

    # The operator edits it; a new install keeps the edit, puts the new example beside it, checks, enables.
    edited = EXAMPLE.read_text().replace("/opt/edge-inspect/models/current", str(model_dir))
    config.write_text(edited.replace("/srv/edge-inspect", str(root / "srv/edge-inspect")))
    again = _install(root, "--service", "--no-venv")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Kept your configuration" in again.stdout and "OK. Sources: line1 (folder)." in again.stdout
    assert config.read_text() != EXAMPLE.read_text()
    assert (config.parent / "config.toml.new").read_text() == EXAMPLE.read_text()
    assert os.readlink(wants) == "/etc/systemd/system/edge-inspect.service"

    # Uninstall: the unit and the venv go, the configuration, the parts and the models stay, and it says so.
    gone = _install(root, "--uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not wants.exists() and not (root / "etc/systemd/system/edge-inspect.service").exists()
    assert sorted(p.name for p in venv.iterdir()) == ["models"]
    kept = gone.stdout[gone.stdout.index("Kept:"):]
    for path in (venv / "models", config.parent, root / "srv/edge-inspect"):
        assert path.exists() and str(path) in kept
    purged = _install(root, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not config.parent.exists() and not (root / "srv/edge-inspect").exists() and not venv.exists()
    assert "Purged" in purged.stdout
