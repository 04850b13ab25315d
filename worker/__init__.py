"""The depio worker: what a compute node needs to run depio tasks (`depio-worker`)."""
from .main import Worker, main

__all__ = ["Worker", "main"]
