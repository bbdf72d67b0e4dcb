"""A private RabbitMQ broker for the tests, the benchmark and the chaos suite.

:class:`PrivateBroker` runs Debian's ``rabbitmq-server`` (3.10) as a node of
its own that can never meet a system broker or another test run's: its own
node name, loopback-only ports (AMQP, Erlang distribution, and an ``epmd``
started here, on a private port), and every file it writes (config, cookie,
mnesia data, logs, feature flags, pid file) in one temporary directory owned
by the ``rabbitmq`` user (the broker runs as that user, and fails with
``eacces`` or ``failed_to_create_feature_flags_file_directory`` on a
directory it cannot write). It is ready in about 5 s; ``stop`` takes about
1 s and leaves no process, port or directory behind.

:class:`Consumer` is the tests' real AMQP consumer (pika): a queue bound to
an exchange and routing key, read in a background thread that reconnects
when the broker was killed and restarted.

:func:`available` says whether this machine can run a private broker at all
(the package is installed, and we are root, to hand the directory to the
``rabbitmq`` user). Only loopback addresses are ever used.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from mpevent.system import free_port

try:  # a runtime dependency; checked by available() so the reason is clear
    import pika
    import pika.exceptions
except ImportError:  # pragma: no cover - only on a broken install
    pika = None  # type: ignore[assignment]

HOST = "127.0.0.1"
USER = "rabbitmq"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # not /usr/sbin's wrapper: it su's itself
EPMD = Path("/usr/bin/epmd")
INSTALL_HINT = "apt-get install -y rabbitmq-server (as root)"
# The distribution listens on loopback only, and the node never starts an
# epmd of its own (one left by a crash would outlive everything here).
ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"
LOG_TAIL_BYTES = 4000


#: ``MPEVENT_BROKER=off``: behave as if no broker could run (the test suite's
#: passes after the one that runs the broker tests; a bench without one).
OFF_SWITCH = "MPEVENT_BROKER"


def available() -> tuple[bool, str]:
    """Can this machine run a :class:`PrivateBroker`? ``(False, reason)`` says why not."""
    if os.environ.get(OFF_SWITCH) == "off":
        return False, f"{OFF_SWITCH}=off"
    if not SERVER.exists() or not EPMD.exists():
        return False, f"rabbitmq-server is not installed: {INSTALL_HINT}"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return (
            False,
            f"there is no {USER!r} user (a broken rabbitmq-server install): {INSTALL_HINT}",
        )
    if os.geteuid() != 0:
        return False, f"a private broker runs as the {USER!r} user, which needs root"
    if pika is None:
        return False, "pika is not installed (pip install -e .)"
    return True, ""


class BrokerError(RuntimeError):
    """The broker did not start or stop; the message ends with its log's tail."""


