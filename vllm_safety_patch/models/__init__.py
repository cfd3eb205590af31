"""Base models: the default model's preparation, checkpoint reading, fingerprints."""
