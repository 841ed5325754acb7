"""sd_notify over real AF_UNIX datagram sockets, and the systemd unit that expects it."""

from __future__ import annotations

import json
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
        "KillSignal": "SIGTERM", "ExecReload": "/bin/kill -HUP $MAINPID",
        "ProtectSystem": "strict", "ReadWritePaths": "/srv/edge-inspect", "WorkingDirectory": "/srv/edge-inspect",
        "ProtectHome": "yes", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "DevicePolicy": "closed",
        # One capability: leases on the camera user's files tell a paused writer from a finished file.
        "CapabilityBoundingSet": "CAP_LEASE", "AmbientCapabilities": "CAP_LEASE",
        # Other users' processes listed but closed: the /proc fallback of the writer check then knows it
        # cannot see them all; =invisible would make it take a file still being written for finished.
        "ProtectProc": "noaccess",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "SystemCallArchitectures": "native",
    }
    assert {k: service.get(k) for k in expected} == expected
    for key in ("WatchdogSec", "TimeoutStopSec", "TimeoutStartSec"):
        assert re.fullmatch(r"\d+", service[key]) and int(service[key]) > 0, key
    assert "MemoryDenyWriteExecute" not in service  # Numba's JIT needs writable-then-executable memory
    assert "PrivateUsers" not in service  # CAP_LEASE inside a user namespace does not reach other users' files
    assert "EnvironmentFile" not in service  # one configuration file; EDGE_INSPECT_... overrides in a drop-in
    assert _settings(unit["Install"]) == {"WantedBy": "multi-user.target"}
    environment = dict(value.split("=", 1) for key, value in unit["Service"] if key == "Environment")
    assert environment["NUMBA_CACHE_DIR"].startswith("/var/cache/" + service["CacheDirectory"])
    filters = [value for key, value in unit["Service"] if key == "SystemCallFilter"]
    assert filters == ["@system-service", "~@privileged @resources"]


def test_exec_start_serves_the_configuration_that_install_sh_installs():
    from typer.testing import CliRunner

    from edge_inspect.cli import app

    service = _settings(_parse_unit(UNIT.read_text())["Service"])
    argv = shlex.split(service["ExecStart"])
    assert argv == ["/opt/edge-inspect/bin/edge-inspect", "serve", "--config", "/etc/edge-inspect/config.toml"]
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert help_text.exit_code == 0, help_text.output
    assert "--config" in help_text.output and "SIGHUP" in help_text.output
    script = INSTALL.read_text()
    assert 'etc="$root/etc/edge-inspect"' in script and 'config="$etc/config.toml"' in script
    assert '"$here/deploy/config.example.toml" "$config"' in script
    assert not (ROOT / "deploy" / "edge-inspect.env").exists()  # retired: the service reads config.toml only


