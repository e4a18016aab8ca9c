"""Public functional API of the hot paths. Every op takes ``backend=None|"torch"|"triton"|"cuda"|"cpp"`` (see
:mod:`dera_fast.backends`); an explicit backend that cannot run raises :class:`BackendUnavailableError`."""
from ..backends import BackendUnavailableError
from .._validation import value_checks
from .attention import attention, attention_ref
from .sacp import gradient_gram, sacp_project
from .vq import codebook_cross_entropy, vq_nearest, vq_sample

__all__ = ["BackendUnavailableError", "attention", "attention_ref", "codebook_cross_entropy", "gradient_gram",
           "sacp_project", "value_checks", "vq_nearest", "vq_sample"]
