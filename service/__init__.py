"""chat-service: a PostgreSQL-persisted chat microservice."""
