"""FlashBack behind the OpenAI completions API.

protocol.py (schemas, errors, response shapes), scheduler.py (which generation steps next), generation.py (one
request's generation, the admitting service), app.py (routes and middleware).
"""

from flashback.config import ServerLimits
from flashback.server.app import create_app, run, server_config
from flashback.server.generation import CompletionService, Generation
from flashback.server.protocol import CompletionRequest
from flashback.server.stops import StopFilter

__all__ = [
    "CompletionRequest",
    "CompletionService",
    "Generation",
    "ServerLimits",
    "StopFilter",
    "create_app",
    "run",
    "server_config",
]
