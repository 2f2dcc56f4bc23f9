"""OpenAI-compatible serving of a student: protocol (schemas, errors), engine (batching), app (routes)."""

from distill.serving.app import ServeOptions, create_app
from distill.serving.engine import Engine, EngineStats, SamplingParams

__all__ = ["Engine", "EngineStats", "SamplingParams", "ServeOptions", "create_app"]
