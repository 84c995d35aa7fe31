"""batchd on Ray Serve (pip install .[ray]): `batchd ray`, or Ray's own `serve run batchd.ray:app_builder`."""
from .deployment import app_builder, build_app, deployment_options

__all__ = ["app_builder", "build_app", "deployment_options"]
