"""The HTTP server: one Starlette app, one module per API dialect."""
