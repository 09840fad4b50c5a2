"""Persistence: engine factory, models and the SQL the service runs (SQL lives here only)."""
