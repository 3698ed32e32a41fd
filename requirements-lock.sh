#!/usr/bin/env bash
# Regenerates requirements-lock.txt, the exact versions the README's commands and CI install
# (`pip install -c requirements-lock.txt -e ".[dev]"`), from the ranges in pyproject.toml.
#
#   bash requirements-lock.sh                  # after adding or changing a dependency: keeps every
#                                              # other pin, resolves only what changed
#   bash requirements-lock.sh --upgrade        # move every package to the newest allowed version
#   bash requirements-lock.sh -P optuna        # move one package
#
# pip-compile (pip-tools) runs in its own throw-away environment, so the project's .venv is not
# changed; run the test suite on the new lock before committing it.
set -euo pipefail
cd "$(dirname "$0")"
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check "pip-tools==7.6.2"
# Index and find-links options are the machine's own (pip's config), not the project's: keep them out.
"$tools/bin/pip-compile" --quiet --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
    --output-file requirements-lock.txt "$@" pyproject.toml
echo "wrote requirements-lock.txt ($(grep -c '==' requirements-lock.txt) pinned packages)"
