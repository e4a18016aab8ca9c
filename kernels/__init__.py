"""Triton kernels, installed as dera_fast.kernels. Each module imports triton; import them lazily.

This folder sits at the repository root, so Python started there (``python -m pytest``, ``python -c ...``) finds it
first as a top-level package ``kernels``, ahead of any installed package of that name (Hugging Face's ``kernels``,
which ``transformers`` imports, for one). Imported under that name, it hands the name over to the installed package,
or fails exactly as if this folder were not there.
NOTE: a namespace folder (no ``__init__.py``) would not shadow anything either, but setuptools' editable-install
finder cannot resolve a namespace subpackage mapped through ``package_dir`` (dera_fast.kernels -> kernels/), so
``pip install -e .`` would lose ``dera_fast.kernels``; tests/test_packaging.py checks both properties.
"""
if __name__ != "dera_fast.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns whatever sys.modules holds once this file ran
    _spec.loader.exec_module(_module)
