"""The pytest plugin (entry point ``pytest11: supermachine``): options, fixtures, reporting, capsules.

Loading it has no side effects: importing this module imports no VMM code, opens
no device and builds nothing. Settings are resolved at configure time (text only);
VMs and snapshots are made by the fixtures (fixtures/microvm.py) when a test that
uses one is set up, so ``--collect-only`` and runs that use no VM never touch KVM
beyond the report header's one-line probe.

Where things live: our hook specifications in hookspecs.py; the fixtures, layers,
the warm pool and the factory of snapshots and machines in fixtures/; settings
(options, ini, env, marker), the session's state, its counters and xdist in
session/; the snapshot cache in snapshot_store.py; failure capsules and replay
in capsules/; images (the bundled ones are offered by this module's default
``pytest_supermachine_image``) in images/.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs, progress
from .fixtures.microvm import microvm, microvm_factory, microvm_image
from .session import xdist
from .session.seed import GuestSeeds
from .session.settings import MARKER_ARGS, MARKER_NAME, Settings, add_options
from .session.state import (
    CAPSULE_KEY,
    LEASES_KEY,
    STATE_KEY,
    SessionState,
    new_session_id,
    state_of,
)

if TYPE_CHECKING:
    from .capsules.capsule import CapsuleWriter
    from .images.image import Image

# Loading this module stays cheap (issue 13: a suite without VM tests pays <= 20 ms for
# the plugin): only what registering options, validating settings and the header need is
# imported here; what serves VMs (leases, the factory, counters, capsules, replay, images,
# the KVM probe) is imported where first used, so a session that runs no VM never loads it.

__all__ = ["microvm", "microvm_factory", "microvm_image"]


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)
    group = parser.getgroup("supermachine")
    group.addoption(
        "--supermachine-replay",
        dest="supermachine_replay",
        metavar="CAPSULE",
        default=None,
        help="rerun the test of failure capsule CAPSULE from its "
        "pre-test snapshot (what `supermachine replay` runs)",
    )
    group.addoption(
        "--supermachine-replay-runs",
        dest="supermachine_replay_runs",
        type=int,
        default=1,
        metavar="N",
        help="with --supermachine-replay: how many runs",
    )
    group.addoption(
        "--supermachine-replay-result",
        dest="supermachine_replay_result",
        default=None,
        help=argparse.SUPPRESS,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER_NAME}({', '.join(f'{a}=None' for a in MARKER_ARGS)}): the image and shape "
        "of the VM this test's microvm and layer fixtures get (pytest-supermachine)",
    )
    settings = Settings.from_config(config)
    from_controller = xdist.worker_session(config)
    if from_controller is not None:
        session_id, start = from_controller
    else:
        start = time.time()
        session_id = new_session_id(start)
    state = SessionState(
        config,
        settings,
        session_id,
        start,
        is_worker=hasattr(config, "workerinput"),
        builds_before=progress.finished(),
    )
    config.stash[STATE_KEY] = state

    replay_capsule = config.getoption("supermachine_replay")
    if replay_capsule:
        from .capsules.replay import ReplayPlugin, load_replay_state

        state.replay = load_replay_state(
            replay_capsule,
            config.getoption("supermachine_replay_runs"),
            config.getoption("supermachine_replay_result"),
        )
        config.pluginmanager.register(ReplayPlugin(state.replay), "supermachine-replay")
    state.seeds = GuestSeeds(
        config,
        option=settings.seed,
        option_source=settings.sources.get("seed", ""),
        session_id=session_id,
        replay=state.replay.manifest if state.replay is not None else None,
    )
    config.pluginmanager.register(_Outcomes(state), "supermachine-outcomes")
    xdist.register(config, state)
    if not state.is_worker:
        progress.install_sink(_terminal_progress(config))


def pytest_unconfigure(config: pytest.Config) -> None:
    progress.install_sink(None)


def _capsule_writer(state: SessionState) -> CapsuleWriter | None:
    """The session's capsule writer (none in a replay), made when first needed."""
    if state.replay is not None:
        return None
    if state.capsules is None:
        from .capsules.capsule import CapsuleWriter  # lazy: a session without VMs never writes

        state.capsules = CapsuleWriter.for_session(state)
    return state.capsules


