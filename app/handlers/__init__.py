"""Handlers: one module per tab, plain functions on plain data (no gr.* components), so they
are tested without a browser. `common` holds what the tabs share; `api` the flat endpoints."""
