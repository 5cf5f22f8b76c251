# Sourced by quickstart.sh and test.sh: make .venv once, install requirements.txt, activate it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# quiet when nothing changed; requirements.txt pins torch to the CPU-available 2.13.0
python -m pip install --disable-pip-version-check -q -r requirements.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
