#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned dependencies. Idempotent and quick when done.
#   TORCH_SPEC   torch requirement (default torch==2.13.0, the CPU build); GPU users set e.g.
#                TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   PYTHON       interpreter used to create the venv (default python3.11, else python3)
#   RANKSCOPE_APT=0   skip the optional Debian text packages of the embedded corpus
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.rankscope-installed
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC and requirements.txt into .venv"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch first and alone, so nothing later can pull an unpinned (multi-GB CUDA) build
  .venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  nodeps=$(sed -n 's/^#nodeps //p' requirements.txt)
  [ -z "$nodeps" ] || .venv/bin/python -m pip install -q --no-deps $nodeps 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, rankscope" || { echo "[setup] install failed: see the pip output above"; exit 1; }
  echo "$want" > "$stamp"
fi
# Optional corpus sources from Debian (public domain / free texts); the corpus works without them.
#   fortunes jargon-text dict-gcide: the default corpus; sword-text-web (World English Bible),
#   python3.11-doc (its reST prose) and r-cran-janeaustenr (read without R): configs/english-cpu.yaml
if [ "${RANKSCOPE_APT:-1}" != "0" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in fortunes jargon-text dict-gcide sword-text-web python3.11-doc r-cran-janeaustenr; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "[setup] installing Debian text packages:$missing (set RANKSCOPE_APT=0 to skip)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing) >/dev/null 2>&1 \
      || echo "[setup] could not install$missing; the corpus will use the other sources"
  fi
fi
