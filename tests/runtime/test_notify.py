"""sd_notify over real AF_UNIX datagram sockets, and the systemd unit that expects it."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from edge_inspect import notify

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "edge-inspect.service"
ENV = ROOT / "deploy" / "edge-inspect.env"
INSTALL = ROOT / "deploy" / "install.sh"


@pytest.fixture
def listener(monkeypatch):
    """A datagram socket bound in a short temporary folder (socket paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ei-notify-") as folder:
        path = os.path.join(folder, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def _nothing_received(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


def test_each_notification_sends_its_datagram(listener):
    assert notify.ready("watching /srv/parts") is True
    assert listener.recv(4096) == b"READY=1\nSTATUS=watching /srv/parts"
    assert notify.ready() is True
    assert listener.recv(4096) == b"READY=1"
    assert notify.watchdog() is True
    assert listener.recv(4096) == b"WATCHDOG=1"
    assert notify.status("12 ok, 1 ng") is True
    assert listener.recv(4096) == b"STATUS=12 ok, 1 ng"
    assert notify.stopping() is True
    assert listener.recv(4096) == b"STOPPING=1"


def test_a_status_with_newlines_stays_one_assignment(listener):
    notify.status("line one\nREADY=1")
    assert listener.recv(4096) == b"STATUS=line one READY=1"


def test_the_abstract_namespace_address(monkeypatch):
    name = f"edge-inspect-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready("abstract") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=abstract"


def test_a_child_process_notifies_the_socket_from_its_environment(listener):
    """As under systemd: the address comes from the environment of a separate process."""
    code = "from edge_inspect import notify; import sys; sys.exit(0 if notify.ready('child') else 3)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(), timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert listener.recv(4096) == b"READY=1\nSTATUS=child"


def test_outside_systemd_every_function_does_nothing(listener, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert [notify.ready("x"), notify.watchdog(), notify.stopping(), notify.status("x")] == [False] * 4
    assert _nothing_received(listener)


@pytest.mark.parametrize("address", ["/nonexistent/edge-inspect/notify.sock", "vsock:2:1234"])
def test_a_send_that_cannot_be_made_is_logged_at_debug_and_not_raised(address, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_inspect.notify")
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify.ready() is False
    assert notify.watchdog() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]
    assert address in caplog.records[0].getMessage()


def test_a_socket_nobody_listens_on_any_more(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_inspect.notify")
    with tempfile.TemporaryDirectory(prefix="ei-notify-") as folder:
        path = os.path.join(folder, "gone.sock")
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(path)  # closed at once: connection refused
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify.stopping() is False
    assert "failed" in caplog.text


def test_watchdog_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))  # meant for another process
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert notify.watchdog_interval() is None


# ------------------------------------------------------------ the systemd unit


def _parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value); strict about what systemd would reject."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are avoided on purpose"
        if line.startswith("["):
            assert re.fullmatch(r"\[[A-Za-z]+\]", line), f"line {number}: bad section header {line!r}"
            current = line[1:-1]
            assert current not in sections, f"line {number}: section {current} twice"
            sections[current] = []
            continue
        assert current is not None, f"line {number}: a setting before any section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"line {number}: not KEY=value: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def _settings(section: list[tuple[str, str]]) -> dict[str, str]:
    return {key: value for key, value in section}  # the last one wins, as in systemd


def test_the_unit_is_a_notify_service_with_a_watchdog_a_user_and_hardening():
    unit = _parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    service = _settings(unit["Service"])
    expected = {
        "Type": "notify", "User": "edge-inspect", "Group": "edge-inspect", "Restart": "on-failure",
        "KillSignal": "SIGTERM", "EnvironmentFile": "/etc/edge-inspect/edge-inspect.env",
        "ProtectSystem": "strict", "ReadWritePaths": "/srv/edge-inspect", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        # One capability: leases on the camera user's files tell a paused writer from a finished file.
        "CapabilityBoundingSet": "CAP_LEASE", "AmbientCapabilities": "CAP_LEASE",
    }
    assert {k: service.get(k) for k in expected} == expected
    for key in ("WatchdogSec", "TimeoutStopSec", "TimeoutStartSec"):
        assert re.fullmatch(r"\d+", service[key]) and int(service[key]) > 0, key
    assert "MemoryDenyWriteExecute" not in service  # Numba's JIT needs writable-then-executable memory
    assert _settings(unit["Install"]) == {"WantedBy": "multi-user.target"}
    environment = dict(value.split("=", 1) for key, value in unit["Service"] if key == "Environment")
    assert environment["NUMBA_CACHE_DIR"].startswith("/var/cache/" + service["CacheDirectory"])


def test_exec_start_runs_an_existing_command_with_existing_options():
    from typer.testing import CliRunner

    from edge_inspect.cli import app

    service = _settings(_parse_unit(UNIT.read_text())["Service"])
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/edge-inspect/bin/edge-inspect" and argv[1] == "watch"
    settings = dict(line.split("=", 1) for line in ENV.read_text().splitlines() if line and not line.startswith("#"))
    assert {"WATCH_DIR", "MODEL_DIR", "WATCH_OPTIONS"} <= set(settings)
    # Environment the way systemd expands it: ${X} one word, $X split at spaces.
    expanded = []
    for word in argv[1:]:
        if match := re.fullmatch(r"\$\{(\w+)\}", word):
            expanded.append(settings[match[1]])
        elif match := re.fullmatch(r"\$(\w+)", word):
            expanded += settings[match[1]].split()
        else:
            expanded.append(word)
    help_text = CliRunner().invoke(app, [expanded[0], "--help"], terminal_width=200)
    assert help_text.exit_code == 0, help_text.output
    options = [w for w in expanded if w.startswith("--")]
    assert "--model" in options and len(options) >= 2
    for option in options:
        assert option in help_text.output, f"{option} is not an option of edge-inspect {expanded[0]}"
    assert Path(settings["WATCH_DIR"]).is_relative_to(service["ReadWritePaths"])
    assert not Path(settings["MODEL_DIR"]).is_relative_to("/home")


def test_install_script_renders_the_unit_for_its_prefix_and_keeps_its_options():
    assert subprocess.run(["bash", "-n", str(INSTALL)]).returncode == 0
    usage = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0
    for option in ("--gpu", "--train", "--service", "--print-unit"):
        assert option in usage.stdout
    wrong = subprocess.run(["bash", str(INSTALL), "--nope"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown option '--nope'" in wrong.stderr
    rendered = subprocess.run(["bash", str(INSTALL), "--print-unit"], env={**os.environ, "PREFIX": "/srv/x y"},
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0
    assert rendered.stdout == UNIT.read_text().replace("/opt/edge-inspect/bin/", "/srv/x y/bin/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit_without_a_warning(tmp_path):
    """The unit as install.sh writes it, ExecStart pointing at this checkout's installed command."""
    command = Path(sys.executable).parent / "edge-inspect"
    assert command.exists(), "the package's console script is not installed beside this Python"
    prefix = str(command.parent.parent)
    rendered = subprocess.run(["bash", str(INSTALL), "--print-unit"], env={**os.environ, "PREFIX": prefix},
                              capture_output=True, text=True, timeout=60)
    unit = tmp_path / "edge-inspect.service"
    unit.write_text(rendered.stdout)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    report = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, report
    assert [line for line in report.splitlines() if "edge-inspect.service" in line] == []


def test_a_listener_that_stops_reading_never_blocks_the_sender(tmp_path, monkeypatch):
    """A full socket buffer makes a send fail (logged), not wait: the watcher's commit loop calls these."""
    import socket as socket_module
    import threading

    path = tmp_path / "full.sock"
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    listener.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(notify.status("x" * 4000) for _ in range(500)), daemon=True)
    sender.start()
    sender.join(timeout=30)
    listener.close()
    assert not sender.is_alive(), "sending blocked on a socket nobody reads"
    assert results.count(False) > 0 and results[0] is True
