"""A writable virtio-fs mount under random sequences of guest operations, checked against a model.

The guest creates, writes, renames (files and whole directories), unlinks,
makes and removes directories; the model is a plain dict of paths. After
every step the host tree equals the model, and every node id the guest still
holds names the file the model says it names (same inode, same size) — which
is what renames of directories with known nodes beneath them put at risk.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pytest_supermachine.vmm.devices.virtio.fs import VirtioFs
from pytest_supermachine.vmm.devices.virtio.fs.uapi import FUSE
from tests.fuse_guest import ROOT, FuseGuest

pytestmark = pytest.mark.unit

names = st.sampled_from(["a", "b", "c", "d"])
DIR = None  # the model's marker for a directory


class WritableMount(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        self.device = VirtioFs(self.root, "rw", writable=True)
        self.guest = FuseGuest(self.device)
        #: root-relative path -> file bytes, or DIR
        self.model: dict[str, bytes | None] = {}
        #: node ids the guest holds -> the path the model says they name
        self.held: dict[int, str] = {}

    def teardown(self) -> None:
        self.device.close()
        self.tmp.cleanup()

    # -- helpers ------------------------------------------------------------------------------
    def dirs(self) -> list[str]:
        return ["", *sorted(p for p, v in self.model.items() if v is DIR)]

    def files(self) -> list[str]:
        return sorted(p for p, v in self.model.items() if v is not DIR)

    def node_of(self, path: str) -> int:
        node = self.guest.walk(path)
        self.held[node] = path
        return node

    @staticmethod
    def join(parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    # -- rules --------------------------------------------------------------------------------
    @rule(data=st.data(), name=names, content=st.binary(max_size=64))
    def create_file(self, data: st.DataObject, name: str, content: bytes) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        path = self.join(parent, name)
        err, entry, fh = self.guest.create(self.node_of(parent), name.encode())
        if path in self.model:
            assert err == 0 if self.model[path] is not DIR else err == errno.EISDIR
            if err:
                return
        assert err == 0
        node = int(entry.nodeid)
        assert self.guest.write(node, fh, content)[0] == 0
        assert self.guest.release(node, fh) == 0
        old = self.model.get(path) or b""
        self.model[path] = content + old[len(content) :]
        self.held[node] = path

    @rule(data=st.data(), name=names)
    def make_dir(self, data: st.DataObject, name: str) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        path = self.join(parent, name)
        body = FUSE.build("fuse_mkdir_in", mode=0o755) + name.encode() + b"\0"
        err, _ = self.guest.call("FUSE_MKDIR", self.node_of(parent), body, "fuse_entry_out")
        assert err == (errno.EEXIST if path in self.model else 0)
        self.model.setdefault(path, DIR)

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def unlink_file(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.files()))
        parent, _, name = path.rpartition("/")
        assert self.guest.call("FUSE_UNLINK", self.node_of(parent), name.encode() + b"\0")[0] == 0
        del self.model[path]
        self.held = {n: p for n, p in self.held.items() if p != path}

    @precondition(lambda self: len(self.dirs()) > 1)
    @rule(data=st.data())
    def remove_dir(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.dirs()[1:]))
        parent, _, name = path.rpartition("/")
        err = self.guest.call("FUSE_RMDIR", self.node_of(parent), name.encode() + b"\0")[0]
        empty = not any(p.startswith(path + "/") for p in self.model)
        assert err == (0 if empty else errno.ENOTEMPTY)
        if empty:
            del self.model[path]
            self.held = {n: p for n, p in self.held.items() if p != path}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), name=names)
    def rename(self, data: st.DataObject, name: str) -> None:
        src = data.draw(st.sampled_from(sorted(self.model)))
        newparent = data.draw(st.sampled_from(self.dirs()))
        dst = self.join(newparent, name)
        oldparent, _, oldname = src.rpartition("/")
        body = FUSE.build("fuse_rename_in", newdir=self.node_of(newparent))
        body += oldname.encode() + b"\0" + name.encode() + b"\0"
        err = self.guest.call("FUSE_RENAME", self.node_of(oldparent), body)[0]
        expected = self.expected_rename_errno(src, dst)
        assert err == expected, (src, dst, os.strerror(err))
        if err or src == dst:
            return
        moved = {p: v for p, v in self.model.items() if p == src or p.startswith(src + "/")}
        for p in [p for p in self.model if p == dst or p.startswith(dst + "/")]:
            del self.model[p]
        self.held = {n: p for n, p in self.held.items() if p != dst}
        for p, v in moved.items():
            del self.model[p]
            self.model[dst + p[len(src) :]] = v
        self.held = {
            n: dst + p[len(src) :] if p == src or p.startswith(src + "/") else p
            for n, p in self.held.items()
        }

    def expected_rename_errno(self, src: str, dst: str) -> int:
        if src == dst:
            return 0
        if dst.startswith(src + "/"):
            return errno.EINVAL
        if src.startswith(dst + "/"):  # the target is an ancestor of the source
            return errno.ENOTEMPTY
        if dst not in self.model:
            return 0
        if self.model[src] is DIR and self.model[dst] is not DIR:
            return errno.ENOTDIR
        if self.model[src] is not DIR and self.model[dst] is DIR:
            return errno.EISDIR
        if self.model[dst] is DIR and any(p.startswith(dst + "/") for p in self.model):
            return errno.ENOTEMPTY
        return 0

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def host_tree_is_the_model(self) -> None:
        host = {}
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            host[rel] = DIR if p.is_dir() else p.read_bytes()
        assert host == self.model

    @invariant()
    def held_nodes_name_what_the_model_says(self) -> None:
        for node, path in self.held.items():
            err, attr = self.guest.getattr(node)
            assert err == 0, (node, path, os.strerror(err))
            host = (self.root / path).lstat() if path else self.root.lstat()
            assert attr.attr.ino == host.st_ino, (node, path)
            if self.model.get(path, DIR) is not DIR:
                assert attr.attr.size == len(self.model[path])

    @invariant()
    def root_reads_back(self) -> None:
        assert self.guest.getattr(ROOT)[0] == 0


WritableMount.TestCase.settings = settings(
    max_examples=int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "25")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_writable_mount_follows_the_model = WritableMount.TestCase
