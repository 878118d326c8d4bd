"""QEMU as the benchmark peer: the same vmlinux, initramfs and command line, timed like ours.

Why a peer at all: under nested PVM the guest kernel is emulated, so absolute numbers
say little about our VMM; QEMU on the same host, kernel and initramfs says what the
guest costs by itself. What is measured, on QEMU's side:

* boot to ready: from before QEMU's process starts to the agent's "listening" console
  line (the moment our agent also writes its control-port ready);
* exec round trip: `busybox true` through the same agent protocol (`AgentClient`), over
  TCP (virtio-net, QEMU's user-mode network with a host port forwarded to the agent),
  since this host has no vhost-vsock; our VMM uses virtio-vsock;
* restore + exec: a new QEMU process started with `-loadvm` of a snapshot taken at ready
  (`savevm`), then a connection, HELLO and `busybox true`;
* reset + exec, on hardware KVM only: `loadvm` in the running process (QEMU's reset in
  place: all RAM and device state back), then the same. Not under kvm_pvm: see
  `NO_LOADVM_IN_PLACE`.

The guest's command line gets the virtio-net transport, `ip=` (static address, no DHCP)
and, after `--`, the agent's `--listen tcp:0.0.0.0:PORT --ready none`: the only
differences from ours. The transport is named on the command line by us, not by QEMU:
our kernel has no ACPI, so QEMU's default microvm (acpi=auto: on) describes its
virtio-mmio devices in tables the guest never reads (no eth0, the agent listens on a
network that does not exist: the host's connection is accepted by QEMU's user network and
never answered). With acpi=off QEMU would append `virtio_mmio.device=` itself, but at the
very end, after `--`, where it becomes an argument of init rather than a kernel
parameter; so auto-kernel-cmdline is off, the device is pinned to the first transport and
its address and IRQ are written before the `--`.

`ensure_qemu` installs Debian's qemu-system-x86 with apt-get when it is missing (as
scripts/bootstrap.sh installs the project's other tools), or raises `PeerUnavailable`
saying how to get it: a missing peer is never reported as a number.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pytest_supermachine.vmm.agent import AgentClient, AgentError

#: Binary -> the Debian package that has it (qemu-img keeps the `savevm` state).
QEMU_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils"}
#: What kvm_pvm can run at guest CPL0 (the same features our VMM's CPUID hides).
QEMU_CPU_PVM = (
    "host,-xsave,-avx,-avx2,-cx16,-smap,-pku,-fsgsbase,-pcid,-invpcid,-rdrand,"
    "-rdseed,-rdpid,-popcnt,+tsc-deadline,-arch-capabilities"
)
GUEST_IP = "10.0.2.15"
#: QEMU microvm's first virtio-mmio transport (acpi=off, so no second IO-APIC): 512 bytes
#: at 0xfeb00000, IRQ 5; the net device is pinned to it (`bus=virtio-mmio-bus.0`).
NET_TRANSPORT = "virtio_mmio.device=512@0xfeb00000:5"
AGENT_PORT = 5253
#: Why QEMU has no reset-in-place number under kvm_pvm (seen here in each of 3 tries, 2 Dec).
NO_LOADVM_IN_PLACE = (
    "QEMU's loadvm in a running process breaks the guest under kvm_pvm: once a command has"
    " run since savevm, the next command after loadvm kills the agent (init[1]: segfault at 0"
    " ip 0 error 14, kernel panic), while a loadvm right after savevm, with no page-table"
    " change between, works. The cause: kvm_pvm shadows the guest's page tables, and"
    " loadvm writes them back through QEMU's own mapping of guest RAM, which the shadow MMU"
    " neither write-protects nor is notified of, so it keeps translations of page tables"
    " that no longer exist. Our reset hit the same with a COPY reset and now deletes and"
    " re-adds the RAM memslots on nested PVM, which drops them all (docs/vmm.md)."
)
LISTENING = re.compile(rb"sm-agent: listening on tcp:[0-9.]+:\d+")


class PeerUnavailable(Exception):
    """QEMU is not installed and could not be installed; the message says how to get it."""


def ensure_qemu() -> str:
    """The QEMU binary, its tools installed with apt-get if missing (bootstrap.sh's way)."""
    missing = sorted({pkg for tool, pkg in QEMU_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return str(shutil.which("qemu-system-x86_64"))
    apt = shutil.which("apt-get")
    how = f"install it with `apt-get install {' '.join(missing)}` or run with --no-qemu"
    if apt is None:
        raise PeerUnavailable(f"QEMU is missing and there is no apt-get: {how}")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench_linux: installing {', '.join(missing)} (the QEMU baseline)", flush=True)
    for argv in (
        [*sudo, apt, "update", "-q"],
        [*sudo, apt, "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise PeerUnavailable(
                f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr[-500:]}; {how}"
            )
    still = [tool for tool in QEMU_TOOLS if shutil.which(tool) is None]
    if still:
        raise PeerUnavailable(f"installed {', '.join(missing)}, but {still} not on PATH: {how}")
    return str(shutil.which("qemu-system-x86_64"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuGuest:
    """One QEMU microvm running our kernel + initramfs, with the agent reachable over TCP."""

    def __init__(
        self,
        qemu: str,
        vmlinux: Path,
        initrd: Path,
        cmdline: str,
        *,
        mem_mib: int,
        cpu: str,
        state: Path | None = None,
        loadvm: str | None = None,
    ) -> None:
        """state: the qcow2 file `savevm` keeps its snapshots in (created when missing; by
        default one of this guest's own); loadvm: start from that snapshot of it instead of
        booting (QEMU's restore from file; one process at a time may hold the file)."""
        self._dir = Path(tempfile.mkdtemp(prefix="sm-bench-qemu-"))
        self.port = _free_port()
        self._monitor_path = self._dir / "monitor.sock"
        state = state or self._dir / "vmstate.qcow2"  # savevm keeps its snapshot in a qcow2 node
        if not state.exists():
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(state), "64M"],
                check=True,
                capture_output=True,
            )
        guest_cmdline = (
            f"{cmdline} console=ttyS0 {NET_TRANSPORT}"
            f" ip={GUEST_IP}::10.0.2.2:255.255.255.0::eth0:off"
            f" -- --listen tcp:0.0.0.0:{AGENT_PORT} --ready none"
        )
        self.argv = [
            qemu,
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off,auto-kernel-cmdline=off",
            "-accel",
            "kvm",
            "-cpu",
            cpu,
            "-m",
            str(mem_mib),
            "-kernel",
            str(vmlinux),
            "-initrd",
            str(initrd),
            "-append",
            guest_cmdline,
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-{GUEST_IP}:{AGENT_PORT}",
            "-device",
            "virtio-net-device,netdev=n0,bus=virtio-mmio-bus.0",
            "-drive",
            f"if=none,id=vmstate,format=qcow2,file={state}",
            "-monitor",
            f"unix:{self._monitor_path},server=on,wait=off",
            *(["-loadvm", loadvm] if loadvm else []),
        ]
        self._console = bytearray()
        self._console_cv = threading.Condition()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        self._monitor: socket.socket | None = None

    def _read_console(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            with self._console_cv:
                self._console += chunk
                self._console_cv.notify_all()
        with self._console_cv:
            self._console_cv.notify_all()

    def console_tail(self, n: int = 3000) -> str:
        with self._console_cv:
            return bytes(self._console[-n:]).decode(errors="replace")

    def wait_console(self, pattern: re.Pattern[bytes], timeout: float) -> float:
        """Seconds from QEMU's start to the first console match of ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._console_cv:
            while not pattern.search(self._console):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise PeerUnavailable(
                        f"QEMU never printed {pattern.pattern!r} (exit status "
                        f"{self.proc.poll()}); console tail:\n{self.console_tail()}"
                    )
                self._console_cv.wait(min(left, 1.0))
        return time.monotonic() - self.started

    def wait_ready(self, timeout: float) -> float:
        """Seconds from QEMU's start to the agent's listening line."""
        return self.wait_console(LISTENING, timeout)

    def connect(self, timeout: float = 120.0) -> AgentClient:
        """A handshaken agent client over the forwarded port (retried until the guest answers)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket()
            try:
                sock.settimeout(10)
                sock.connect(("127.0.0.1", self.port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return AgentClient(sock, timeout=min(30.0, max(deadline - time.monotonic(), 1)))
            except (AgentError, OSError) as e:
                # a QEMU just started has no forwarded port yet (refused), and user-mode
                # networking accepts on the host before the guest does (a guest not
                # listening yet shows up as a closed connection): try again
                sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise PeerUnavailable(
                        f"no agent HELLO over tcp:127.0.0.1:{self.port} within {timeout:.0f} s"
                        f" ({type(e).__name__}: {e}); console tail:\n{self.console_tail()}"
                    ) from e
                time.sleep(0.01)

    def monitor(self, command: str, timeout: float = 600.0) -> str:
        """One HMP command; returns its output (QEMU's human monitor, for savevm/loadvm)."""
        if self._monitor is None:
            self._monitor = socket.socket(socket.AF_UNIX)
            self._monitor.connect(str(self._monitor_path))
            self._read_prompt(timeout)
        self._monitor.sendall(command.encode() + b"\n")
        out = self._read_prompt(timeout)
        # HMP echoes the command line first; errors come back as text, not as a status
        if re.search(r"^Error|: error|failed", out, re.MULTILINE | re.IGNORECASE):
            raise PeerUnavailable(f"QEMU monitor `{command}`: {out.strip()}")
        return out

    def _read_prompt(self, timeout: float) -> str:
        assert self._monitor is not None
        self._monitor.settimeout(timeout)
        buf = b""
        while not buf.endswith(b"(qemu) "):
            chunk = self._monitor.recv(4096)
            if not chunk:
                raise PeerUnavailable(f"QEMU monitor closed; console tail:\n{self.console_tail()}")
            buf += chunk
        return buf.decode(errors="replace")

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
        self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
