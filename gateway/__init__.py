"""The OpenAI-compatible HTTP gateway. Stateless: any number may run against one Redis."""

from gateway.app import create_app

__all__ = ["create_app"]
