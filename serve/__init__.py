"""Serving side of ifserve: the command line now; Ray Serve deployments, HTTP API and metrics next."""