class PrivateBroker:
    """One private RabbitMQ node on loopback; a context manager (start, then stop).

    ``kill()`` crashes it (SIGKILL, data kept); ``restart()`` starts it again
    on the same ports and data, as the chaos suite needs.
    """

    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.node = f"mpevent-{os.getpid()}-{secrets.token_hex(4)}@localhost"
        self.port = 0
        self.dist_port = 0
        self.epmd_port = 0
        self.dir: Path | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        # Every process the node ran, seen while it ran: waited for after a
        # stop or kill (orphans are reaped by init a moment later).
        self._seen: dict[int, psutil.Process] = {}

    # -- addresses ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    def socket(self, routing_key: str, **params: Any) -> str:
        """The mpevent destination for ``routing_key`` on this broker.

        ``params`` become ``;``-separated ``name=value`` items (``True``: the
        bare name, as ``persistent``; ``False``/``None``: left out).
        """
        items = []
        for name, value in params.items():
            if value is True:
                items.append(name)
            elif value is not None and value is not False:
                items.append(f"{name}={value}")
        path = f"{';'.join(items)}?{routing_key}" if items else routing_key
        return f"rabbitmq:{HOST}:{self.port}/{path}"

    def parameters(self, **kwargs: Any) -> pika.ConnectionParameters:
        """pika's parameters for this broker (guest/guest); ``kwargs`` override."""
        settings: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "credentials": pika.PlainCredentials("guest", "guest"),
            "connection_attempts": 1,
            "socket_timeout": 2,
            "stack_timeout": 5,
            "blocked_connection_timeout": 10,
        }
        settings.update(kwargs)
        return pika.ConnectionParameters(**settings)

    def connect(self, **kwargs: Any) -> pika.BlockingConnection:
        """A pika BlockingConnection to this broker (the caller closes it)."""
        return pika.BlockingConnection(self.parameters(**kwargs))

    def consume(self, routing_key: str, exchange: str = "", **kwargs: Any) -> Consumer:
        """A started :class:`Consumer` of ``routing_key`` on ``exchange``."""
        return Consumer(self, routing_key, exchange, **kwargs)

    # -- lifetime ----------------------------------------------------------

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def start(self) -> None:
        """Create the directory, choose ports, start epmd and the node, wait for AMQP."""
        if self.dir is not None:
            raise BrokerError("this broker was started already: restart() it")
        attempts = 3  # a free port may be taken before the broker binds it
        for attempt in range(1, attempts + 1):
            self._choose_ports()
            self._make_dir()
            try:
                self._launch()
                return
            except BrokerError as e:
                self._cleanup()
                if "eaddrinuse" not in str(e) or attempt == attempts:
                    raise

    def restart(self) -> None:
        """Start again after ``kill()`` (or a stop with ``keep=True``): same ports, same data."""
        if self.dir is None:
            raise BrokerError("restart() needs a broker that was started and kept its data")
        if self.running:
            raise BrokerError("the broker is running: kill() or stop(keep=True) it first")
        self._reap_server()
        deadline = time.monotonic() + 10
        while True:  # the old listeners' ports are normally free at once
            try:
                self._launch()
                return
            except BrokerError as e:
                if "eaddrinuse" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def sync_metadata(self) -> None:
        """Write the node's metadata log to disk now. Mnesia buffers it for a
        moment (delayed write), so a queue declared less than ~2 s before a
        :meth:`kill` may not survive it; confirmed persistent messages do
        anyway (the broker syncs them before it confirms)."""
        self.ctl("eval", "mnesia:sync_log().")

    def kill(self) -> None:
        """Crash the node: SIGKILL to every process it runs (epmd and the data stay)."""
        if self._server is None:
            return
        self._track()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._server.pid, signal.SIGKILL)
        # The VM's helpers (erl_child_setup, inet_gethost, the disk monitor's
        # shell) run in sessions of their own, out of the group's reach.
        for proc in list(self._seen.values()):
            if proc.pid != (self._epmd.pid if self._epmd else None):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        self._reap_server()
        self._wait_gone(timeout=15, zombies_ok=True)

    def stop(self, keep: bool = False) -> None:
        """Stop the node gracefully (SIGTERM, as the Debian script and Docker do), then
        epmd, wait until every process it ran is gone and remove the directory
        (``keep=True``: keep epmd and the data for a ``restart()``)."""
        if self._server is not None and self._server.poll() is None:
            self._track()
            # The script traps SIGTERM and passes it to the VM, which stops
            # the broker in order (its own SIGTERM handler).
            self._server.terminate()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._server.pid, signal.SIGKILL)
        self._reap_server()
        if keep:
            self._wait_gone(timeout=15, zombies_ok=True)
            return
        self._cleanup()

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n NODE args...`` against this node (its output); for
        looking inside it (``list_queues``). The CLI is an Erlang node too: it
        gets a free loopback distribution port of its own."""
        if not self.running:
            raise BrokerError("rabbitmqctl needs a running broker")
        account = pwd.getpwnam(USER)
        cli_port = str(free_port(socket.SOCK_STREAM))
        env = dict(
            self._environment(),
            RABBITMQ_CTL_ERL_ARGS=ERL_ARGS,
            RABBITMQ_CTL_DIST_PORT_MIN=cli_port,
            RABBITMQ_CTL_DIST_PORT_MAX=cli_port,
        )
        done = subprocess.run(
            [str(SERVER.with_name("rabbitmqctl")), "-q", "-n", self.node, *args],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            env=env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    # -- the steps ---------------------------------------------------------

    def _choose_ports(self) -> None:
        ports: list[int] = []
        while len(ports) < 3:
            port = free_port(socket.SOCK_STREAM)
            if port not in ports:
                ports.append(port)
        self.port, self.dist_port, self.epmd_port = ports

    def _make_dir(self) -> None:
        account = pwd.getpwnam(USER)
        root = Path(tempfile.mkdtemp(prefix="mpevent-broker-", dir=_base_dir()))
        self.dir = root
        for sub in ("mnesia", "log", "plugins-expand"):
            (root / sub).mkdir()
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.default = {HOST}:{self.port}\n")
        (root / "advanced.config").write_text("[].\n")
        cookie = root / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        for path in [root, *root.rglob("*")]:
            os.chown(path, account.pw_uid, account.pw_gid)
        root.chmod(0o700)

    def _environment(self) -> dict[str, str]:
        assert self.dir is not None
        d = str(self.dir)
        return {
            # Nothing from our environment: a RABBITMQ_* or ERL_* variable of
            # the caller's must not reach the node.
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": d,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "ERL_EPMD_ADDRESS": HOST,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_MNESIA_DIR": f"{d}/mnesia/{self.node}",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_LOGS": f"{d}/log/rabbit.log",
            "RABBITMQ_FEATURE_FLAGS_FILE": f"{d}/feature_flags",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_PLUGINS_EXPAND_DIR": f"{d}/plugins-expand",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",
            "RABBITMQ_PID_FILE": f"{d}/pid",
            # Never /etc/rabbitmq/rabbitmq-env.conf: a file that does not exist.
            "RABBITMQ_CONF_ENV_FILE": f"{d}/missing",
        }

    def _spawn(self, args: list[str], log: Path | None) -> subprocess.Popen[bytes]:
        """``args`` as the rabbitmq user, in a process group of its own."""
        account = pwd.getpwnam(USER)
        out: Any = subprocess.DEVNULL
        if log is not None:
            out = open(log, "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            return subprocess.Popen(
                args,
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                env=self._environment(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log is not None:
                out.close()

    def _launch(self) -> None:
        """Start epmd (once) and the node; return when an AMQP handshake works."""
        assert self.dir is not None
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = self._spawn(
                [str(EPMD), "-address", HOST, "-port", str(self.epmd_port)], None
            )
            self._seen[self._epmd.pid] = psutil.Process(self._epmd.pid)
            self._wait_listening(self.epmd_port, self._epmd, "epmd")
        self._server = self._spawn([str(SERVER)], self.dir / "console.log")
        self._seen[self._server.pid] = psutil.Process(self._server.pid)
        deadline = time.monotonic() + self.startup_timeout
        while not self._handshake():
            if self._server.poll() is not None:
                raise BrokerError(
                    f"rabbitmq-server exited {self._server.returncode} while starting"
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"rabbitmq-server not ready after {self.startup_timeout:g} s{self._log_tail()}"
                )
            time.sleep(0.1)
        self._track()

    def _handshake(self) -> bool:
        """Does an AMQP handshake work? (pika logs every refused connection as an
        error: knock first, shake hands once the port accepts.)"""
        if not _accepts(self.port):
            return False
        try:
            self.connect().close()
        except (pika.exceptions.AMQPError, OSError):
            return False
        return True

    def _wait_listening(self, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            if _accepts(port):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                # Reported as eaddrinuse when the port was taken meanwhile, so
                # that start() tries other ports.
                raise BrokerError(f"{what} did not listen on {HOST}:{port} (eaddrinuse?)")
            time.sleep(0.02)

    def _track(self) -> None:
        """Remember every process below ours (they leave their own sessions)."""
        for root in (self._server, self._epmd):
            if root is None:
                continue
            try:
                procs = psutil.Process(root.pid).children(recursive=True)
            except psutil.Error:
                continue
            for proc in procs:
                self._seen.setdefault(proc.pid, proc)

    def pids(self) -> set[int]:
        """Every process of this broker now, zombies included: the server's script,
        epmd and everything below them."""
        self._track()
        return {pid for pid, proc in self._seen.items() if _exists(proc)}

    def _reap_server(self) -> None:
        if self._server is not None:
            try:
                self._server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._server.pid, signal.SIGKILL)
                self._server.wait(timeout=15)

    def _stop_epmd(self) -> None:
        if self._epmd is None:
            return
        if self._epmd.poll() is None:
            self._epmd.terminate()
            try:
                self._epmd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._epmd.kill()
                self._epmd.wait(timeout=5)
        self._epmd = None

    def _wait_gone(self, timeout: float, zombies_ok: bool = False) -> None:
        """Wait for every process the node ran; orphans are init's to reap, soon."""
        deadline = time.monotonic() + timeout
        while True:
            left = {
                pid: proc
                for pid, proc in self._seen.items()
                if (_alive(proc) if zombies_ok else _exists(proc))
                and not (self._epmd is not None and pid == self._epmd.pid)
            }
            if not left:
                break
            if time.monotonic() > deadline:
                names = sorted(f"{pid} ({_name(p)})" for pid, p in left.items())
                raise BrokerError(f"broker processes still there: {', '.join(names)}")
            for proc in left.values():  # nothing of it may outlive the stop
                with contextlib.suppress(psutil.Error):
                    if _alive(proc):
                        proc.kill()
            time.sleep(0.05)
        # What is left is epmd, or zombies that a later stop waits for.
        self._seen = {pid: proc for pid, proc in self._seen.items() if _exists(proc)}

    def _cleanup(self) -> None:
        """Everything after the node stopped: epmd, the processes, the directory."""
        try:
            if self._server is not None and self._server.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._server.pid, signal.SIGKILL)
            self._reap_server()
            self._server = None
            self._stop_epmd()
            self._wait_gone(timeout=15)
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def log_tail(self) -> str:
        """The end of the node's log and of its console output."""
        if self.dir is None:
            return ""
        parts = []
        for path in (self.dir / "log" / "rabbit.log", self.dir / "console.log"):
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path.name}:\n{text}")
        return "\n".join(parts)

    def _log_tail(self) -> str:
        tail = self.log_tail()
        return f"\n{tail}" if tail else ""


