"""HTTP routes: thin glue that parses, calls a use case and shapes the reply."""