def _terminal_progress(config: pytest.Config) -> progress.ProgressSink:
    """Progress lines through the terminal reporter, with pytest's capture suspended.

    Written while a fixture builds or boots, under capture: suspending it (only the
    main thread may) puts the line on the terminal now instead of into that test's
    captured output, where it would resurface in an unrelated failure report. The
    reporter is looked up per line: it registers after this plugin's configure.
    """

    def sink(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:  # -p no:terminal
            progress.stderr_sink(line)
            return
        suspended = (
            capture.global_and_fixture_disabled()
            if capture is not None and threading.current_thread() is threading.main_thread()
            else contextlib.nullcontext()
        )
        with suspended:
            reporter.ensure_newline()
            reporter.write_line(line)
            reporter.flush()  # a pipe or file is block-buffered: progress must show now

    return sink


def pytest_report_header(config: pytest.Config) -> list[str]:
    from .images.registry import canonical_name
    from .vmm.kvm_device import kvm_summary  # the one VMM module the header loads: a probe

    state = state_of(config)
    s = state.settings
    image = (
        s.image if canonical_name(s.image) == s.image else f"{s.image} ({canonical_name(s.image)})"
    )
    lines = [
        f"supermachine: {kvm_summary()}",
        f"supermachine: image {image}, cache {s.resolved_cache_dir()}, pool {s.pool_size}"
        + (", rebuilding snapshots" if s.rebuild else ""),
    ]
    if state.seeds is not None:
        lines.append(
            f"supermachine: guest seed {state.seeds.session_seed} (from {state.seeds.source}; "
            f"--supermachine-seed={state.seeds.session_seed} repeats it)"
        )
    return lines


@pytest.hookimpl(trylast=True)
def pytest_supermachine_image(config: pytest.Config, name: str) -> Image | None:
    """The default: images added with `register_image`, then the bundled ones.

    ``trylast`` (like pytest-xdist's default ``pytest_xdist_make_scheduler``), so any
    other implementation, in a plugin or a conftest, is asked first and wins. An OCI
    image reference gives an `OciImage` with the session's ``disk_mib``.
    """
    from .images.registry import find_image

    return find_image(name, disk_mib=state_of(config).settings.disk_mib)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, None]:
    item.stash[LEASES_KEY] = []  # a rerun of the item starts with no machines, no capsule
    with contextlib.suppress(KeyError):
        del item.stash[CAPSULE_KEY]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when not in ("setup", "call") or not report.failed:
        return
    leases = [lease for lease in item.stash.get(LEASES_KEY, []) if not lease.released]
    if not leases or CAPSULE_KEY in item.stash:
        return
    state = state_of(item.config)
    writer = _capsule_writer(state)
    if writer is None or not writer.enabled:
        return
    from .capsules.capsule import read_manifest, report_text

    settings = state.settings.for_item(item)
    try:
        path = writer.write(
            item,
            report,
            leases,
            {
                "image": leases[0].snapshot.image,
                "vcpus": leases[0].snapshot.vcpus,
                "mem_mib": leases[0].snapshot.mem_mib,
                "configured_image": settings.image,
            },
        )
        manifest = read_manifest(path)
    except Exception as e:  # a capsule must never hide the failure it is about
        report.sections.append(
            ("supermachine failure capsule", f"not written: {type(e).__name__}: {e}")
        )
        state.stats.capsule_errors.append(f"{item.nodeid}: {type(e).__name__}: {e}")
        return
    item.stash[CAPSULE_KEY] = path
    report.sections.append(("supermachine failure capsule", report_text(path, manifest)))
    state.stats.capsules.append(str(path))
    item.config.hook.pytest_supermachine_capsule_written(item=item, path=path, manifest=manifest)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is None:
        return
    builds = [
        f"{work} ({spent:.0f} s)"
        for work, total in progress.finished().items()
        if (spent := total - state.builds_before.get(work, 0.0)) > 0
    ]
    if builds:
        state.stats.guest_builds.extend(builds)
    if state.is_worker:
        xdist.send_worker_stats(session.config, state.stats)
        return
    # Retention removes capsules, so there is nothing to do (nor to load) without their directory.
    if not session.config.option.collectonly and state.capsule_dir().is_dir():
        writer = _capsule_writer(state)
        if writer is not None:
            writer.apply_retention(state.outcomes)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.counts is None or not state.counts.active:
        return
    terminalreporter.write_sep("-", "supermachine")
    for line in state.stats.summary_lines():
        terminalreporter.write_line(line)


class _Outcomes:
    """Records each test's overall outcome (for capsule retention) where all reports arrive."""

    def __init__(self, state: SessionState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcomes = self.state.outcomes
        if report.failed:
            outcomes[report.nodeid] = "failed"
        elif report.when == "call" and report.passed and outcomes.get(report.nodeid) != "failed":
            outcomes[report.nodeid] = "passed"
        elif report.skipped and report.nodeid not in outcomes:
            outcomes[report.nodeid] = "skipped"
