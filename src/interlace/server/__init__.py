"""The Interlace server: HTTP API, durable job store, result store and worker pool."""
