"""Tenants and their API keys: who may call the service, with what priority, share and limits (store.py);
kept in a database (SQLite by default, PostgreSQL by URL) that every ingress replica reads."""
