"""The image engine: store, layers, OCI documents, build files and the registry client."""
