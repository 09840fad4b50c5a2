"""Use cases (what the service does with messages) and the frames they and the transports
share (``envelope``); no FastAPI, Starlette or broadcast bus here (import-linter holds it)."""