def test_install_script_renders_the_unit_for_its_prefix_and_keeps_its_options():
    assert subprocess.run(["bash", "-n", str(INSTALL)]).returncode == 0
    usage = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0
    for option in ("--gpu", "--train", "--service", "--print-unit", "--no-venv", "--uninstall", "--purge", "--root"):
        assert option in usage.stdout
    wrong = subprocess.run(["bash", str(INSTALL), "--nope"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown option '--nope'" in wrong.stderr
    for mixed in (["--uninstall", "--gpu"], ["--purge"], ["--no-venv"], ["--root"]):
        refused = subprocess.run(["bash", str(INSTALL), *mixed], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and refused.stderr.startswith("Error: "), (mixed, refused.stderr)
    rendered = subprocess.run(["bash", str(INSTALL), "--print-unit"], env={**os.environ, "PREFIX": "/srv/x y"},
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0
    assert rendered.stdout == UNIT.read_text().replace("/opt/edge-inspect/bin/", "/srv/x y/bin/")


def _analyze(*args: str) -> subprocess.CompletedProcess:
    """systemd-analyze (scripts/test.sh installs it where it is missing)."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: apt-get install systemd (scripts/test.sh does)"
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def test_systemd_analyze_verifies_the_unit_and_its_gpu_drop_in_without_a_warning(tmp_path):
    """The unit as install.sh writes it, ExecStart pointing at this checkout's installed command.

    verify reads the drop-ins beside the unit file: the one ``install.sh --gpu --service`` writes is
    taken from a run of the script into a scratch root (its configuration check fails there, after the
    unit and the drop-in are written).
    """
    command = Path(sys.executable).parent / "edge-inspect"
    assert command.exists(), "the package's console script is not installed beside this Python"
    prefix = str(command.parent.parent)
    rendered = subprocess.run(["bash", str(INSTALL), "--print-unit"], env={**os.environ, "PREFIX": prefix},
                              capture_output=True, text=True, timeout=60)
    unit = tmp_path / "edge-inspect.service"
    unit.write_text(rendered.stdout)
    root = tmp_path / "root"
    (root / "opt/edge-inspect/bin").mkdir(parents=True)
    (root / "opt/edge-inspect/bin/edge-inspect").symlink_to(command)
    subprocess.run(["bash", str(INSTALL), "--service", "--no-venv", "--gpu", "--root", str(root)],
                   capture_output=True, text=True, timeout=120)
    gpu = root / "etc/systemd/system/edge-inspect.service.d/gpu.conf"
    assert "DeviceAllow=char-nvidia* rw" in gpu.read_text()
    (tmp_path / "edge-inspect.service.d").mkdir()
    shutil.copy(gpu, tmp_path / "edge-inspect.service.d" / "gpu.conf")
    proc = _analyze("verify", "--man=no", str(unit))
    report = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, report
    assert [line for line in report.splitlines() if "edge-inspect.service" in line] == []
    broken = tmp_path / "edge-inspect.service.d" / "typo.conf"
    broken.write_text("[Service]\nProtectSytem=strict\n")  # proof that verify would tell
    typo = _analyze("verify", "--man=no", str(unit))
    assert "Unknown key 'ProtectSytem'" in typo.stdout + typo.stderr


def test_systemd_analyze_security_rates_the_unit_at_most_1_5_and_each_exposure_is_explained():
    """``systemd-analyze security --offline=yes`` (1.8 before the hardening of serve; the header says the figure).

    Every check still failed is named in the unit's "Left exposed on purpose" block, one line each,
    with the reason it stays; a line for a check that no longer fails is stale and fails this test too.
    """
    text = UNIT.read_text()
    proc = _analyze("security", "--offline=yes", str(UNIT))
    match = re.search(r"Overall exposure level for edge-inspect\.service: (\d+\.\d+)", proc.stdout)
    assert proc.returncode == 0 and match, proc.stdout + proc.stderr
    assert float(match[1]) <= 1.5, proc.stdout
    assert re.search(rf"systemd-analyze security edge-inspect +# {re.escape(match[1])}:", text), \
        f"the unit's header should say {match[1]}"
    items = json.loads(_analyze("security", "--offline=yes", "--json=short", str(UNIT)).stdout)
    exposed = {item["name"] for item in items if item["exposure"] not in (None, "0.0")}
    block = text[text.index("# --- Left exposed on purpose"):text.index("[Install]")]
    explained = re.findall(r"^# (\S+): \S", block, re.MULTILINE)
    assert len(explained) == len(set(explained)), "one line per exposure"
    assert sorted(exposed) == sorted(explained)


#: System calls of ``serve`` seen under strace: a hot folder of another user's files (leases), inotify,
#: sorting, results, heatmaps, /metrics and /healthz, a reload and a SIGTERM; run once as a non-root user
#: with ambient CAP_LEASE under libseccomp with the unit's filter, which refused only mbind (OpenBLAS
#: asks for a NUMA policy, gets EPERM and carries on). ``kill`` is ExecReload's /bin/kill.
SERVE_SYSCALLS = """
    accept4 access arch_prctl bind brk chmod clock_nanosleep clone3 close connect epoll_create1 eventfd2 execve exit
    exit_group fcntl fdatasync fstat fsync ftruncate futex getcwd getdents64 getegid geteuid getgid getpid getppid
    getrandom getsockname gettid getuid inotify_add_watch inotify_init inotify_init1 inotify_rm_watch ioctl kill
    link listen lseek lstat madvise mkdir mmap mprotect munmap newfstatat openat pipe2 poll pread64 prlimit64
    pwrite64 read readlink recvfrom rename renameat2 rseq rt_sigaction rt_sigprocmask rt_sigreturn sched_getaffinity
    sched_yield sendmsg sendto set_robust_list set_tid_address setsockopt shutdown socket stat statfs statx sysinfo
    uname unlink write
""".split()


def test_the_system_call_filter_allows_what_serve_uses():
    def expand(names: str) -> set[str]:
        out = set()
        for name in names.split():
            if not name.startswith("@"):
                out.add(name)
                continue
            listing = _analyze("syscall-filter", "--no-pager", name).stdout.splitlines()[1:]
            for line in (line.strip() for line in listing):
                if line and not line.startswith("#"):
                    out |= expand(line)
        return out

    service = _parse_unit(UNIT.read_text())["Service"]
    allowed: set[str] = set()
    for value in (value for key, value in service if key == "SystemCallFilter"):
        if value.startswith("~"):
            allowed -= expand(value[1:])
        else:
            allowed |= expand(value)
    assert "mbind" not in allowed and "setuid" not in allowed and "sched_setaffinity" not in allowed
    assert sorted(set(SERVE_SYSCALLS) - allowed) == []


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
