"""OpenAI's Batch API for image requests: files and batches in the SQL database (tables.py, store.py),
their blobs in the fsspec store, input checked before anything runs (lines.py), the HTTP routes
(routes.py) and the runner that works through the items in the tenants' batch class (runner.py)."""
