"""Evaluation with LARP's protocol (SPEC.md §6): tokenizer reconstruction (PSNR, SSIM, LPIPS, rFVD, codebook usage)
and generator sampling quality (gFVD, FP FVD), streamed, torchrun-sharded, with result files that record their
protocol.

* :func:`evaluate_tokenizer`, :func:`evaluate_generator`: the evaluations (``python -m dera_fast eval ...``).
* :mod:`.sampling`: which clips, in which global batches, on which rank.
* :mod:`.stats`: exact cross-rank statistics, the I3D extractor check, the real-statistics cache (safetensors).
* :mod:`.protocol`: the protocol record, atomic result files, :func:`compare_results`.
"""
from .generator import evaluate_generator
from .protocol import compare_results, load_result, write_json_atomic
from .tokenizer import build_lpips, evaluate_tokenizer

__all__ = ["evaluate_tokenizer", "evaluate_generator", "build_lpips", "compare_results", "load_result",
           "write_json_atomic"]
