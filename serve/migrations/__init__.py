"""Alembic's migrations of the application database (serve/database.py runs them)."""
