"""Trace sinks shipped with fluxrun."""

from __future__ import annotations

from .jsonfile import JsonFileTraceSink

__all__ = ["JsonFileTraceSink"]
