"""OpenAI-compatible HTTP front end: protocol models, handlers, metrics, server."""
