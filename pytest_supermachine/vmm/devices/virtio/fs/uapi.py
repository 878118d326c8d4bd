"""Kernel UAPI headers (``linux/fuse.h`` and friends) read at import time, through cffi.

Struct layouts are never re-typed by hand: a `UapiHeader` reads the installed
header (``/usr/include/linux/...``, from ``linux-libc-dev``) and hands its
declarations to cffi in ABI mode, which lays the structs out by the C rules
(no compiler involved). cffi's parser cannot eat these headers raw (they have
preprocessor lines, function-like macros such as ``FUSE_REC_ALIGN``, the
kernel's ``__u64``/``__le32`` types and ``__attribute__((packed))``), so a
small extraction runs first: comments are dropped, continuation lines joined,
every preprocessor line removed, the kernel integer types declared as the
``stdint`` ones and a packed attribute turned into cffi's ``packed=True``;
what is left (the struct and enum definitions) goes to ``FFI.cdef`` verbatim.

Integer ``#define`` constants (``FATTR_*``, ``FOPEN_*``, INIT flags,
``RESOLVE_*``, ...) are read from the same text into `UapiHeader.const`: a
define whose value is an integer literal, ``(1 << n)``/``(1ULL << n)`` or the
name of another such constant; any other define (``_IOR(...)``,
``offsetof``) is skipped.

Guarantee: `UapiHeader.parse` never reads past the bytes it is given (a short
buffer gives None) and `UapiHeader.build` sets only fields the header declares.
"""

from __future__ import annotations

import os
import re
from typing import Any

import cffi

from .....errors import MachineError

INCLUDE_DIRS = ("/usr/include", "/usr/include/x86_64-linux-gnu")

_KERNEL_TYPES = "".join(
    f"typedef {std} {k};\n"
    for k, std in (
        ("__u8", "uint8_t"),
        ("__u16", "uint16_t"),
        ("__u32", "uint32_t"),
        ("__u64", "uint64_t"),
        ("__s8", "int8_t"),
        ("__s16", "int16_t"),
        ("__s32", "int32_t"),
        ("__s64", "int64_t"),
        ("__le16", "uint16_t"),
        ("__le32", "uint32_t"),
        ("__le64", "uint64_t"),
    )
)
_PACKED = re.compile(r"__attribute__\s*\(\(\s*packed\s*\)\)")
_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Z_][A-Z0-9_]*)\s+(.+?)\s*$", re.M)
_INT = re.compile(r"^\(?\s*(0x[0-9a-fA-F]+|\d+)(?:[uU]?[lL]{0,2})\s*(?:<<\s*(\d+))?\s*\)?$")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def declarations(text: str) -> str:
    """A header's struct/enum declarations: comments, continuations, # lines and attributes removed."""
    text = _PACKED.sub("", _strip_comments(text).replace("\\\n", " "))
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def constants(text: str) -> dict[str, int]:
    """Integer ``#define``s: literals, ``(1 << n)`` and aliases of those."""
    out: dict[str, int] = {}
    for name, value in _DEFINE.findall(_strip_comments(text)):
        m = _INT.match(value)
        if m:
            out[name] = int(m.group(1), 0) << int(m.group(2) or 0)
        elif value in out:
            out[name] = out[value]
    return out


class UapiHeader:
    """One kernel UAPI header: its structs (through cffi), enums and integer constants."""

    def __init__(self, relpath: str) -> None:
        """`relpath` like ``"linux/fuse.h"``; `MachineError` if the header is not installed."""
        for base in INCLUDE_DIRS:
            path = os.path.join(base, relpath)
            if os.path.isfile(path):
                break
        else:
            raise MachineError(
                f"virtio-fs needs the kernel UAPI header {relpath} (install linux-libc-dev); "
                f"looked in {', '.join(INCLUDE_DIRS)}"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.path = path
        self.ffi = cffi.FFI()
        self.ffi.cdef(_KERNEL_TYPES + declarations(text), packed=bool(_PACKED.search(text)))
        self.const = constants(text)

    def enum(self, name: str) -> dict[str, int]:
        """The members of ``enum <name>``."""
        return dict(self.ffi.typeof(f"enum {name}").relements)

    def sizeof(self, struct: str) -> int:
        """Size in bytes of ``struct <struct>``."""
        return self.ffi.sizeof(f"struct {struct}")

    def parse(self, struct: str, data: bytes | memoryview, offset: int = 0) -> Any | None:
        """A copy of ``struct <struct>`` decoded from `data` at `offset`; None if `data` is too short."""
        size = self.sizeof(struct)
        if offset < 0 or len(data) - offset < size:
            return None
        p = self.ffi.new(f"struct {struct} *")
        self.ffi.memmove(p, bytes(data[offset : offset + size]), size)
        return p

    def build(self, struct: str, **fields: Any) -> bytes:
        """``struct <struct>`` with `fields` set (the rest zero), as bytes."""
        p = self.ffi.new(f"struct {struct} *")
        for name, value in fields.items():
            setattr(p, name, value)
        return bytes(self.ffi.buffer(p))

    def new(self, struct: str) -> Any:
        """A zeroed ``struct <struct>`` (cdata pointer) to fill field by field."""
        return self.ffi.new(f"struct {struct} *")

    def bytes_of(self, value: Any) -> bytes:
        """The bytes of a cdata struct pointer (`new`/`parse` result)."""
        return bytes(self.ffi.buffer(value))


FUSE = UapiHeader("linux/fuse.h")
OPENAT2 = UapiHeader("linux/openat2.h")
VIRTIO_FS = UapiHeader("linux/virtio_fs.h")
#: FUSE opcode name -> number, from ``enum fuse_opcode``
OPCODES = FUSE.enum("fuse_opcode")
