"""Streaming maps while a model trains: TensorBoard/PNG sinks, the monitor, the Lightning callback."""
