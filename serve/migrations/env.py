"""Alembic environment for the Serve job store: run on a connection `serve.jobs.migrate` hands over (no alembic.ini,
no URL of its own: the store's engine is the one the app uses)."""

from alembic import context

from serve.jobs import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters columns by table copy
with context.begin_transaction():
    context.run_migrations()
