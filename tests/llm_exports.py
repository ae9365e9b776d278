"""The tiny decoder exports of tools/llm_zoo.py for tests: built on first use, cached after."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def genai(name: str) -> Path:
    """``model.onnx`` of an onnxruntime-genai export (``llama-genai-fp32``...)."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    import llm_zoo

    return llm_zoo.exported(name) / "model.onnx"


def optimum(name: str) -> Path:
    """``model.onnx`` of an Optimum export (``llama-optimum``...), made in Optimum's own venv."""
    pytest.importorskip("transformers")
    import llm_zoo

    try:
        llm_zoo.venv_python()
    except subprocess.CalledProcessError:  # no package index to make the venv from
        pytest.skip("the Optimum environment could not be made")
    return llm_zoo.exported(name) / "model.onnx"
