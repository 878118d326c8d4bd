"""A virtual machine and its lifecycle: create, boot, start, wait, pause, stop.

Modelled on QEMU's python `qemu.machine`: one object owns one VM, its state
is explicit, and the console log survives the machine so a failure can show
what the guest said. The hot path (vCPU exits, console) runs in the C core;
this class orchestrates.

Lifecycle::

    CREATED --start()--> RUNNING --(guest stops)--> EXITED --stop()--> STOPPED
                            |  ^                                   ^
                   pause()  v  | resume()                          |
                          PAUSED -------------- stop() ------------+

`stop()` is always safe and idempotent; the expensive part of teardown
(closing the VM fd, unmapping RAM) runs on the reaper thread.

Why this module is longer than ~600 lines: `Machine` is the one object that owns the
lifecycle above, and each remaining method is a transition of it or an observation
that must respect it (boot only when CREATED, snapshot and reset around the pause
barrier, the agent session carried across restore and reset). Every concept with
a life of its own already has its module: exits.py (why it stopped), origin.py (the
snapshot it was restored from, its dirty pages and the RAM side of reset), vmstate.py
(vCPU and irqchip state), hostfacts.py, memory.py, devices/, boot.py. Splitting the
rest would split the state machine across files.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import functools
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ..errors import GuestCrashed, GuestTimeout, MachineError
from . import boot, hostfacts, layout, reaper, vmstate
from ._native import ffi, lib
from .agent import (
    AGENT_PORT,
    DEFAULT,
    DEFAULT_OUTPUT_LIMIT,
    DEFAULT_READ_LIMIT,
    DEFAULT_RUN_TIMEOUT,
    READY_PORT,
    AgentClient,
    AgentGuestStopped,
    AgentProtocolError,
    AgentRemoteError,
    AgentTimeout,
    DefaultLimit,
    OutputSink,
    RunResult,
    check_run_timeout,
    read_ready,
)
from .agent.users import ResolvedUser, resolve_in_guest
from .cpuid import CpuidTable
from .devices.hub import (
    BalloonSpec,
    DeviceHub,
    DeviceSpec,
    DiskSpec,
    FsSpec,
    NetSpec,
    VsockSpec,
)
from .devices.mmio_bus import DeviceBuses
from .devices.serial import DEFAULT_CONSOLE_LOG_BYTES, Serial
from .devices.virtio.balloon import BalloonStats
from .devices.virtio.vsock import PendingConnection, VsockError, VsockListener, VsockTimeout
from .exits import ExitReason, MachineExit
from .fsmounts import MountsArg, cmdline_token, mount_specs
from .kvm import Kvm, KvmError, Vcpu, Vm
from .memory import GuestMemory, PageWriter
from .origin import ResetStrategy, SnapshotOrigin
from .reset_cost import ResetChoice, ResetCostModel
from .restore_validation import publish_disk, validate_snapshot
from .snapshot import SnapshotChain, SnapshotInvalid, SnapshotRef, write_snapshot

_kvm_lock = threading.Lock()
_shared_kvm: Kvm | None = None


def shared_kvm() -> Kvm:
    """The process's one open /dev/kvm (opened on first use, with a precise error if unusable)."""
    global _shared_kvm
    with _kvm_lock:
        if _shared_kvm is None:
            _shared_kvm = Kvm()
        return _shared_kvm


class MachineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    STOPPED = "stopped"


@dataclass
class MachineConfig:
    """What to build: vCPUs, RAM, console. Validated when the machine is created."""

    vcpus: int = 1
    mem_mib: int = 256
    console_log_bytes: int = DEFAULT_CONSOLE_LOG_BYTES
    console_stream: IO[bytes] | int | None = None
    track_dirty_pages: bool = False
    reset_strategy: ResetStrategy = ResetStrategy.AUTO
    reset_costs: ResetCostModel = field(default_factory=ResetCostModel)
    vsock: bool = True
    disks: tuple[DiskSpec, ...] = ()
    balloon: BalloonSpec | None = None
    #: False: no NIC (hermetic); True: a NIC reaching anything; a list of ``host:port`` /
    #: ``cidr:port`` patterns: a NIC reaching only those (docs/network.md).
    network: bool | Sequence[str] | NetSpec = False
    #: Host directories in the guest: guest path -> `Mount` or host path (relative to the
    #: current directory), one virtio-fs device each (vmm/fsmounts.py); `validate` turns
    #: the mapping into `FsSpec`s. Linux guests only.
    mounts: MountsArg = ()

    def device_specs(self) -> list[DeviceSpec]:
        """The virtio devices, in slot order: vsock first (the agent's), disks, balloon, NIC,
        then mounts."""
        nic = NetSpec.from_setting(self.network)
        return [
            *([VsockSpec()] if self.vsock else []),
            *self.disks,
            *([self.balloon] if self.balloon is not None else []),
            *([nic] if nic else []),
            *self.fs_specs(),
        ]

    def fs_specs(self) -> tuple[FsSpec, ...]:
        return mount_specs(self.mounts)

    def validate(self) -> None:
        self.mounts = mount_specs(self.mounts)
        if not 1 <= self.vcpus <= lib.SM_MAX_VCPUS:
            raise MachineError(f"vcpus must be 1..{lib.SM_MAX_VCPUS}, got {self.vcpus}")
        if not layout.MIN_MEM_MIB <= self.mem_mib <= layout.MAX_MEM_MIB:
            raise MachineError(
                f"mem_mib must be {layout.MIN_MEM_MIB}..{layout.MAX_MEM_MIB}, got {self.mem_mib}"
            )
        nic = NetSpec.from_setting(self.network)
        if nic is not None and nic.allow is not None:
            from .devices.virtio.net import EgressPolicy, EgressPolicyError

            try:
                EgressPolicy.from_setting(list(nic.allow))
            except EgressPolicyError as e:
                raise MachineError(f"network=: {e}") from None


@dataclass
class MachineTimings:
    """Wall-clock milestones of one machine, in seconds (monotonic)."""

    created: float = 0.0
    create_seconds: float = 0.0
    started: float = 0.0
    exited: float = 0.0
    marks: list[tuple[int, float]] = field(default_factory=list)


