"""Content-addressed model storage: safetensors codec, Kubo-compatible CIDs, content stores, signed manifests and lineage."""
