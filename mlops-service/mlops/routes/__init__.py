"""One blueprint per resource: track, health, metrics, analytics, openapi, businesses, dashboard."""
