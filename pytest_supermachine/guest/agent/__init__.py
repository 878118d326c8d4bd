"""The Linux guest agent and init (``sm-agent``), and the initramfs that carries them.

``build_agent()`` compiles the static C agent (cached by content);
``build_initramfs()`` packs it as ``/init`` with busybox-static into a newc cpio.
README.md in this folder describes the design, the command-line options and
the kernel command-line knobs (``sm.root=``, ``sm.overlay=``, ``sm.rootfstype=``,
``sm.hostname=``, ``sm.debug_shell=``).
"""

from __future__ import annotations

from .build import build_agent
from .initramfs import build_initramfs

__all__ = ["build_agent", "build_initramfs"]