class Machine:
    """One KVM virtual machine with its RAM, vCPU threads, COM1 and device buses."""

    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        kvm: Kvm | None = None,
        _memory: GuestMemory | None = None,
        _cpuids: Sequence[CpuidTable] | None = None,
        **overrides: Any,
    ):
        self.config = config or MachineConfig()
        for key, value in overrides.items():
            if not hasattr(self.config, key):
                raise TypeError(f"unknown machine option {key!r}")
            setattr(self.config, key, value)
        self.config.validate()
        t0 = time.monotonic()
        self.kvm = kvm or shared_kvm()
        self.state = MachineState.CREATED
        self.timings = MachineTimings(created=t0)
        #: What `run` uses when the caller gives no env/cwd (an OCI image's Env and WorkingDir;
        #: set by whoever hands the machine out) and what the image says about itself.
        self.default_env: Mapping[str, str] = {}
        self.default_cwd: str | None = None
        #: Whom `run` runs commands as when the caller names nobody (an OCI image's User);
        #: None: the agent's own user, root.
        self.default_user: ResolvedUser | None = None
        self.image_config: Any = None
        self._threads: list[threading.Thread] = []
        self._final_console: bytes | None = None
        self._exit: MachineExit | None = None
        self._lock = threading.Lock()
        self.vm: Vm = self.kvm.create_vm()
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self._core: Any = ffi.NULL
        self._origin: SnapshotOrigin | None = None
        self._agent: AgentClient | None = None
        self._agent_lock = threading.Lock()
        #: Connections opened to the guest agent (vsock connect + handshake) by this machine;
        #: a session carried by the snapshot across restore and reset opens none.
        self.agent_connects = 0
        self._vsock_connecting: set[PendingConnection] = set()  # failed at once if the guest stops
        self.page_writers: list[PageWriter] = []
        #: False promises that the guest never writes its page tables after boot (the
        #: microguest: an identity map the host builds), so a reset on nested PVM may keep
        #: KVM's shadow translations (see `reset`): 1.2 ms of a microguest reset + exec here.
        #: An image that knows sets it (`MicroguestImage.prepare`); the default is safe.
        self.guest_writes_page_tables = True
        self._forwards: list[Any] = []  # expose(): PortForward, closed by stop()
        #: Lines the VMM reports about this guest, oldest first (refused network connections:
        #: docs/network.md); emptied by reset, like the console log.
        self.host_log: collections.deque[str] = collections.deque(maxlen=2000)
        self.memory = _memory
        try:
            self._build(_cpuids)
        except BaseException:
            self._teardown()
            raise
        self.timings.create_seconds = time.monotonic() - t0

    def _register_ram(self, *, again: bool = False) -> None:
        """Give KVM the RAM slots. `again`: delete each first, which makes KVM drop every
        translation it built from the guest's page tables (see `reset`)."""
        assert self.memory is not None
        for slot, region in enumerate(self.memory.regions):
            address = self.memory.host_address(slot)
            log_dirty = self.config.track_dirty_pages
            if again:
                self.vm.set_user_memory_region(slot, region.gpa, 0, address, log_dirty=log_dirty)
            self.vm.set_user_memory_region(
                slot, region.gpa, region.size, address, log_dirty=log_dirty
            )

    def _build(self, cpuids: Sequence[CpuidTable] | None) -> None:
        cfg = self.config
        self.vm.create_irqchip()
        self.vm.create_pit2()
        if self.memory is None:
            self.memory = GuestMemory.anonymous(cfg.mem_mib * layout.MiB)
        elif self.memory.size != cfg.mem_mib * layout.MiB:
            raise MachineError(
                f"memory of {self.memory.size} bytes for a {cfg.mem_mib} MiB machine"
            )
        self._register_ram()
        self.cpuid = self.kvm.guest_cpuid()
        self.vcpu_cpuid: list[CpuidTable] = (
            list(cpuids)
            if cpuids
            else [self.cpuid.for_vcpu(i, cfg.vcpus) for i in range(cfg.vcpus)]
        )
        for i in range(cfg.vcpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid(self.vcpu_cpuid[i])
        lib.sm_core_init()
        self.buses = DeviceBuses()
        self._core = lib.sm_vm_new(self.vm.fd, cfg.vcpus, cfg.console_log_bytes, self.buses.handle)
        if self._core == ffi.NULL:
            raise MachineError("out of memory creating the VM's core state")
        self.buses.attach(self._core)
        for vcpu in self.vcpus:
            lib.sm_vm_set_vcpu(self._core, vcpu.index, vcpu.fd, vcpu.run)
        self.serial = Serial(self._core)
        if cfg.console_stream is not None:
            self.serial.attach_stream(cfg.console_stream)
        self.devices = DeviceHub(
            self.vm,
            self.memory,
            self.buses.mmio,
            cfg.device_specs(),
            discarder=self,
            log=self.host_log.append,
        )
        self.page_writers.append(self.devices)
        self.devices.watch(lib.sm_vm_exit_fd(self._core), self._on_guest_stopped)
        self._ready_listener: VsockListener | None = None

    # ------------------------------------------------------------------ boot

    def boot_direct64(
        self,
        kernel: Path | str | boot.ElfImage,
        *,
        mode: int = 0,
        arg: int = 0,
        devices: Sequence[boot.BootDevice] | None = None,
    ) -> None:
        """Load a 64-bit ELF guest and point the BSP at its entry (microguest protocol).

        See guest/microguest/bootinfo.h for the entry state.
        """
        self._require(MachineState.CREATED, "boot")
        assert self.memory is not None
        if self.config.fs_specs():
            raise MachineError(
                "mounts need a Linux guest (the microguest has no FUSE client); "
                "boot a Linux image or drop mounts="
            )
        image = kernel if isinstance(kernel, boot.ElfImage) else boot.parse_elf(Path(kernel))
        low_end = layout.CMDLINE_ADDR + layout.CMDLINE_MAX
        if min(s.paddr for s in image.segments) < low_end:
            raise MachineError(
                f"{image.path}: loads below {low_end:#x}, over the boot page tables; "
                f"link it at {layout.KERNEL_LOAD_ADDR:#x}"
            )
        boot.load_elf(self.memory, image)
        cr3 = boot.write_page_tables(self.memory)
        gdt = boot.write_gdt(self.memory)
        free_start = (image.end + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE
        if devices is None:
            devices = self.devices.boot_devices()
        info = boot.write_boot_info(
            self.memory,
            vcpus=self.config.vcpus,
            mode=mode,
            arg=arg,
            free_start=free_start,
            devices=devices,
        )
        bsp = self.vcpus[0]
        sregs = bsp.get_sregs()
        boot.setup_long_mode(sregs, cr3, gdt)
        bsp.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rip, regs.rdi, regs.rflags = image.entry, info, 0x2
        bsp.set_regs(regs)

    def boot_linux(
        self, kernel: Path | str, *, cmdline: str = "", initrd: bytes | Path | str | None = None
    ) -> str:
        """Load a Linux kernel; returns the full command line used.

        `kernel` is a `vmlinux` (entered through its PVH entry: no decompressor, the
        fast way) or a `bzImage` (the 64-bit boot protocol: zero page, entered in long
        mode). The command line gets `console=ttyS0` and one `virtio_mmio.device=`
        token per attached device appended, so the guest finds exactly the devices
        this machine has; with a NIC the ``ip=`` that configures it (the
        network's addressing: no DHCP client needed); with mounts the ``sm.mounts=``
        token the agent's init mounts them from (vmm/fsmounts.py); with a reporting balloon
        the free page reporting order for this RAM size (`balloon.reporting_order`). Power-off is the i8042 reset (boot with `reboot=k`),
        reported as RESET. The MP table describes every vCPU and the IOAPIC.
        """
        self._require(MachineState.CREATED, "boot")
        assert self.memory is not None
        full = " ".join(
            x
            for x in (
                cmdline,
                "console=ttyS0",
                boot.virtio_mmio_cmdline(self.devices.boot_devices()),
                self._ip_argument(),
                self._page_reporting_argument(),
                cmdline_token(self.config.fs_specs()),
            )
            if x
        )
        if initrd is not None and not isinstance(initrd, bytes):
            initrd = Path(initrd).read_bytes()
        kernel = Path(kernel)
        with open(kernel, "rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
        gdt = boot.write_gdt(self.memory)
        bsp = self.vcpus[0]
        sregs = bsp.get_sregs()
        regs = ffi.new("struct kvm_regs *")
        if is_elf:
            linux = boot.load_linux_pvh(
                self.memory, kernel, cmdline=full, initrd=initrd, vcpus=self.config.vcpus
            )
            boot.setup_protected_mode(sregs, gdt)
            regs.rbx = linux.start_info
        else:
            linux = boot.load_linux_bzimage(self.memory, kernel, cmdline=full, initrd=initrd)
            boot.write_mptable(self.memory, self.config.vcpus)
            boot.setup_bzimage_long_mode(self.memory, sregs)
            regs.rsi = linux.start_info
        bsp.set_sregs(sregs)
        regs.rip, regs.rflags = linux.entry, 0x2
        bsp.set_regs(regs)
        return full

    def _page_reporting_argument(self) -> str:
        """``sm.page_reporting_order=`` for a balloon with free page reporting, else nothing."""
        if not any(
            isinstance(d.spec, BalloonSpec) and d.spec.reporting for d in self.devices.devices
        ):
            return ""
        from .devices.virtio.balloon import reporting_order_cmdline

        return reporting_order_cmdline(self.config.mem_mib << 20)

    def _ip_argument(self) -> str:
        """``ip=`` for the guest's NIC, or nothing without one."""
        if not any(isinstance(d.spec, NetSpec) for d in self.devices.devices):
            return ""
        from .devices.virtio.net import kernel_ip_argument

        return kernel_ip_argument(self.devices.nic().egress.addressing)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start every vCPU thread; returns once all of them are inside the run loop."""
        self._require(MachineState.CREATED, "start")
        self.devices.start()
        self.timings.started = time.monotonic()
        for vcpu in self.vcpus:
            t = threading.Thread(
                target=self._vcpu_main,
                args=(vcpu.index,),
                name=f"supermachine-vcpu{vcpu.index}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()
        self.state = MachineState.RUNNING
        rc = lib.sm_vm_wait_running(self._core, len(self.vcpus), 10_000)
        if rc == -errno.ETIMEDOUT:
            self.stop()
            raise MachineError("vCPU threads did not start within 10 s")

    def _vcpu_main(self, index: int) -> None:
        lib.sm_vcpu_run(self._core, index)

    def wait(self, timeout: float | None = None) -> MachineExit:
        """Block until the guest stops; return why. Raises `GuestTimeout` (with console tail)."""
        if self.state is MachineState.CREATED:
            raise MachineError("wait() on a machine that was never started")
        if self.state is not MachineState.STOPPED:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:  # short slices so Ctrl-C reaches Python
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                rc = lib.sm_vm_wait_stopped(self._core, max(int(left * 1000), 0))
                if rc != -errno.ETIMEDOUT:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise GuestTimeout(
                        f"guest still running after {timeout:g} s", self.serial.tail()
                    )
            self._join_threads()
            self._on_exit()
        exit_ = self.exit_info()
        for error in (self.buses.error, self.devices.error):
            if error is not None:
                raise MachineError(f"a device failed: {error!r}") from error
        return exit_

    def run_until_exit(
        self, timeout: float | None = None, expect: ExitReason | None = ExitReason.HALT
    ) -> MachineExit:
        """start() + wait(); raise `GuestCrashed` (with console tail) unless the exit is `expect`."""
        self.start()
        try:
            exit_ = self.wait(timeout)
        except GuestTimeout:
            self.stop()
            raise
        if expect is not None and exit_.reason is not expect:
            raise GuestCrashed(
                f"guest stopped unexpectedly: {exit_.describe()}", self.serial.tail()
            )
        return exit_

    def _on_exit(self) -> None:
        if self.state in (MachineState.RUNNING, MachineState.PAUSED):
            self.state = MachineState.EXITED
            self.timings.exited = time.monotonic()

    def exit_info(self) -> MachineExit:
        """Why the machine stopped (reason NONE while it runs)."""
        if self._exit is not None:
            return self._exit
        info = ffi.new("struct sm_exit_info *")
        lib.sm_vm_exit_info(self._core, info)
        exit_ = MachineExit(
            ExitReason(info.reason),
            info.vcpu,
            info.code,
            info.kvm_exit,
            info.suberror,
            tuple(info.detail),
        )
        if exit_.reason is not ExitReason.NONE and self.state is not MachineState.RUNNING:
            self._exit = exit_
        return exit_

    def wait_console(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the console log matches `pattern`; raise `GuestTimeout` or `GuestCrashed`.

        The log is polled (every 2 ms) because console output is written by the C
        core without waking Python; a guest that stops first is reported at once.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console)
            if match:
                return match
            if self.state is MachineState.STOPPED or self.exit_info().reason is not ExitReason.NONE:
                raise GuestCrashed(
                    f"guest stopped before printing {regex.pattern!r}: "
                    f"{self.exit_info().describe()}",
                    self.serial.tail() if self._final_console is None else self.console[-4000:],
                )
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"console did not show {regex.pattern!r} within {timeout:g} s",
                    self.serial.tail(),
                )
            time.sleep(0.002)

    def wait_ready(self, timeout: float) -> float:
        """Wait for the guest agent's READY; returns seconds since start().

        READY is a write to the control port (timestamped in C) or, for a guest that
        cannot do port I/O, a connection to vsock port READY_PORT (timestamped here;
        agents retry that connection, so listening from here on is early enough). If
        the caller listens on READY_PORT itself, only the control port counts.
        """
        deadline = time.monotonic() + timeout
        if self._ready_listener is None and self.config.vsock:
            with contextlib.suppress(VsockError):
                self._ready_listener = self.devices.vsock().listen(READY_PORT)
        while True:
            left = min(0.05 if self._ready_listener else 0.2, deadline - time.monotonic())
            rc = lib.sm_vm_wait_ready(self._core, max(int(left * 1000), 0))
            if rc == 0:
                return lib.sm_vm_ready_ns(self._core) / 1e9 - self.timings.started
            if self._ready_listener is not None and self._ready_listener.pending():
                ready_at = time.monotonic() - self.timings.started
                sock, _port = self._ready_listener.accept(timeout=1)
                with sock:
                    read_ready(sock, timeout=max(deadline - time.monotonic(), 1.0))
                return ready_at
            if rc == -errno.ESRCH:
                raise GuestCrashed(
                    f"guest stopped before it was ready: {self.exit_info().describe()}",
                    self.serial.tail(),
                )
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"guest not ready after {timeout:g} s", self.serial.tail())

    def pause(self, timeout: float = 5.0) -> None:
        """Park every vCPU at a clean instruction boundary (pending I/O completed)."""
        self._require(MachineState.RUNNING, "pause")
        rc = lib.sm_vm_pause(self._core, int(timeout * 1000))
        if rc == -errno.ESRCH:
            self._join_threads()
            self._on_exit()
            raise MachineError(f"cannot pause: the guest stopped ({self.exit_info().describe()})")
        if rc == -errno.ETIMEDOUT:
            lib.sm_vm_resume(self._core)
            raise MachineError(f"vCPUs did not park within {timeout:g} s")
        self.state = MachineState.PAUSED

    def resume(self) -> None:
        """Let a paused machine run again (or start one that has not started yet)."""
        if self.state is MachineState.CREATED:
            self.start()
            return
        self._require(MachineState.PAUSED, "resume")
        self.state = MachineState.RUNNING
        lib.sm_vm_resume(self._core)

    def wait_idle(self, timeout: float = 0.2) -> bool:
        """Wait up to ``timeout`` s for the guest to be idle; True if it is, else False.

        Idle: every vCPU halted with no interrupt waiting (`Vcpu.is_idle`). Take a
        snapshot that machines are reset to (a base, a layer) only then: an interrupt
        caught pending would be taken again after every restore and reset, a wake-up
        for nothing just as the next request arrives. A guest that is never idle
        (a busy loop, a periodic tick) costs ``timeout`` and is snapshotted as it is.
        A machine that is not running is left alone (False unless it is idle); a stopped
        one has no vCPUs left to ask (`MachineError`).
        """
        if self.state is MachineState.STOPPED:
            raise MachineError("wait_idle(): the machine is stopped; it has no vCPUs to ask")
        deadline = time.monotonic() + timeout
        while True:
            with self.parked():
                idle = all(vcpu.is_idle() for vcpu in self.vcpus)
            if idle or self.state is not MachineState.RUNNING or time.monotonic() >= deadline:
                return idle
            time.sleep(0.001)

    @contextlib.contextmanager
    def paused(self, timeout: float = 5.0) -> Iterator[Machine]:
        """The pause barrier: every vCPU parked for the body, resumed after (even on error)."""
        self.pause(timeout)
        try:
            yield self
        finally:
            if self.state is MachineState.PAUSED:
                self.resume()

    @contextlib.contextmanager
    def parked(self, timeout: float = 5.0) -> Iterator[Machine]:
        """Every vCPU parked for the body, whatever the state: a running machine is paused
        and resumed after (even on error); one that is not running is left as it is."""
        if self.state is not MachineState.RUNNING:
            yield self
            return
        with self.paused(timeout):
            yield self

    def stop(self) -> None:
        """Stop the guest and release the VM (teardown finishes on the reaper thread)."""
        with self._lock:
            if self.state is MachineState.STOPPED:
                return
            if self._core != ffi.NULL:
                lib.sm_vm_stop(self._core)
                self._join_threads()
                self._on_exit()
                self.exit_info()
                if self._exit is None:
                    self._exit = MachineExit(ExitReason.CANCELED, -1, 0, 0, 0, (0, 0, 0, 0))
                self._final_console = self.serial.log()
            self.state = MachineState.STOPPED
            self._teardown()

    close = stop

    def _join_threads(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
            if t.is_alive():
                raise MachineError(f"{t.name} did not leave the run loop within 10 s")
        self._threads = []

    def _teardown(self) -> None:
        """Hand fds, mappings and the C state to the reaper; nothing of ours is used after this."""
        for forward in self._forwards:
            forward.close()
        self._forwards = []
        self._drop_agent()
        core, vcpus, vm, memory, buses = (
            self._core,
            self.vcpus,
            self.vm,
            self.memory,
            getattr(self, "buses", None),
        )
        devices = getattr(self, "devices", None)
        origin = self._origin
        self._core, self.vcpus, self.memory, self._origin = ffi.NULL, [], None, None

        def release(buses: DeviceBuses | None = buses) -> None:
            # `buses` rides along so its callback handle outlives the C state that points at it.
            if devices is not None:
                devices.close()
            for vcpu in vcpus:
                vcpu.close()
            vm.close()  # before the RAM its memory slots point at (memory.py's lifetime rule)
            if memory is not None:
                memory.close()
            if core != ffi.NULL:
                lib.sm_vm_free(core)
            if origin is not None:
                origin.close()

        reaper.reap(release)

    def _require(self, state: MachineState, action: str) -> None:
        if self.state is not state:
            raise MachineError(f"cannot {action} a machine that is {self.state.value}")

    # ------------------------------------------------------------------ snapshots

    @classmethod
    def restore(
        cls,
        path: str | Path,
        *,
        kvm: Kvm | None = None,
        start: bool = True,
        console_stream: IO[bytes] | int | None = None,
        console_log_bytes: int = DEFAULT_CONSOLE_LOG_BYTES,
        network: bool | Sequence[str] | None = None,
    ) -> Machine:
        """A new machine continuing exactly where the snapshot at `path` (or its chain) was.

        `network` replaces the NIC's egress policy recorded in the snapshot (True:
        anything; a list: only those): the policy lives on the host, the guest's state
        does not depend on it. The NIC itself cannot come or go: asking for a policy
        for a snapshot without one (or ``False`` for one with one) is a `MachineError`.

        RAM is mapped MAP_PRIVATE from the snapshot file(s), so restore costs what the
        guest touches, not the RAM size; machines restored from one file share its page
        cache. Refuses (SnapshotError subclasses) corrupt files, broken chains,
        snapshots from another CPU model or KVM ABI, and (`SnapshotInvalid`, naming file,
        section and problem) any state this VMM could not have written: see
        vmm/restore_validation.py. Nothing else escapes for a bad file.
        """
        kvm = kvm or shared_kvm()
        chain = SnapshotChain.open(path)
        try:
            hostfacts.check_snapshot(chain.files, hostfacts.host_facts(kvm))
            plan = validate_snapshot(chain, kvm)
            sections = chain.sections
            memory = chain.map_ram()
        except BaseException:
            chain.close()
            raise
        nic = next((x for x in plan.devices if isinstance(x, NetSpec)), None)
        if network is not None:
            try:
                nic = _replace_policy(nic, network)
            except BaseException:
                memory.close()
                chain.close()
                raise
        try:
            m = cls(
                MachineConfig(
                    vcpus=plan.vcpus,
                    mem_mib=plan.mem_bytes >> 20,
                    console_log_bytes=console_log_bytes,
                    console_stream=console_stream,
                    track_dirty_pages=True,
                    vsock=any(isinstance(x, VsockSpec) for x in plan.devices),
                    disks=tuple(x for x in plan.devices if isinstance(x, DiskSpec)),
                    balloon=next((x for x in plan.devices if isinstance(x, BalloonSpec)), None),
                    network=nic or False,
                    mounts=tuple(x for x in plan.devices if isinstance(x, FsSpec)),
                ),
                kvm=kvm,
                _memory=memory,
                _cpuids=plan.cpuids,
            )
        except BaseException:
            memory.close()
            chain.close()
            raise
        try:
            state = vmstate.prepare(m.vm, m.vcpus, m.serial, sections)
        except BaseException:
            m.stop()
            chain.close()
            raise
        m._origin = SnapshotOrigin(chain, state, m.vm, memory, m.page_writers)
        try:
            try:
                state.apply()
            except KvmError as e:  # the first apply: KVM refused a recorded value
                raise SnapshotInvalid("vcpu and VM state", str(e), chain.leaf.path) from None
            try:
                m.devices.restore([f.sections for f in chain.files])
            except SnapshotInvalid as e:
                raise e.in_file(chain.leaf.path) from None
            m.devices.clear_written_pages()  # restoring queues is not a guest-visible change
            try:
                m._adopt_agent_session()
            except AgentProtocolError as e:
                raise SnapshotInvalid("agent session", str(e), chain.leaf.path) from None
            if start:
                m.start()
        except BaseException:
            m.stop()
            raise
        return m

    def snapshot(
        self, path: str | Path, *, full: bool = False, durable: bool = True
    ) -> SnapshotRef:
        """Write this machine's complete state to `path`; the guest keeps running.

        A running machine is parked at the pause barrier for the capture and resumed
        after. A machine restored from a snapshot writes a **diff** against it (only the
        pages changed since the restore or last reset) unless `full`; a booted one
        writes a full snapshot. A loaded machine that was never started can be
        snapshotted too (its guest will start from its entry point on restore).
        Returns a reference usable as a later diff's parent.
        """
        if self.state is MachineState.STOPPED:
            raise MachineError(f"cannot snapshot a machine that is {self.state.value}")
        was_running = self.state is MachineState.RUNNING
        if was_running:
            try:
                self.pause()
            except MachineError:
                if self.state is not MachineState.EXITED:
                    raise
                # The guest stopped (crashed, powered off) before it could be parked: its
                # vCPU threads are gone, so the capture below takes the stopped state as is.
        try:
            with self.devices.quiesced():
                return self._write_snapshot(path, full=full, durable=durable)
        finally:
            if was_running and self.state is MachineState.PAUSED:
                self.resume()

    def _write_snapshot(self, path: str | Path, *, full: bool, durable: bool) -> SnapshotRef:
        """Capture and write; the vCPUs are parked (or stopped) and the devices quiesced."""
        if self.state is MachineState.EXITED:
            for vcpu in self.vcpus:
                lib.sm_vcpu_settle(self._core, vcpu.index)
        assert self.memory is not None
        diff = self._origin is not None and not full
        sections = vmstate.capture(
            self.vm,
            self.vcpus,
            self.vcpu_cpuid,
            self.serial,
            mem_bytes=self.memory.size,
            device_specs=[
                publish_disk(d.spec, Path(path)) if isinstance(d.spec, DiskSpec) else spec
                for d, spec in zip(self.devices.devices, self.devices.specs(), strict=True)
            ],
        )
        sections.update(self.devices.capture(diff=diff))
        facts = hostfacts.host_facts(self.kvm, self.vcpu_cpuid[0])
        if not diff:
            return write_snapshot(
                path, sections=sections, host_facts=facts, memory=self.memory, durable=durable
            )
        assert self._origin is not None
        return write_snapshot(
            path,
            sections=sections,
            host_facts=facts,
            memory=self.memory,
            pages=self._origin.changed_pages(),
            parent=self._origin.parent,
            durable=durable,
        )

    def dirty_pages(self) -> int:
        """Pages changed since the restore or last reset (guest and device writes)."""
        if self._origin is None:
            raise MachineError("dirty pages are tracked only for machines restored from a snapshot")
        with self.parked():
            return self._origin.harvest().count()

    def reset(self, *, resume: bool = True, strategy: ResetStrategy | None = None) -> None:
        """Return this machine in place to the snapshot it was restored from.

        Parks the vCPUs, returns exactly the pages changed since to the snapshot's
        bytes (see ResetStrategy: copied back, or dropped with MADV_DONTNEED so they
        read the file again), copies back the pages a diff chain overlays, re-applies
        vCPU, irqchip, PIT, clock, serial and device state (disk writes since are
        dropped; the agent session the snapshot carried continues, other vsock
        connections are reset), and lets the guest run again (with
        `resume=False` it stays at the snapshot's instruction until `resume()`). The
        console log starts afresh. Works whether the guest was running, paused or had
        stopped (crashed, powered off).
        """
        if self._origin is None:
            raise MachineError("reset() needs a machine restored from a snapshot (Machine.restore)")
        if self.state is MachineState.STOPPED:
            raise MachineError("cannot reset a machine that is stopped")
        if self.state is MachineState.RUNNING:
            try:
                self.pause()
            except MachineError:
                if self.state is not MachineState.EXITED:
                    raise
        self._drop_agent()
        with self.devices.quiesced():
            self._origin.reset_memory(
                strategy or self.config.reset_strategy, self.config.reset_costs
            )
            if self.kvm.pvm and self.guest_writes_page_tables:
                # kvm_pvm shadows the guest's page tables, and KVM does not see the host
                # put their pages back (a copy is no event at all; MADV_DONTNEED zaps only
                # the mappings *of* a page, not those built *from* it): its shadow tables
                # would keep the guest's post-snapshot mappings. A process that lived
                # through the reset and had forked since (COW: its stack moved to a
                # copy) then ran on the copy's bytes: the agent died at ip 0 after a
                # connect_tcp. A memslot deletion zaps them all (hardware KVM with
                # EPT/NPT walks the guest's tables itself and needs none of this).
                self._register_ram(again=True)
            self._origin.state.apply()
            self.devices.reset()
        self._adopt_agent_session()
        lib.sm_serial_log_clear(self._core)
        self.host_log.clear()
        lib.sm_vm_clear_ready(self._core)
        self._exit = None
        if self.state is not MachineState.PAUSED:  # the guest had stopped: its threads are gone
            lib.sm_vm_rearm(self._core)
            self.state = MachineState.CREATED
        if resume:
            self.resume()

    # ------------------------------------------------------------------ memory

    def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Give the host memory behind page-aligned guest ranges back (the balloon's
        `PageDiscarder`): through the snapshot origin, which keeps dirty-page tracking
        true, or straight onto RAM for a booted machine."""
        if self._origin is not None:
            self._origin.discard(ranges)
        elif self.memory is not None:
            for gpa, length in ranges:
                self.memory.discard(gpa, length)

    def balloon(self, target_mib: float, *, timeout: float | None = 60.0) -> BalloonStats:
        """Ask the guest to hand `target_mib` MiB of its RAM to the balloon (0: all back).

        The guest's balloon driver inflates (its MemTotal drops by what it gives; the host
        gets the memory back) or deflates towards the target. With `timeout` (seconds)
        this waits until the driver reports the balloon at the target, else `GuestTimeout`
        (a guest without a balloon driver never gets there); None returns at once. A
        reset or restore returns the balloon to the snapshot's. Needs a machine created
        with ``balloon=BalloonSpec()`` (`MachineError` otherwise).
        """
        pages = round(target_mib * layout.MiB) // layout.PAGE_SIZE
        if not 0 <= pages <= self.config.mem_mib * layout.MiB // layout.PAGE_SIZE:
            raise MachineError(f"balloon target {target_mib} MiB is not 0..{self.config.mem_mib}")
        device, transport = self.devices.balloon()
        with transport.lock:
            device.set_target(pages)
        if timeout is not None and not device.wait_actual(pages, timeout, stop=self._guest_stopped):
            self._require_guest_running("balloon")
            raise GuestTimeout(
                f"the guest's balloon holds {device.actual_pages} pages, not the "
                f"{pages} asked for, after {timeout:g} s",
                self.serial.tail(),
            )
        return device.stats()

    def balloon_stats(self) -> BalloonStats:
        """What the balloon holds and has given back (target, actual, reported pages)."""
        device, transport = self.devices.balloon()
        with transport.lock:
            return device.stats()

    def _guest_stopped(self) -> bool:
        return self.state is MachineState.STOPPED or (
            self._core != ffi.NULL and self.exit_info().reason is not ExitReason.NONE
        )

    @property
    def last_reset(self) -> ResetStrategy | None:
        """What the last reset did with the dirtied pages: COPY or DISCARD (AUTO picks per reset)."""
        return None if self._origin is None else self._origin.last_reset

    def reset_choice(self) -> ResetChoice:
        """The cheapest way back to the snapshot now: COPY or DISCARD in place, or RESTORE
        (a fresh `Machine.restore` costs less in all); by `config.reset_costs`
        (vmm/reset_cost.py) from the pages changed so far. The pool asks this before
        reusing a parked machine. Pauses a running machine for the count."""
        if self._origin is None:
            raise MachineError("reset_choice() needs a machine restored from a snapshot")
        with self.parked():
            return self._origin.choose(self.config.reset_costs)

    # ------------------------------------------------------------------ the guest agent

    #: The timeout of a `run` given none, and the bytes each of its output streams
    #: keeps: the agent client's defaults unless changed on the class or an instance
    #: (the plugin sets both from its settings).
    run_timeout: float = DEFAULT_RUN_TIMEOUT
    output_limit: int | None = DEFAULT_OUTPUT_LIMIT

    def agent(self, timeout: float = 30.0) -> AgentClient:
        """The connection to the guest agent (vsock port 5253), opened on first use.

        Opening it — the vsock connect, waiting for the guest to answer, the
        handshake — takes at most ``timeout`` seconds (``math.inf``: no limit),
        else `AgentTimeout` with the console tail. A guest that has stopped, or
        stops meanwhile, raises `AgentGuestStopped` (a `GuestCrashed`) at once.
        A snapshot taken while the connection is idle carries it: restore and reset
        bring it back with the guest, so no connect and no handshake are needed
        (`agent_connects` counts the ones made). Without such a session, or once the
        connection is closed (either side), the next call reconnects.
        """
        deadline = time.monotonic() + timeout
        # Another thread may be connecting: wait for it only as long as our own deadline.
        if not self._agent_lock.acquire(timeout=-1 if timeout == math.inf else max(timeout, 0)):
            raise AgentTimeout(
                f"another thread was still connecting to the guest agent after {timeout:.3g} s",
                self._console_tail(),
            )
        try:
            client = self._agent
            if client is not None and not client.closed:
                client.run_timeout, client.output_limit = self.run_timeout, self.output_limit
                return client
            self._agent = None
            self._require_guest_running("no guest agent")
            return self._open_agent(deadline)
        finally:
            self._agent_lock.release()

    def _open_agent(self, deadline: float) -> AgentClient:
        """Connect and handshake by ``deadline``; the caller holds the agent lock."""
        timeout = deadline - time.monotonic()
        try:
            sock, host_port = self._vsock_connect(AGENT_PORT, max(timeout, 0.001))
        except VsockTimeout as exc:
            raise AgentTimeout(
                f"the guest agent did not answer on vsock port {AGENT_PORT} within "
                f"{timeout:.3g} s (is the guest up and its agent listening?)",
                self._console_tail(),
            ) from exc
        client = AgentClient(
            sock,
            console_tail=self.serial.tail,
            run_timeout=self.run_timeout,
            output_limit=self.output_limit,
            handshake=False,
        )
        self._agent = client  # from here on a guest that stops aborts the handshake
        try:
            self._require_guest_running("no guest agent")
            client.handshake(max(deadline - time.monotonic(), 0.001))
        except BaseException:
            client.close()
            self._agent = None
            raise
        self.agent_connects += 1
        self._carry_agent(client, host_port)
        return client

    def _carry_agent(self, client: AgentClient, host_port: int) -> None:
        """Make the agent connection part of this machine's state (snapshots record it)."""
        with contextlib.suppress(VsockError):  # already gone again: nothing to carry
            self.devices.vsock().carry(host_port, AGENT_PORT, lambda: self._agent_session(client))

    def _agent_session(self, client: AgentClient) -> dict[str, Any] | None:
        """At capture: the agent session's state if it is worth carrying, else None.

        Carried only while the guest runs (a stopped guest's agent answers nothing)
        and the client is this machine's current one and between exchanges."""
        if self.state is not MachineState.PAUSED or self._agent is not client:
            return None
        return client.session_state()

    def _adopt_agent_session(self) -> None:
        """After restore or reset: continue the agent session the snapshot carried, if any.

        Raises `AgentProtocolError` for a recorded session no capture could have written.
        """
        if not self.config.vsock:
            return
        for carried in self.devices.vsock().take_carried():
            if carried.guest_port != AGENT_PORT or self._agent is not None:
                carried.socket.close()  # nobody continues it: closed towards the guest
                continue
            client = AgentClient(
                carried.socket,
                console_tail=self.serial.tail,
                run_timeout=self.run_timeout,
                output_limit=self.output_limit,
                handshake=False,
            )
            try:
                client.resume_session(carried.owner)
            except BaseException:
                client.close()
                raise
            with self._agent_lock:
                self._agent = client
            self._carry_agent(client, carried.host_port)

    def _require_guest_running(self, what: str) -> None:
        """Raise `AgentGuestStopped` (with the console tail) if the guest stopped, else
        `MachineError` unless the machine is running or paused."""
        exit_ = self.exit_info() if self._core != ffi.NULL else self._exit
        if exit_ is not None and exit_.reason not in (ExitReason.NONE, ExitReason.CANCELED):
            raise AgentGuestStopped(
                f"{what}: the guest stopped: {exit_.describe()}", self._console_tail()
            )
        if self.state not in (MachineState.RUNNING, MachineState.PAUSED):
            raise MachineError(f"{what}: the machine is {self.state.value}")

    def _console_tail(self) -> str:
        return self.serial.tail() if self._final_console is None else self.console[-4000:]

    def _vsock_connect(self, port: int, timeout: float) -> tuple[socket.socket, int]:
        """Connect to a guest vsock port within ``timeout``; a guest that stops fails it at once.

        Returns the socket and the connection's host port."""
        pending = self.devices.vsock().connect_nowait(port)
        self._vsock_connecting.add(pending)
        try:
            self._require_guest_running(f"connecting to guest vsock port {port}")
            return pending.result(None if timeout == math.inf else timeout), pending.host_port
        except VsockError:
            self._require_guest_running(f"connecting to guest vsock port {port}")
            raise
        except BaseException:
            pending.socket.close()
            raise
        finally:
            self._vsock_connecting.discard(pending)

    def _on_guest_stopped(self) -> None:
        """Event thread: the machine got an exit reason; fail agent calls now, not at timeout."""
        exit_ = self.exit_info()
        for pending in list(self._vsock_connecting):
            pending.complete(VsockError("the guest stopped"))  # the waiter raises the reason
        agent = self._agent  # no lock: agent() may hold it while it waits on this thread
        if agent is not None and exit_.reason is not ExitReason.CANCELED:
            agent.abort(
                AgentGuestStopped,
                f"the guest stopped while the host waited for its agent: {exit_.describe()}",
                self.serial.tail(),
            )

    def _drop_agent(self) -> None:
        with self._agent_lock:
            if self._agent is not None:
                self._agent.close()
                self._agent = None

    def _call_budget(self, timeout: float | None, default: float) -> Callable[[], float]:
        """``timeout`` (or ``default``) as a clock: seconds left of the whole call, checked."""
        total = check_run_timeout(default if timeout is None else timeout)
        deadline = time.monotonic() + total

        def left() -> float:
            if total == math.inf:
                return math.inf
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(
                    f"the guest agent call did not finish within {total:g} s", self.serial.tail()
                )
            return remaining

        return left

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | str | None = None,
        check: bool = False,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        output_limit: int | DefaultLimit | None = DEFAULT,
        user: str | int | None = None,
    ) -> RunResult:
        """Run a command in the guest through its agent; see `AgentClient.run`.

        A string runs through the guest's shell, a list as argv. ``timeout``
        (seconds; ``None`` means `run_timeout`, 300 s unless the plugin's
        ``--supermachine-run-timeout`` or the caller changed it; ``math.inf``
        means none) covers the whole call, connecting to the agent included:
        the command is killed in the guest when it runs out and the result has
        ``timed_out=True``; a guest that stops answering raises `AgentTimeout`
        (with the console tail) at most ``kill_grace`` seconds later, a guest
        that stops raises `AgentGuestStopped` at once. Each of stdout and
        stderr keeps at most ``output_limit`` bytes (`output_limit` unless
        given; ``None``: unlimited), the result's ``stdout_truncated`` /
        ``stderr_truncated`` say if some was dropped; ``stdout=``/``stderr=`` a
        binary file or callable streams it there instead. ``check`` raises
        `CommandFailed` on a non-zero exit. ``env`` adds to `default_env`; ``cwd``
        defaults to `default_cwd` (an image's configured environment and directory).
        ``user`` (``name``, ``uid``, ``name:group``, ``uid:gid``, resolved in the
        guest's /etc/passwd and /etc/group as docker does; `UserNotFound` if it is
        not there) runs the command as that user, with its supplementary groups
        and ``HOME`` unless ``env`` sets one; default: `default_user` (an
        image's ``User``), else root.
        """
        if self.default_env:
            env = {**self.default_env, **(env or {})}
        if cwd is None:
            cwd = self.default_cwd
        left = self._call_budget(timeout, self.run_timeout)
        client = self.agent(timeout=left())
        who = self.default_user
        if user is not None:
            read = functools.partial(client.read_file, timeout=left(), limit=1 << 20)
            who = resolve_in_guest(user, read, AgentRemoteError)
        if who is not None and "HOME" not in (env or {}):
            env = {**(env or {}), "HOME": who.home}
        return client.run(
            cmd,
            timeout=left(),
            env=env,
            cwd=cwd,
            input=input,
            check=check,
            stdout=stdout,
            stderr=stderr,
            output_limit=self.output_limit if output_limit is DEFAULT else output_limit,
            user=None if who is None else who.run_as,
        )

    def write_file(
        self, path: str, data: bytes, mode: int = 0o644, *, timeout: float | None = None
    ) -> None:
        """Create or replace a file in the guest, all of it within ``timeout`` (default 30 s)."""
        left = self._call_budget(timeout, 30.0)
        self.agent(timeout=left()).write_file(path, data, mode, timeout=left())

    def read_file(
        self, path: str, *, timeout: float | None = None, limit: int | None = DEFAULT_READ_LIMIT
    ) -> bytes:
        """The contents of a file in the guest, all of it within ``timeout`` (default 30 s).

        A file over ``limit`` bytes (128 MiB by default, ``None`` for no limit)
        raises `AgentFileTooLarge`; see `AgentClient.read_file`.
        """
        left = self._call_budget(timeout, 30.0)
        return self.agent(timeout=left()).read_file(path, timeout=left(), limit=limit)

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A host stream socket connected to a guest vsock listener on ``port``.

        Raises `VsockConnectionRefused` if nothing listens, `VsockTimeout` after
        ``timeout`` seconds without an answer, `AgentGuestStopped` (a
        `GuestCrashed`) at once if the guest stops or has stopped.
        """
        self._require_guest_running(f"connecting to guest vsock port {port}")
        return self._vsock_connect(port, timeout)[0]

    def connect_tcp(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A host socket connected to TCP `port` on the guest's 127.0.0.1.

        Goes through the agent over vsock (a TCP_CONNECT connection of its own),
        so it works without a NIC; a server the guest runs on its loopback or on
        any address is reached. Closing or ``shutdown(SHUT_WR)`` on the socket is a
        close or FIN for the guest server. Raises `AgentRemoteError` (errno
        ``ECONNREFUSED``) if nothing listens, `AgentNoTcp` on an image without a
        TCP/IP stack (the microguest), `AgentTimeout` after `timeout` seconds.
        """
        from .agent.tcp import open_tcp_stream

        left = self._call_budget(timeout, 10.0)
        self._require_guest_running(f"connecting to guest TCP port {port}")
        try:
            sock = self._vsock_connect(AGENT_PORT, left())[0]
        except VsockTimeout as exc:
            raise AgentTimeout(
                f"the guest agent did not answer on vsock port {AGENT_PORT} within {timeout:g} s",
                self._console_tail(),
            ) from exc
        return open_tcp_stream(sock, port, left())

    def expose(self, port: int, *, tls: bool = False, host_port: int = 0) -> tuple[str, int]:
        """Forward a host listener on ``127.0.0.1`` into guest TCP `port`; returns (host, port).

        Each connection to it is a `connect_tcp` (no NIC needed). With `tls` the
        host terminates TLS with a certificate for 127.0.0.1/localhost signed by
        the session's CA, whose file is `tls_ca`. The listener lives until the
        machine stops and keeps working across `reset` (connections open at the
        reset are cut). Exposing the same port again returns the same address.
        """
        from .expose import GUEST_OPEN_TIMEOUT, PortForward

        for forward in self._forwards:
            if forward.guest_port == port and forward.tls == tls:
                return forward.address
        context = None
        if tls:
            from .tls import session_certificates

            context = session_certificates().server_context()
        forward = PortForward(
            port,
            functools.partial(self.connect_tcp, timeout=GUEST_OPEN_TIMEOUT),
            tls=context,
            port=host_port,
        )
        self._forwards.append(forward)
        return forward.address

    @property
    def tls_ca(self) -> Path:
        """The CA certificate file that verifies ``expose(..., tls=True)`` listeners."""
        from .tls import session_certificates

        return session_certificates().ca

    def listen(self, port: int, backlog: int = 16) -> VsockListener:
        """Accept guest-initiated vsock connections to host port `port`."""
        return self.devices.vsock().listen(port, backlog)

    # ------------------------------------------------------------------ observing

    @property
    def console_bytes(self) -> bytes:
        """Everything the guest wrote to COM1 that the log still holds."""
        if self._final_console is not None:
            return self._final_console
        return self.serial.log()

    @property
    def console(self) -> str:
        return self.console_bytes.decode("utf-8", "replace")

    def stats(self) -> dict[str, int]:
        """Exit counters of the C core, and `agent_connects`."""
        if self._core == ffi.NULL:
            return {"agent_connects": self.agent_connects}
        s = ffi.new("struct sm_stats *")
        lib.sm_vm_stats(self._core, s)
        return {
            k: int(getattr(s, k))
            for k in (
                "exits",
                "io_exits",
                "mmio_exits",
                "python_calls",
                "unhandled_io",
                "control_nops",
                "kicks",
            )
        } | {"agent_connects": self.agent_connects}

    def marks(self) -> list[tuple[int, float]]:
        """Guest progress marks (control port MARK): (id, seconds since start())."""
        out = ffi.new("struct sm_mark[]", lib.SM_MAX_MARKS)
        n = lib.sm_vm_marks(self._core, out, lib.SM_MAX_MARKS)
        return [(out[i].id, out[i].ns / 1e9 - self.timings.started) for i in range(n)]

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Machine {self.config.vcpus} vCPU {self.config.mem_mib} MiB {self.state.value}>"


def _replace_policy(nic: NetSpec | None, network: bool | Sequence[str]) -> NetSpec:
    """`nic` with the egress policy `network` (see `Machine.restore`)."""
    wanted = NetSpec.from_setting(network)
    if nic is None or wanted is None:
        has = "has a network card" if nic else "has no network card"
        raise MachineError(
            f"restore(network={network!r}): the snapshot {has}; a NIC is part of the "
            "guest's state from its boot, only its egress policy can change at restore"
        )
    return NetSpec(allow=wanted.allow, mac=nic.mac)