def _base_dir() -> str:
    """The temporary directory, if the rabbitmq user can reach into it (a
    TMPDIR under /root cannot be): else /tmp."""
    base = Path(tempfile.gettempdir()).resolve()
    for path in (base, *base.parents):
        if not path.stat().st_mode & 0o001:
            return "/tmp"
    return str(base)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds no port and no file)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _exists(proc: psutil.Process) -> bool:
    """Still in the process table, zombie or not (the same process, not a reused pid)."""
    try:
        return proc.is_running()
    except psutil.Error:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


# -- consuming -------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One message a :class:`Consumer` received."""

    body: bytes
    routing_key: str
    exchange: str
    content_type: str | None
    delivery_mode: int | None
    redelivered: bool
    headers: dict[str, Any] = field(default_factory=dict)


class Consumer:
    """A queue bound to ``exchange`` with ``routing_key``, read by pika in a thread.

    ``exchange=""`` (the default exchange) reads the queue named
    ``routing_key``; another exchange is declared (``exchange_type``, direct
    by default) and a queue is bound to it. ``durable=True`` gives a durable
    named queue that outlives a broker crash (with ``persistent`` messages,
    what was confirmed is still there after ``restart()``); the thread
    reconnects after the broker was killed. Messages are acknowledged once
    stored here, so one that arrives twice comes marked ``redelivered``.
    ``close()`` deletes the queue when it is durable or named after the key.
    """

    def __init__(
        self,
        broker: PrivateBroker,
        routing_key: str,
        exchange: str = "",
        *,
        exchange_type: str = "direct",
        durable: bool = False,
        timeout: float = 10.0,
    ):
        self.broker = broker
        self.routing_key = routing_key
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.durable = durable
        if exchange == "":
            self.queue = routing_key
        elif durable:
            self.queue = f"mpevent-test-{secrets.token_hex(6)}"
        else:
            self.queue = ""  # server-named, exclusive: gone with the connection
        self.reconnects = 0
        self._deliveries: list[Delivery] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mpevent-consumer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise BrokerError(f"consumer not ready after {timeout:g} s: {self._error!r}")

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def deliveries(self) -> list[Delivery]:
        with self._cond:
            return list(self._deliveries)

    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """What arrived once ``count`` messages did, or when ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._deliveries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._deliveries)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=15)

    # -- the thread (pika is not thread-safe: the connection lives here only)

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._session()
                return
            except (pika.exceptions.AMQPError, OSError) as e:
                self._error = e
                self.reconnects += 1
                self._closing.wait(0.2)

    def _session(self) -> None:
        connection = self.broker.connect(heartbeat=10)
        try:
            channel = connection.channel()
            if self.exchange:
                channel.exchange_declare(self.exchange, self.exchange_type, durable=self.durable)
            exclusive = self.exchange != "" and not self.durable
            declared = channel.queue_declare(self.queue, durable=self.durable, exclusive=exclusive)
            queue = declared.method.queue
            if self.exchange:
                channel.queue_bind(queue, self.exchange, routing_key=self.routing_key)
            channel.basic_qos(prefetch_count=1000)
            last_tag = [0]

            def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                delivery = Delivery(
                    body=body,
                    routing_key=method.routing_key,
                    exchange=method.exchange,
                    content_type=properties.content_type,
                    delivery_mode=properties.delivery_mode,
                    redelivered=bool(method.redelivered),
                    headers=dict(properties.headers or {}),
                )
                with self._cond:
                    self._deliveries.append(delivery)
                    self._cond.notify_all()
                last_tag[0] = method.delivery_tag

            channel.basic_consume(queue, on_message)
            self._ready.set()
            acked = 0
            while not self._closing.is_set():
                connection.process_data_events(time_limit=0.05)
                if last_tag[0] != acked:  # stored above: acknowledge them at once
                    channel.basic_ack(last_tag[0], multiple=True)
                    acked = last_tag[0]
            if self.queue:  # a named queue would stay in the session broker
                channel.queue_delete(queue)
        finally:
            with contextlib.suppress(Exception):
                connection.close()
