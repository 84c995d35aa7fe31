"""Ray tests need Ray Serve (`pip install .[ray]`); without it each module skips, saying so."""
import warnings

with warnings.catch_warnings():
    # Ray 2.60 declares pydantic fields the v1 way and warns about it at import: not batchd's to fix,
    # and the suite turns warnings into errors. Imported once here, the modules below find it loaded.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        pass
