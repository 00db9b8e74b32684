"""Alembic's environment: migrations run on the connection serve/database.py hands over, in its
transaction (so they happen under its lock)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
context.run_migrations()
