#!/usr/bin/env bash
# Installs what pytest-supermachine needs on a fresh Debian/Ubuntu machine with /dev/kvm:
# a C compiler, kernel and Python headers (the C core, the microguest and the guest agent
# are compiled here), e2fsprogs, busybox-static and the kernel source + build tools
# (guest images), a virtualenv in .venv, and the package with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
command -v ld >/dev/null || need_apt+=(binutils)
[ -f /usr/include/linux/kvm.h ] || need_apt+=(linux-libc-dev)
[ -f /usr/include/stdint.h ] || need_apt+=(libc6-dev)
[ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)      # ext4 rootfs images
[ -x /bin/busybox ] || need_apt+=(busybox-static)                                 # Linux initramfs
# The Linux guest's kernel is built from a kernel source with our recipe (images/kernel.py):
# any /usr/src/linux-source-*.tar.* (the `linux-source` package), or $SUPERMACHINE_KERNEL_SOURCE.
if [ -z "${SUPERMACHINE_KERNEL_SOURCE:-}" ] && ! compgen -G '/usr/src/linux-source-*.tar.*' >/dev/null; then
  need_apt+=(linux-source)
fi
for tool in make bc bison flex perl patch xz; do
  command -v $tool >/dev/null || need_apt+=("$([ $tool = xz ] && echo xz-utils || echo $tool)")
done
[ -f /usr/include/gelf.h ] || need_apt+=(libelf-dev)
[ -f /usr/include/slirp/libslirp.h ] || need_apt+=(libslirp-dev)   # virtio-net backend (brings libslirp0)
# OCI registry tests (tests/unit/test_distribution.py): a real registry, skopeo to push, htpasswd.
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v skopeo >/dev/null || need_apt+=(skopeo)
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)  # Debian OCI test image (tests/debian_image.py)
command -v htpasswd >/dev/null || need_apt+=(apache2-utils)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || need_apt+=(python3)
if command -v "$PY" >/dev/null; then
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -f "$inc/Python.h" ] || need_apt+=(python3-dev)
  "$PY" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The editable install follows the sources by itself (the C core rebuilds when its sources
# change); pip runs again only when what it installed from (the metadata) changed.
stamp=.venv/.supermachine-install
want=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing pytest-supermachine and its test extras into .venv (pip, ~1 min)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
