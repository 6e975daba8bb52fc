"""Backend packages: `diffattn.backends.mlx` and `diffattn.backends.cuda`.

Their sources live in the repository's top-level `backends/` folder. An install maps them
here (pyproject's package-dir); in a source checkout run without installing, the folder is
appended to this package's search path so the same import names work.
"""
import os as _os

_source = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "backends")
if _os.path.isfile(_os.path.join(_source, "mlx", "__init__.py")) and _source not in __path__:
    __path__.append(_source)
