"""The service version (``/health/detailed``, ``/openapi.json``, ``mlops_build_info``)."""

__version__ = "1.0.0"
