#!/usr/bin/env bash
# Everything the test suite needs, into the active virtual environment (the README's test command
# calls this; `.ci/run` runs that command, so a newcomer and CI install the same things):
#  - Debian packages: the synthetic world's fonts, Chromium for the browser test (.ci/debian.sh);
#  - torch/torchvision (the exact builds on this machine's disk), then requirements.txt;
#  - the project itself, editable (the `sphinx_x` lmms-eval entry point), with its eval extra
#    (lmms-eval 0.7.3) for tests/train/benchmarks, holding the stack requirements.txt chose in place;
#  - PostgreSQL for the storage suite, started on 127.0.0.1 (.ci/postgres.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

bash .ci/debian.sh
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -r requirements.txt
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
pip freeze | grep -iE '^(torch|torchvision|transformers|accelerate|gradio|gradio_client|huggingface.hub|tokenizers|numpy|safetensors)==' > "$pin"
pip install -q -e ".[eval]" -c "$pin"
bash .ci/postgres.sh
