#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine: Debian packages, the virtualenv, libnbd's bindings.
# Run by `make demo` and `make test`; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(qemu-utils nbdkit libnbd-bin python3-libnbd qemu-system-common)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's libnbd bindings are built for Python 3.11: the virtualenv must be 3.11 too.
PY=""
for c in python3.11 python3 /usr/bin/python3.11; do
  if command -v "$c" >/dev/null && [ "$("$c" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
    PY=$c; break
  fi
done
[ -n "$PY" ] || { echo "bootstrap: Python 3.11 is required (Debian's python3-libnbd is built for it)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# A folder holding only symlinks to Debian's nbd.py and libnbdmod, named by a .pth file: the venv sees
# libnbd and nothing else of Debian's dist-packages.
shim=.venv/nbd-shim
mkdir -p "$shim"
ln -sf /usr/lib/python3/dist-packages/nbd.py "$shim/"
for so in /usr/lib/python3/dist-packages/libnbdmod.cpython-311-*.so; do ln -sf "$so" "$shim/"; done
echo "$PWD/$shim" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/debian-libnbd.pth"

stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing xms and its pinned dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,openstack]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import xms, temporalio' || { echo "bootstrap: pip install failed" >&2; exit 1; }
  touch "$stamp"
fi
.venv/bin/python -c 'import nbd' || { echo "bootstrap: libnbd's Python bindings do not import" >&2; exit 1; }
