"""The contract the four GenServe processes share: wire messages, error codes, the model
catalog, CURVE helpers and the key-file format. Imports no torch and no process package."""
