#!/bin/bash
# shardloader's reader on free-threaded CPython 3.13t against the same build with the GIL.
#
#   sudo bash tools/bench/free_threaded.sh [ROOT]     # from the repository root; ROOT: the chroot
#
# Needs root (debootstrap, chroot), deb.debian.org and PyPI, about 4 GB of disk and 10 minutes.
# Debian ships no free-threaded Python, so this builds CPython 3.13.5 from Debian trixie's own
# source twice with the same flags (no PGO/LTO): /opt/py313t (--disable-gil) and /opt/py313;
# Debian's packaged python3.13 (PGO+LTO) is measured too. Wheels: pyarrow 24.0.0 is the newest
# with a cp313t wheel; zstandard builds from source. `tokenizers` has no free-threaded wheel,
# and the reader does not need it (nor torch). Then three rounds of tools/bench/free_threaded.py
# on each interpreter and the one of .venv (make the stream bench's corpus first:
# `python -m tools.bench.stream`), and the table.
set -euo pipefail
REPO=$(pwd)
R=${1:-$REPO/.bench/free-threaded/root}
OUT=$REPO/.bench/free-threaded/results
if [ ! -f "$R/opt/venv313t/pyvenv.cfg" ]; then  # (its python links into the chroot)
  command -v debootstrap >/dev/null || apt-get install -y debootstrap
  mkdir -p "$R"
  debootstrap --variant=minbase trixie "$R" http://deb.debian.org/debian
  cp /etc/resolv.conf "$R/etc/resolv.conf"
  cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null || true
  echo 'deb-src http://deb.debian.org/debian trixie main' >> "$R/etc/apt/sources.list"
  chroot "$R" bash -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
    --no-install-recommends build-essential dpkg-dev pkg-config libssl-dev zlib1g-dev libffi-dev \
    libbz2-dev liblzma-dev libsqlite3-dev uuid-dev libreadline-dev ca-certificates python3.13 \
    python3.13-venv python3.13-dev && update-ca-certificates && mkdir -p /src && cd /src \
    && apt-get source python3.13'
  chroot "$R" bash -c 'set -e; cd /src; tarball=$(ls python3.13_*.orig.tar.xz)
    for variant in ft gil; do
      rm -rf build-$variant && mkdir build-$variant
      tar -xf "$tarball" -C build-$variant --strip-components=1
      cd build-$variant; extra=""; prefix=/opt/py313
      if [ $variant = ft ]; then extra="--disable-gil"; prefix=/opt/py313t; fi
      ./configure --prefix=$prefix $extra --with-ensurepip=install > ../configure-$variant.log
      make -j"$(nproc)" > ../make-$variant.log 2>&1 && make install > ../install-$variant.log
      cd /src
    done'
  chroot "$R" env -u PIP_FIND_LINKS bash -c 'set -e
    for v in "py313t/bin/python3.13t venv313t" "py313/bin/python3.13 venv313" "../usr/bin/python3.13 venv313deb"; do
      set -- $v; /opt/$1 -m venv /opt/$2
      /opt/$2/bin/pip install --only-binary=numpy,pyarrow numpy==2.4.6 pyarrow==24.0.0 \
        fsspec==2026.9.0 zstandard==0.25.0
    done'
fi
mkdir -p "$OUT" "$R$REPO"
mount -t proc proc "$R/proc"
mount --bind "$REPO" "$R$REPO"
trap 'umount "$R$REPO"; umount "$R/proc"' EXIT
B=tools/bench/free_threaded.py
run() {  # PYTHON LABEL FILE [ENV...]
  local py=$1 label=$2 file=$3; shift 3
  local env=(--env "PYTHONPATH=$REPO"); for e in "$@"; do env+=(--env "$e"); done
  "${CHROOT[@]}" "$py" "$B" run --repeats 1 --python "$py" --out "$OUT/$file" --label "$label" "${env[@]}"
}
for round in 1 2 3; do
  CHROOT=(env PYTHONPATH="$REPO"); run "$REPO/.venv/bin/python" "$(.venv/bin/python -V) GIL" venv.jsonl
  CHROOT=(chroot "$R" bash -c 'cd "$0" && exec "$@"' "$REPO")
  run /opt/venv313/bin/python "3.13.5 GIL (same build flags)" py313.jsonl
  run /opt/venv313deb/bin/python "3.13.5 GIL (Debian, PGO+LTO)" py313deb.jsonl
  run /opt/venv313t/bin/python "3.13.5t free-threaded" py313t.jsonl PYTHON_GIL=0
done
.venv/bin/python "$B" table "$OUT"/*.jsonl
