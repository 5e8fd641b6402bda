"""aigc_ray: corpus -> Ray Data shards -> Ray Train model -> Ray Serve OpenAI endpoint."""

__version__ = "0.1.0"
